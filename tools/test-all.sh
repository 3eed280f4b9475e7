#!/usr/bin/env bash
# Runs every suite, whatever fails, and ends with one line `N passed, N failed`
# summing them all. Exit status: 0 only when nothing failed.
#
# PHP_VERSIONS (default "8.2 8.4") lists the PHP versions to test. 8.2 is the host's:
# every suite runs on it. Any other version runs the phpt and integration suites in a
# Debian root made and cached by tools/php-root.sh (build/phpNN/), where this script
# is run again with --leg. `PHP_VERSIONS=8.2 make test` skips those legs, and the
# package tests (tools/deb-test.sh) that otherwise close the run.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=$ROOT/build
mkdir -p "$BUILD"
HOST_VERSION=8.2
PHP_VERSIONS=${PHP_VERSIONS:-8.2 8.4}
passed=0; failed=0; summary=()

note() { # suite passed failed
  passed=$((passed + $2)); failed=$((failed + $3))
  summary+=("$(printf '%-16s %4d passed, %4d failed' "$1" "$2" "$3")")
  if [ -n "${LEG_NOTES:-}" ]; then printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$LEG_NOTES"; fi
}

gate() { # name command...: one check that passes or fails as a whole
  local name=$1; shift
  echo "== $name"
  if "$@"; then note "$name" 1 0; else note "$name" 0 1; fi
}

phpt() { # VERSION PHP EXT: the phpt suite with that PHP binary and extension
  local v=$1 php=$2 ext=$3 run_tests out p f b t0=$SECONDS
  echo "== PHP $v: phpt"
  run_tests=$(find "$(${PHP_CONFIG:-php-config} --extension-dir)/build" "$(dirname "$(${PHP_CONFIG:-php-config} --extension-dir)")" /usr/lib/php /usr/share/php -name run-tests.php 2>/dev/null | head -n1)
  if [ -z "$run_tests" ]; then
    echo "run-tests.php not found"; note "phpt $v" 0 1; return
  fi
  rm -rf "$BUILD/phpt-storage"
  out=$(TEST_PHP_EXECUTABLE=$(command -v "$php") TEST_PHP_CGI_EXECUTABLE=$(command -v "php-cgi$v" || command -v php-cgi) NO_INTERACTION=1 \
    "$php" "$run_tests" -q --show-diff -n -d "extension=$ext" -d "upload_progress.storage_dir=$BUILD/phpt-storage" tests/phpt 2>&1)
  echo "$out" | grep -E "^(PASS|FAIL|SKIP|BORK)|^Tests|^\-\-\-|^\+\+\+|^[0-9]+[-+]" | head -80
  p=$(echo "$out" | grep -E "^Tests passed" | grep -oE ":\s+[0-9]+" | grep -oE "[0-9]+" | head -1)
  f=$(echo "$out" | grep -E "^Tests failed" | grep -oE ":\s+[0-9]+" | grep -oE "[0-9]+" | head -1)
  b=$(echo "$out" | grep -cE "^BORK")
  note "phpt $v" "${p:-0}" "$(( ${f:-0} + b ))"
  echo "== PHP $v: phpt took $((SECONDS - t0)) s"
}

integration() { # VERSION EXT VENV: tests/integration (real nginx + php-fpmVERSION + hub)
  local v=$1 ext=$2 venv=$3 out rc p f t0=$SECONDS
  echo "== PHP $v: integration (pytest)"
  out=$(PHP_VERSION=$v UPLOAD_PROGRESS_EXT=$ext "$venv/bin/pytest" -q -m "not soak" tests/integration 2>&1); rc=$?
  echo "$out" | tail -40
  p=$(echo "$out" | tail -3 | grep -oE "[0-9]+ passed" | grep -oE "[0-9]+" | head -1)
  f=$(echo "$out" | tail -3 | grep -oE "[0-9]+ (failed|error)" | grep -oE "[0-9]+" | awk '{s+=$1} END {print s+0}')
  [ $rc -ne 0 ] && [ "${f:-0}" = 0 ] && f=1
  note "integration $v" "${p:-0}" "${f:-0}"
  echo "== PHP $v: integration took $((SECONDS - t0)) s"
}

if [ "${1:-}" = --leg ]; then
  # Inside a root made by tools/php-root.sh: PHP_VERSION, PHP and UPLOAD_PROGRESS_EXT are set.
  v=$PHP_VERSION; tag=php${v//./}
  phpt "$v" "$PHP" "$UPLOAD_PROGRESS_EXT"
  integration "$v" "$UPLOAD_PROGRESS_EXT" "$BUILD/$tag/venv"
  exit 0
fi

root_leg() { # VERSION: build the extension in the cached root, then phpt + integration there
  local v=$1 tag=php${1//./} t0=$SECONDS t1 t2 t3 notes
  echo "== PHP $v: root (tools/php-root.sh $v ensure)"
  if ! tools/php-root.sh "$v" ensure; then note "build $v" 0 1; return; fi
  t1=$SECONDS
  echo "== PHP $v: build (cargo build --release in the root, build/$tag/target)"
  if ! { tools/php-root.sh "$v" build && tools/php-root.sh "$v" venv; }; then
    note "build $v" 0 1; return
  fi
  note "build $v" 1 0
  t2=$SECONDS
  # The other direction of the API check: this build refused by the host's PHP.
  echo "== PHP $HOST_VERSION: refuses the PHP $v build"
  out=$(PHP_VERSION=$HOST_VERSION UPLOAD_PROGRESS_OTHER_EXT=$BUILD/$tag/target/release/libupload_progress.so \
    "$BUILD/venv/bin/pytest" -q tests/integration/test_php_versions.py -k another_php_api 2>&1)
  echo "$out" | tail -3
  if echo "$out" | tail -1 | grep -qE "^1 passed"; then note "api $v on $HOST_VERSION" 1 0; else note "api $v on $HOST_VERSION" 0 1; fi
  notes=$BUILD/$tag/notes; rm -f "$notes"
  # The host's build is handed in for the tests that load it into the other PHP.
  LEG_NOTES=$notes UPLOAD_PROGRESS_OTHER_EXT=$ROOT/target/release/libupload_progress.so \
    tools/php-root.sh "$v" run tools/test-all.sh --leg
  t3=$SECONDS
  if [ -s "$notes" ]; then
    while IFS=$'\t' read -r name p f; do note "$name" "$p" "$f"; done <"$notes"
  else
    note "phpt $v" 0 1
  fi
  echo "== PHP $v: times: root $((t1 - t0)) s, build $((t2 - t1)) s, phpt + integration $((t3 - t2)) s"
}

for v in $PHP_VERSIONS; do
  [ "$v" = "$HOST_VERSION" ] || continue
  PHP=${PHP:-php$HOST_VERSION}
  EXT=$ROOT/target/release/libupload_progress.so
  echo "== PHP $v: every suite, on the host ($($PHP -r 'echo PHP_VERSION;' 2>&1))"
  gate fmt cargo fmt --check
  gate clippy cargo clippy --quiet --all-targets -- -D warnings

  echo "== cargo test"
  out=$(cargo test 2>&1); rc=$?
  echo "$out" | grep -E "^test .* (FAILED|ok)$|test result|panicked|error" | grep -v " ok$" | tail -40
  p=$(echo "$out" | grep -oE "test result: [a-zA-Z]+\. [0-9]+ passed" | awk '{s+=$4} END {print s+0}')
  f=$(echo "$out" | grep -oE "[0-9]+ failed" | awk '{s+=$1} END {print s+0}')
  [ $rc -ne 0 ] && [ "$f" = 0 ] && f=1
  note "cargo" "$p" "$f"

  gate stubs bash -c "cargo php stubs --stdout 2>/dev/null | diff -u stubs/upload_progress.stub.php -"

  phpt "$v" "$PHP" "$EXT"
  integration "$v" "$EXT" "$BUILD/venv"

  if [ -f tests/browser/package.json ]; then
    echo "== browser (headless Chromium)"
    out=$(cd tests/browser && UPLOAD_PROGRESS_EXT=$EXT node run.mjs 2>&1); rc=$?
    echo "$out" | grep -E "^not ok|^# |browser:|Error" | tail -25
    line=$(echo "$out" | grep -E "^browser: [0-9]+ passed, [0-9]+ failed" | tail -1)
    p=$(echo "$line" | grep -oE "[0-9]+ passed" | grep -oE "[0-9]+")
    f=$(echo "$line" | grep -oE "[0-9]+ failed" | grep -oE "[0-9]+")
    [ $rc -ne 0 ] && [ "${f:-0}" = 0 ] && f=1
    note browser "${p:-0}" "${f:-0}"
  fi

done

for v in $PHP_VERSIONS; do
  [ "$v" = "$HOST_VERSION" ] || root_leg "$v"
done

# The Debian packages (make deb), each installed in a root of its version: on by default
# when other versions are tested, off for the quick host-only run (PACKAGE_TESTS=0/1).
if [ "${PACKAGE_TESTS:-auto}" = 1 ] || { [ "${PACKAGE_TESTS:-auto}" = auto ] && [ "$PHP_VERSIONS" != "$HOST_VERSION" ]; }; then
  t0=$SECONDS
  echo "== packages: make deb, then tools/deb-test.sh ($PHP_VERSIONS)"
  if make --no-print-directory -s deb; then
    out=$(tools/deb-test.sh $PHP_VERSIONS 2>&1); rc=$?
    echo "$out" | tail -40
    line=$(echo "$out" | grep -E "^[0-9]+ passed, [0-9]+ failed" | tail -1)
    p=$(echo "$line" | grep -oE "^[0-9]+"); f=$(echo "$line" | grep -oE "[0-9]+ failed" | grep -oE "[0-9]+")
    [ $rc -ne 0 ] && [ "${f:-0}" = 0 ] && f=1
    note packages "${p:-0}" "${f:-0}"
  else
    note packages 0 1
  fi
  echo "== packages took $((SECONDS - t0)) s"
fi

echo
printf '%s\n' "${summary[@]}"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
