#!/usr/bin/env bash
# A Debian root with another PHP than the host's (PHP 8.4 from Debian 13 "trixie" on this
# Debian 12 machine), made with mmdebstrap from Debian's packages and cached under
# build/phpNN/root. Commands run in it through `unshare` (private mount and PID
# namespaces) + `chroot`, with the repository bind-mounted at its own absolute path and
# the host's Rust toolchain bind-mounted read-only.
#
# Usage: tools/php-root.sh VERSION ensure     make the root unless a current one is cached
#        tools/php-root.sh VERSION build      cargo build --release into build/phpNN/target
#        tools/php-root.sh VERSION venv       Python test tools in build/phpNN/venv
#        tools/php-root.sh VERSION run CMD..  run CMD in the root (cwd: the repository)
#        tools/php-root.sh VERSION shell      interactive shell in the root
#        tools/php-root.sh VERSION remove     delete the root (refuses while anything is mounted in it)
#
# PHP_ROOT_NET=private gives `run` its own network namespace with only a loopback, so
# stock configurations (nginx on :80, the hub on :6001) run there without touching
# the host's ports; by default the host's network (loopback) is shared.
#
# Safety: every mount is made inside a private mount namespace, so none is ever visible
# on the host and all of them vanish with the namespace, even after `kill -9`; the
# namespace's PID 1 is our shell, so every process started in the root (php-fpm, nginx,
# redis, the hub) is killed by the kernel when a command ends. The root is only deleted
# after checking that nothing is mounted below it, with `rm --one-file-system`.
set -euo pipefail

VERSION=${1:?usage: tools/php-root.sh VERSION ensure|build|venv|run|shell|remove}
ACTION=${2:?usage: tools/php-root.sh VERSION ensure|build|venv|run|shell|remove}
shift 2

# What a package test needs (tools/deb-test.sh); a test leg also builds the extension.
RUNTIME=(php$VERSION-cli php$VERSION-fpm nginx-light python3 python3-venv procps curl ca-certificates)
case $VERSION in
  # The host's own PHP: a root of it only serves the package tests.
  8.2) SUITE=bookworm; PKGS=("${RUNTIME[@]}") ;;
  8.4) SUITE=trixie
       PKGS=("${RUNTIME[@]}" php$VERSION-dev php$VERSION-cgi redis-server clang libclang-dev gcc libc6-dev) ;;
  *) echo "php-root: no Debian suite known for PHP $VERSION" >&2; exit 2 ;;
esac

REPO=$(cd "$(dirname "$0")/.." && pwd -P)
TAG=php${VERSION//./}
DIR=$REPO/build/$TAG
R=$DIR/root
TARGET=$DIR/target
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOST_CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
SYSROOT=$(rustc --print sysroot)

# The stamp names what the root was made from: a changed list makes a new root.
STAMP="suite=$SUITE pkgs=${PKGS[*]}"

say() { echo "php-root[$VERSION]: $*" >&2; }

mounts_below() { # prints mount points at or below $1 in this mount namespace
  awk -v d="$1" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/self/mounts
}

procs_in() { # pids of processes whose root directory is $1
  local p
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/root" 2>/dev/null)" = "$1" ] && echo "${p#/proc/}"
  done
  return 0
}

safe_remove() { # deletes a root directory, never through a mount
  local d=$1 m pids
  [ -e "$d" ] || return 0
  d=$(realpath "$d")
  m=$(mounts_below "$d")
  if [ -n "$m" ]; then
    say "refusing to delete $d: mounted below it: $m"; return 1
  fi
  pids=$(procs_in "$d")
  if [ -n "$pids" ]; then
    say "stopping processes left in $d: $pids"
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 1
  fi
  rm -rf --one-file-system "$d"
}

ensure() {
  if [ -f "$R/.upload-progress-root" ] && [ "$(cat "$R/.upload-progress-root")" = "$STAMP" ]; then
    say "cached root $R"
    return 0
  fi
  command -v mmdebstrap >/dev/null || { say "mmdebstrap missing (tools/deps.sh test installs it)"; return 1; }
  safe_remove "$R"
  safe_remove "$R.tmp"
  mkdir -p "$DIR"
  say "making a Debian $SUITE root with PHP $VERSION (mmdebstrap, ~2 min)"
  local inc t0=$SECONDS
  inc=$(IFS=,; echo "${PKGS[*]}")
  # In a private mount namespace: mmdebstrap's own /proc, /dev mounts can never stay behind.
  if ! unshare --mount --propagation private -- mmdebstrap --quiet --mode=root --variant=apt \
      --aptopt='Acquire::Retries "3"' \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --include="$inc" "$SUITE" "$R.tmp" "$MIRROR" >"$DIR/mmdebstrap.log" 2>&1; then
    tail -20 "$DIR/mmdebstrap.log" >&2
    safe_remove "$R.tmp"
    return 1
  fi
  echo "$STAMP" >"$R.tmp/.upload-progress-root"
  mv "$R.tmp" "$R"
  say "root made in $((SECONDS - t0)) s"
}

mounted=()
inside() { # PID 1 of the new namespaces: mount, chroot, run, unmount
  cleanup() {
    local i
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[$i]}" 2>/dev/null || true; done
  }
  trap cleanup EXIT
  bind() { # SRC DST [ro]
    [ -e "$2" ] || mkdir -p "$2"
    mount --bind "$1" "$2"; mounted+=("$2")
    if [ "${3:-}" = ro ]; then mount -o remount,bind,ro "$2"; fi
  }
  if [ "${PHP_ROOT_NET:-}" = private ]; then ip link set lo up; fi
  mount -t proc proc "$R/proc"; mounted+=("$R/proc")
  mount --rbind /dev "$R/dev"; mounted+=("$R/dev")
  mount --make-rprivate "$R/dev"
  bind "$REPO" "$R$REPO"
  bind "$SYSROOT" "$R$SYSROOT" ro
  cp /etc/resolv.conf "$R/etc/resolv.conf" 2>/dev/null || true
  # The root trusts the CAs the host trusts (a site may add its own, e.g. for a proxy).
  if [ -f /etc/ssl/certs/ca-certificates.crt ] && [ -f "$R/etc/ssl/certs/ca-certificates.crt" ]; then
    bind /etc/ssl/certs/ca-certificates.crt "$R/etc/ssl/certs/ca-certificates.crt" ro
  fi
  mkdir -p "$R$HOST_CARGO_HOME"
  local envs=(HOME=/root TERM="${TERM:-dumb}" LANG=C.UTF-8 CI="${CI:-}"
    PATH="$SYSROOT/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    CARGO_HOME="$HOST_CARGO_HOME" CARGO_TARGET_DIR="$TARGET" CARGO_TERM_COLOR=never
    PHP_CONFIG="/usr/bin/php-config$VERSION" PHP="/usr/bin/php$VERSION" PHP_VERSION="$VERSION"
    UPLOAD_PROGRESS_EXT="$TARGET/release/libupload_progress.so"
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1)
  local v
  for v in $(compgen -e); do
    case $v in UPLOAD_PROGRESS_*|PYTEST_*|PROPTEST_*|LEG_*|RUST_*|PIP_INDEX_URL|PIP_DEFAULT_TIMEOUT|DEB) [ "$v" = UPLOAD_PROGRESS_EXT ] || envs+=("$v=${!v}") ;; esac
  done
  # Not exec'd: this shell stays PID 1 and reaps orphans (the hub's double fork).
  chroot "$R" /usr/bin/env -i "${envs[@]}" /bin/bash -c 'cd "$1" && shift && "$@"' _ "$REPO" "$@"
}

run() {
  [ -f "$R/.upload-progress-root" ] || { say "no root yet: tools/php-root.sh $VERSION ensure"; return 1; }
  # --kill-child: if we are killed, the namespace's PID 1 dies and the kernel ends the rest.
  local net=()
  if [ "${PHP_ROOT_NET:-}" = private ]; then net=(--net); fi
  unshare --mount --pid --fork --propagation private --kill-child "${net[@]}" -- "$0" "$VERSION" __inside "$@"
}

build() {
  mkdir -p "$TARGET"
  # Seed from the host's release build: the registry crates compile the same for both
  # (same rustc, same absolute paths), only ext-php-rs (bindings) and this crate are redone.
  if [ ! -d "$TARGET/release/deps" ] && [ -d "$REPO/target/release/deps" ]; then
    say "seeding $TARGET from target/release"
    cp -a "$REPO/target/release" "$TARGET/"
  fi
  if [ ! -d "$R$HOST_CARGO_HOME/registry/cache" ] && [ -d "$HOST_CARGO_HOME/registry/cache" ]; then
    # Copies, not binds: cargo writes there (locks, extracted sources).
    mkdir -p "$R$HOST_CARGO_HOME/registry"
    cp -a "$HOST_CARGO_HOME/registry/index" "$HOST_CARGO_HOME/registry/cache" "$R$HOST_CARGO_HOME/registry/" 2>/dev/null || true
  fi
  run cargo build --release --locked --quiet
}

venv() {
  local py=$DIR/venv/bin/python
  if [ -x "$DIR/venv/bin/pytest" ] && run "$py" -c 'import websockets' 2>/dev/null; then return 0; fi
  say "creating $DIR/venv (pytest, websockets)"
  run python3 -m venv "$DIR/venv"
  run "$DIR/venv/bin/pip" install -q --disable-pip-version-check pytest==8.3.4 websockets==13.1
}

case $ACTION in
  ensure) ensure ;;
  build) build ;;
  venv) venv ;;
  run) run "$@" ;;
  shell) run bash -i ;;
  remove) safe_remove "$R.tmp"; safe_remove "$R" ;;
  __inside) inside "$@" ;;
  *) echo "php-root: unknown action $ACTION" >&2; exit 2 ;;
esac
