# Sourced: find_python310 prints a Python 3.10 interpreter (the NGC 24.10 image's version), from PATH or pyenv.
find_python310() {
  local candidate
  for candidate in "$(command -v python3.10 || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10*/bin/python3.10; do
    if [[ -x $candidate ]] && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  return 1
}
