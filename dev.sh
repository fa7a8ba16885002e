#!/usr/bin/env bash
# One entry point that sets itself up: venv, dependencies, redis-server, chromium.
#   ./dev.sh demo    the whole CT loop offline, ending in a posted report
#   ./dev.sh test    the test suite (what CI runs)
#   ./dev.sh setup   only the set-up
#   ./dev.sh bench   the benchmarks (need ../shared/data/mnist for the model one);
#                    --smoke: every bench/ script at a tiny size, seconds each, no figures judged
#   ./dev.sh images        build the bot and trainer images with podman (sets podman up)
#   ./dev.sh images check  run them as a cluster would: entrypoints, kube play, a pipeline step
#   ./dev.sh lock    refresh the hashed lock files (requirements/*.txt) from pyproject.toml
#   ./dev.sh picture run the demo, then screenshot its channel into docs/img/channel.png
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
  # Reinstall only when the dependency list or its lock changed. Everything comes from the
  # hashed lock (./dev.sh lock refreshes it); the project itself is installed editable,
  # without resolving anything.
  if [ "$(lock_digest)" != "$(deps_digest)" ]; then   # someone changed the dependencies
    echo "dev.sh: pyproject.toml's dependencies changed since requirements/*.txt were locked: ./dev.sh lock" >&2
    if [ -x "$VENV/bin/uv" ]; then lock; else
      "$VENV/bin/pip" install -q --disable-pip-version-check uv && lock; fi
  fi
  local stamp="$VENV/.ctbot-installed" want; want=$(cat pyproject.toml requirements/dev.txt | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "dev.sh: installing dependencies into $VENV (first run takes a few minutes)" >&2
    local pip=("$VENV/bin/pip" install -q --disable-pip-version-check)
    # shellcheck disable=SC2046
    "${pip[@]}" --require-hashes --no-deps $(torch_source pip) -r requirements/dev.txt
    "${pip[@]}" --no-deps --no-build-isolation -e .
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

# ---- images (podman) ----------------------------------------------------------------------
# Debian's podman, with the runc runtime (crun fails on this kernel's cgroup layout) and
# ulimits within the machine's hard limits (podman's defaults exceed them).
CONTAINERS_CONF=/etc/containers/containers.conf
setup_podman() {
  ensure_apt podman podman
  ensure_apt runc runc
  ensure_apt mmdebstrap mmdebstrap
  if ! grep -qs '^# ctbot: podman settings' "$CONTAINERS_CONF"; then
    if grep -qsE '^\[(engine|containers)\]' "$CONTAINERS_CONF"; then
      echo "dev.sh: $CONTAINERS_CONF has its own [engine]/[containers] tables; add there:" >&2
      echo '  [engine] runtime = "runc"; [containers] default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]' >&2
      exit 1
    fi
    echo "dev.sh: configuring podman in $CONTAINERS_CONF (runc, ulimits)" >&2
    as_root mkdir -p /etc/containers
    printf '%s\n' '# ctbot: podman settings (dev.sh)' '[containers]' \
      'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]' '[engine]' 'runtime = "runc"' \
      | as_root tee -a "$CONTAINERS_CONF" >/dev/null
  fi
}

# No registry is reachable: the base is Debian's python3 from Debian's packages, imported
# once. Elsewhere pass --build-arg PYTHON_IMAGE=python:3.11.11-slim-bookworm instead.
BASE_IMAGE=localhost/ctbot-base:bookworm-1
ensure_base_image() {
  podman image exists "$BASE_IMAGE" && return
  echo "dev.sh: making $BASE_IMAGE with mmdebstrap (once, a few minutes)" >&2
  local tar; tar=$(mktemp --suffix=.tar)
  # no manuals, docs or translations in an image (copyright files stay)
  as_root mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    bookworm "$tar" </dev/null
  podman import --change 'CMD ["python3"]' "$tar" "$BASE_IMAGE" >/dev/null
  rm -f "$tar"
}

# The check's Redis: Debian's redis-server on the same base (the manifests' redis:...-alpine
# lives on a registry this machine cannot reach).
CHECK_REDIS_IMAGE=localhost/ctbot-check-redis:bookworm
ensure_check_images() {
  ensure_base_image
  podman image exists "$CHECK_REDIS_IMAGE" && return
  echo "dev.sh: making $CHECK_REDIS_IMAGE (Debian's redis-server)" >&2
  local dir; dir=$(mktemp -d)
  printf '%s\n' "FROM $BASE_IMAGE" 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    'RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null && rm -rf /var/lib/apt/lists/*' \
    > "$dir/Containerfile"
  podman build -q --network host -t "$CHECK_REDIS_IMAGE" "$dir" >/dev/null
  rm -rf "$dir"
}

version() { "$(find_python)" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])'; }

# The machine's pip settings, carried into the build: its CA bundle (the index is reached
# through it) and its local wheel directory with torch's CPU wheel (torch's own index is
# unreachable here), mounted and used instead of that index.
build_images() {
  setup_podman; ensure_base_image
  local v; v=$(version)
  local ca; ca=$(pip_setting cert); ca=${ca:-/etc/ssl/certs/ca-certificates.crt}
  local args=(--network host --build-arg "PYTHON_IMAGE=$BASE_IMAGE" -v "$ca:/etc/ssl/certs/ca-certificates.crt:ro")
  local source; source=$(torch_source pip)
  if [ "${source%% *}" = --find-links ]; then
    args+=(-v "${source#--find-links }:/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels --build-arg TORCH_INDEX=)
  fi
  for target in bot trainer; do
    local name=ctbot; [ "$target" = trainer ] && name=ctbot-trainer
    local t0=$SECONDS
    podman build -q "${args[@]}" --target "$target" -t "$name:$v" . >/dev/null
    printf 'images: %-22s %5s MB, built in %ss\n' "$name:$v" \
      "$(( $(podman image inspect --format '{{.Size}}' "$name:$v") / 1000000 ))" "$(( SECONDS - t0 ))"
  done
}

# One of the machine's pip settings (`pip config list`), empty when unset.
pip_setting() {
  local pip=("$VENV/bin/pip"); [ -x "$VENV/bin/pip" ] || pip=("$(find_python)" -m pip)
  "${pip[@]}" config list 2>/dev/null | sed -n "s/^global\.$1='\(.*\)'$/\1/p" | head -1
}

# Where torch's CPU wheel comes from: the machine's local wheel directory when it holds
# it, else torch's own index. Prints pip's (or, with "uv", uv's) arguments.
torch_source() {
  local links; links=$(pip_setting find-links)
  if [ -n "$links" ] && compgen -G "$links/torch-2.13.0+cpu-*.whl" >/dev/null; then
    echo "--find-links $links"
  elif [ "$1" = uv ]; then
    echo "--extra-index-url ${TORCH_INDEX:-https://download.pytorch.org/whl/cpu} --index-strategy unsafe-best-match"
  else
    echo "--extra-index-url ${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
  fi
}

# What the locks were resolved from: pyproject.toml's dependency lists (not its other
# settings), and the digest each lock records of them.
deps_digest() {
  "$(find_python)" -c 'import hashlib, json, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(hashlib.sha256(json.dumps([p["dependencies"], p["optional-dependencies"]], sort_keys=True).encode()).hexdigest()[:16])'
}
lock_digest() { sed -n 's/^# resolved from pyproject.toml dependencies \([0-9a-f]*\)$/\1/p' requirements/dev.txt 2>/dev/null; }

# ---- lock files -------------------------------------------------------------------------
# requirements/*.txt: every package pinned with its hashes, one lock per image (bot,
# trainer) and one for development, resolved from pyproject.toml. The trainer's is
# resolved first and the others are held to its versions, so a package is the same
# version in every image and here. The machine's pip constraints apply, and torch's CPU
# wheel comes from the local wheel directory when it holds one, else from torch's index.
lock() {
  local uv="$VENV/bin/uv" out=requirements
  [ -x "$uv" ] || setup
  local cert; cert=$(pip_setting cert)
  local constraint; constraint=$(pip_setting constraint)
  local common=(--quiet --generate-hashes --python-version 3.11 --python-platform x86_64-unknown-linux-gnu
                --custom-compile-command './dev.sh lock')
  [ -n "$constraint" ] && [ -f "$constraint" ] && common+=(--constraint "$constraint")
  # shellcheck disable=SC2207
  common+=($(torch_source uv))
  export SSL_CERT_FILE=${cert:-${SSL_CERT_FILE:-}}
  "$uv" pip compile "${common[@]}" pyproject.toml $out/build.in --extra train -o $out/trainer.txt
  "$uv" pip compile "${common[@]}" pyproject.toml $out/build.in -c $out/trainer.txt -o $out/bot.txt
  "$uv" pip compile "${common[@]}" pyproject.toml $out/build.in --extra train --extra demo --extra test \
    -c $out/trainer.txt -o $out/dev.txt
  local digest; digest=$(deps_digest)
  for f in trainer bot dev; do echo "# resolved from pyproject.toml dependencies $digest" >> "$out/$f.txt"; done
  echo "dev.sh: wrote $out/{trainer,bot,dev}.txt; ./dev.sh setup installs dev.txt, ./dev.sh images the others" >&2
}

cmd=${1:-help}; shift || true
case "$cmd" in
  setup) setup ;;
  demo)  setup; exec "$VENV/bin/ctbot" demo "$@" ;;
  test)  setup; "$VENV/bin/ruff" check . ; exec "$VENV/bin/python" -m pytest "$@" ;;
  picture) setup; "$VENV/bin/ctbot" demo >/dev/null; exec "$VENV/bin/python" -m devkit.picture ;;
  bench) setup; for b in bench/bench_*.py; do echo "== $b $*"; "$VENV/bin/python" "$b" "$@"; done ;;
  serve) setup; exec "$VENV/bin/ctbot" serve "$@" ;;
  lock)  lock ;;
  images)
    if [ "${1:-}" = check ]; then
      setup; setup_podman; ensure_check_images
      exec "$VENV/bin/python" -m devkit.images_check "${@:2}"
    fi
    build_images ;;
  *) sed -n '2,11p' "$0"; exit 2 ;;
esac
