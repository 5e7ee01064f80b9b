# Sourced: defines bootstrap_typescript ROOT, which installs the TypeScript client's pinned dev dependencies
# (clients/typescript/package-lock.json) and compiles it to dist/ and its tests to build-test/. Idempotent: when
# neither the lock file nor a source changed since the last run it only compares a stamp. Needs Node >= 18 and
# npm (the client itself needs nothing but fetch at run time).

_typescript_log() { printf '[bootstrap] %s\n' "$*" >&2; }

# What the build depends on: the lock file, the compiler settings, every source and test, and this script.
_typescript_fingerprint() {
  local client=$1
  {
    printf '%s\n' "$(node --version)"
    cat "$client/package.json" "$client/package-lock.json" "$client/tsconfig.json" "$client/test/tsconfig.json" \
      "${BASH_SOURCE[0]}"
    find "$client/src" "$client/test" -type f -name '*.ts' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -d' ' -f1
}

bootstrap_typescript() {
  local root=${1:?usage: bootstrap_typescript ROOT}
  local client="$root/clients/typescript"
  local stamp="$client/node_modules/.bootstrap-stamp"
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    _typescript_log "the TypeScript client needs Node.js >= 18 with npm on PATH" \
      "(the distribution's nodejs and npm packages will do)"
    return 1
  fi
  local major
  major=$(node -p 'process.versions.node.split(".")[0]')
  if ((major < 18)); then
    _typescript_log "the TypeScript client needs Node.js >= 18 (global fetch and web streams); found $(node --version)"
    return 1
  fi
  local wanted
  wanted=$(_typescript_fingerprint "$client")
  if [[ -f $stamp && $(cat "$stamp") == "$wanted" && -f $client/dist/index.js ]]; then
    return 0
  fi
  _typescript_log "installing the TypeScript client's pinned dev dependencies and compiling it"
  # npm ci: exactly the lock file, and a fresh node_modules, so a stale or hand-edited one cannot mask a change.
  (cd "$client" && npm ci --no-audit --no-fund --loglevel=error >&2) ||
    { _typescript_log "npm ci failed in $client"; return 1; }
  # Old outputs would keep a deleted source's module importable.
  rm -rf "$client/dist" "$client/build-test"
  (cd "$client" && npx --no-install tsc -p . >&2 && npx --no-install tsc -p test >&2) ||
    { _typescript_log "the TypeScript client does not compile (tsc above)"; return 1; }
  echo "$wanted" > "$stamp"
}
