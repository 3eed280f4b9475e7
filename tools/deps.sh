#!/usr/bin/env bash
# Installs what building, testing and the demo need on Debian 12, idempotently
# and quietly when everything is present. Usage: tools/deps.sh [build|test|bench|demo]
set -euo pipefail
what=${1:-test}
cd "$(dirname "$0")/.."

apt_pkgs=(php8.2-dev php8.2-cli php8.2-fpm php8.2-cgi clang libclang-dev nginx-light curl ca-certificates)
case $what in
  test|bench) apt_pkgs+=(redis-server chromium python3-venv) ;;
esac
case $what in
  bench) apt_pkgs+=(php8.2-redis php8.2-apcu) ;;
esac
# Other PHP versions are tested in a Debian root that tools/php-root.sh makes with mmdebstrap.
if [ "$what" = test ] && [ "${PHP_VERSIONS:-8.2 8.4}" != 8.2 ]; then
  apt_pkgs+=(mmdebstrap iproute2 binutils)
fi

missing=()
for p in "${apt_pkgs[@]}"; do
  # nginx-light or full nginx both provide the binary.
  if [ "$p" = nginx-light ] && [ -x /usr/sbin/nginx ]; then continue; fi
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ "$what" = test ] || [ "$what" = bench ]; then
  # Python test tools live in a venv under build/ so the system stays untouched.
  if [ ! -x build/venv/bin/pytest ] || ! build/venv/bin/python -c 'import websockets' 2>/dev/null; then
    echo "deps: creating build/venv (pytest, websockets)"
    python3 -m venv build/venv
    build/venv/bin/pip install -q --disable-pip-version-check pytest==8.3.4 websockets==13.1
  fi
  if ! cargo php --help >/dev/null 2>&1; then
    echo "deps: installing cargo-php"
    cargo install -q --locked cargo-php
  fi
  if [ -f tests/browser/package.json ] && [ ! -d tests/browser/node_modules ]; then
    echo "deps: npm ci in tests/browser"
    (cd tests/browser && npm ci --silent --no-audit --no-fund)
  fi
  # The official Pusher server SDK and pusher-js for tests/integration/test_pusher_api.py.
  if [ -f tests/integration/pusher_sdk/package.json ] && [ ! -d tests/integration/pusher_sdk/node_modules ]; then
    echo "deps: npm ci in tests/integration/pusher_sdk"
    (cd tests/integration/pusher_sdk && npm ci --silent --no-audit --no-fund)
  fi
fi
