#!/usr/bin/env bash
# One entry point that sets itself up: venv, dependencies, redis-server, chromium.
#   ./dev.sh demo    the whole CT loop offline, ending in a posted report
#   ./dev.sh test    the test suite (what CI runs)
#   ./dev.sh setup   only the set-up
#   ./dev.sh bench   the benchmarks (need ../shared/data/mnist for the model one);
#                    --smoke: every bench/ script at a tiny size, seconds each, no figures judged
set -euo pipefail
cd "$(dirname "$0")"

VENV=${CT_VENV:-.venv}
PY=${PYTHON:-}

find_python() {
  for c in "$PY" python3.11 python3.12 python3.13 python3; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      echo "$c"; return
    fi
  done
  echo "dev.sh: Python >= 3.11 is required" >&2; exit 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

ensure_apt() {  # ensure_apt <command> <debian package>
  command -v "$1" >/dev/null 2>&1 && return
  echo "dev.sh: installing $2 (apt-get)" >&2
  as_root apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$2" >/dev/null
}

setup() {
  local py; py=$(find_python)
  if [ ! -x "$VENV/bin/python" ]; then
    if ! "$py" -c 'import ensurepip, venv' 2>/dev/null; then  # Debian splits venv out
      as_root apt-get update -qq >/dev/null
      DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq python3-venv >/dev/null
    fi
    "$py" -m venv "$VENV"
  fi
  # Reinstall only when the dependency list changed.
  local stamp="$VENV/.ctbot-installed" want; want=$(sha256sum pyproject.toml | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "dev.sh: installing dependencies into $VENV (first run takes a few minutes)" >&2
    "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[train,demo,test]'
    echo "$want" > "$stamp"
  fi
  if [ -z "${REDIS_URL:-}" ]; then ensure_apt redis-server redis-server; fi
  ensure_apt chromium chromium  # headless, for the test that renders the Slack page
  # Without a colour emoji font the page's ✅ and 🚀 render as empty boxes.
  if ! fc-list 2>/dev/null | grep -qi 'color emoji'; then
    echo "dev.sh: installing fonts-noto-color-emoji (apt-get)" >&2
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq fonts-noto-color-emoji >/dev/null
  fi
}

cmd=${1:-help}; shift || true
case "$cmd" in
  setup) setup ;;
  demo)  setup; exec "$VENV/bin/ctbot" demo "$@" ;;
  test)  setup; "$VENV/bin/ruff" check . ; exec "$VENV/bin/python" -m pytest "$@" ;;
  bench) setup; for b in bench/bench_*.py; do echo "== $b $*"; "$VENV/bin/python" "$b" "$@"; done ;;
  serve) setup; exec "$VENV/bin/ctbot" serve "$@" ;;
  *) sed -n '2,8p' "$0"; exit 2 ;;
esac
