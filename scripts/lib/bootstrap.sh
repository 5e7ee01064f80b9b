# Sourced by the scripts in scripts/: creates .venv with the pinned dependencies of pyproject.toml and
# unpacks tritonserver into it. Idempotent: when nothing changed since the last run it only checks a stamp.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV="$ROOT/.venv"
PYTHON="$VENV/bin/python"
STAMP="$VENV/.bootstrap-stamp"

_log() { printf '[bootstrap] %s\n' "$*" >&2; }

_find_base_python() {
  # torch 2.13.0's CPU wheel lies on these machines for Python 3.11; the stub matches the venv's Python.
  local candidate
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  _log "Python 3.11 is required (python3.11 or python3 on PATH)"; return 1
}

_wanted_stamp() {
  cat "$ROOT/pyproject.toml" "$ROOT/scripts/lib/bootstrap.sh" | sha256sum | cut -d' ' -f1
}

bootstrap() {
  local wanted; wanted=$(_wanted_stamp)
  if [[ -x $PYTHON && -f $STAMP && $(cat "$STAMP") == "$wanted" ]]; then
    return 0
  fi
  if [[ ! -x $PYTHON ]]; then
    _log "creating $VENV"
    "$(_find_base_python)" -m venv "$VENV"
  fi
  _log "installing pinned dependencies (pyproject.toml) into .venv"
  # Plain pip on purpose: it finds the local CPU build of torch 2.13.0; uv and poetry would fetch CUDA builds.
  "$PYTHON" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev]"

  local wheel_spec; wheel_spec=$("$PYTHON" -c '
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print(tomllib.load(f)["tool"]["triton-diffusers"]["server"]["wheel"])' "$ROOT/pyproject.toml")
  _log "unpacking tritonserver from $wheel_spec"
  local download; download=$(mktemp -d)
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$download" "$wheel_spec"
  "$PYTHON" -c 'import sys, pathlib
from triton_launcher.installation import unpack_server_wheel
unpack_server_wheel(next(pathlib.Path(sys.argv[1]).glob("*.whl")))' "$download"
  rm -rf "$download"
  echo "$wanted" > "$STAMP"
  _log "done"
}

bootstrap
export PATH="$VENV/bin:$PATH"

find_python310() {
  local candidate
  for candidate in "$(command -v python3.10 || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10*/bin/python3.10; do
    if [[ -x $candidate ]] && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  return 1
}

bootstrap_py310() {
  # Only what the torch-free modules and their tests import: the NGC image brings the rest.
  local venv="$ROOT/.venv-py310" wanted
  wanted=$(_wanted_stamp)
  [[ -x $venv/bin/python && -f $venv/.bootstrap-stamp && $(cat "$venv/.bootstrap-stamp") == "$wanted" ]] && return 0
  "$1" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    $("$PYTHON" -c 'import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
wanted = ("numpy", "pytest", "psutil")
print(" ".join(d for d in project["dependencies"] + project["optional-dependencies"]["dev"] if d.split("=")[0] in wanted))' "$ROOT/pyproject.toml")
  echo "$wanted" > "$venv/.bootstrap-stamp"
}
