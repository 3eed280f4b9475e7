#!/usr/bin/env bash
# Installs each package of build/deb into a Debian root of its PHP version (made and
# cached by tools/php-root.sh: Debian 12 for 8.2, Debian 13 for 8.4) and runs
# tests/packaging/test_deb.py there, in a private network namespace (stock ports,
# nothing on the host's). Ends with `N passed, N failed` over all versions.
# Usage: tools/deb-test.sh [VERSION...]   (default: $PHP_VERSIONS, else "8.2 8.4")
set -uo pipefail
cd "$(dirname "$0")/.."
versions=${*:-${PHP_VERSIONS:-8.2 8.4}}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
passed=0; failed=0
for v in $versions; do
  deb=build/deb/php$v-upload-progress_${version}_$(dpkg --print-architecture).deb
  echo "== PHP $v: package test ($deb)"
  if [ ! -f "$deb" ]; then echo "missing $deb (make deb)"; failed=$((failed + 1)); continue; fi
  if ! { tools/php-root.sh "$v" ensure && tools/php-root.sh "$v" venv; }; then failed=$((failed + 1)); continue; fi
  out=$(PHP_ROOT_NET=private DEB=$PWD/$deb tools/php-root.sh "$v" run \
    "build/php${v//./}/venv/bin/pytest" -q -p no:cacheprovider tests/packaging/test_deb.py 2>&1); rc=$?
  echo "$out" | tail -30
  p=$(echo "$out" | tail -3 | grep -oE "[0-9]+ passed" | grep -oE "[0-9]+" | head -1)
  f=$(echo "$out" | tail -3 | grep -oE "[0-9]+ (failed|error)" | grep -oE "[0-9]+" | awk '{s+=$1} END {print s+0}')
  s=$(echo "$out" | tail -3 | grep -oE "[0-9]+ skipped" | grep -oE "[0-9]+" | head -1)
  [ "${s:-0}" != 0 ] && f=$((${f:-0} + s))  # a skip here means the test did not run where it must
  [ $rc -ne 0 ] && [ "${f:-0}" = 0 ] && f=1
  passed=$((passed + ${p:-0})); failed=$((failed + ${f:-0}))
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
