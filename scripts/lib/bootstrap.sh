# Sourced by the scripts in scripts/: creates .venv with the pinned dependencies of pyproject.toml and
# unpacks tritonserver into it. Idempotent: when nothing changed since the last run it only checks a stamp.
# TRITON_DIFFUSERS_VENV and TRITON_DIFFUSERS_PYTHON choose another virtualenv and base Python (scripts/test-py310).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV="${TRITON_DIFFUSERS_VENV:-$ROOT/.venv}"
PYTHON="$VENV/bin/python"
STAMP="$VENV/.bootstrap-stamp"

_log() { printf '[bootstrap] %s\n' "$*" >&2; }

_find_base_python() {
  # torch 2.13.0's CPU wheel lies on these machines for Python 3.11; the stub matches the venv's Python.
  if [[ -n ${TRITON_DIFFUSERS_PYTHON:-} ]]; then echo "$TRITON_DIFFUSERS_PYTHON"; return 0; fi
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
  _log "installing pinned dependencies (pyproject.toml) into $VENV"
  # Plain pip on purpose: it finds the local CPU build of torch 2.13.0; uv and poetry would fetch CUDA builds.
  "$PYTHON" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev]"

  local wheel_spec
  wheel_spec=$(sed -n '/^\[tool.triton-diffusers.server\]/,/^\[/s/^wheel = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml")
  _log "unpacking tritonserver from $wheel_spec"
  local download; download=$(mktemp -d)
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$download" "$wheel_spec"
  "$PYTHON" -c 'import sys, pathlib
from triton_launcher.installation import unpack_server_wheel
unpack_server_wheel(next(pathlib.Path(sys.argv[1]).glob("*.whl")))' "$download"
  rm -rf "$download"
  _ensure_system_packages
  echo "$wanted" > "$STAMP"
  _log "done"
}


_ensure_system_packages() {
  # Real services the tests start themselves, from Debian's packages: a throwaway PostgreSQL server
  # (workbench/postgres.py), HAProxy in front of Triton replicas (workbench/haproxy.py), headless Chromium and its
  # WebDriver for the service's web page, and Node.js for the TypeScript client.
  local missing=()
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1 || missing+=(postgresql)
  command -v haproxy >/dev/null 2>&1 || [[ -x /usr/sbin/haproxy ]] || missing+=(haproxy)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
  command -v node >/dev/null 2>&1 || missing+=(nodejs)
  command -v npm >/dev/null 2>&1 || missing+=(npm)
  ((${#missing[@]})) || return 0
  if [[ $(id -u) == 0 ]]; then
    _log "installing Debian's ${missing[*]} (the tests run them for real)"
    { apt-get install -y -q "${missing[@]}" || { apt-get update -q && apt-get install -y -q "${missing[@]}"; }; } >&2
  else
    _log "missing ${missing[*]}: the tests of the PostgreSQL store, the proxy, the web page and the TypeScript" \
      "client need them (sudo apt-get install ${missing[*]})"
  fi
}


bootstrap_py310() {
  # Only what the torch-free modules and their tests import: the NGC image brings the rest.
  local venv="$ROOT/.venv-py310" wanted
  wanted=$(_wanted_stamp)
  [[ -x $venv/bin/python && -f $venv/.bootstrap-stamp && $(cat "$venv/.bootstrap-stamp") == "$wanted" ]] && return 0
  "$1" -m venv "$venv"
  local requirements="$venv/requirements.txt"
  "$PYTHON" -c 'import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = project["optional-dependencies"]
# The base install (the client side) and what its tests use.
wanted = ("pytest", "psutil", "pillow", "hypothesis")
pins = [pin for name in ("server", "bench", "dev") for pin in extras[name] if pin.split("=")[0] in wanted]
print("\n".join(project["dependencies"] + pins))' "$ROOT/pyproject.toml" > "$requirements"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  echo "$wanted" > "$venv/.bootstrap-stamp"
}

bootstrap
export PATH="$VENV/bin:$PATH"
