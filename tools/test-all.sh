#!/usr/bin/env bash
# Runs every suite, whatever fails, and ends with one line `N passed, N failed`
# summing them all. Exit status: 0 only when nothing failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=$ROOT/build
mkdir -p "$BUILD"
EXT=$ROOT/target/release/libupload_progress.so
PHP=${PHP:-php8.2}
passed=0; failed=0; summary=()

note() { # suite passed failed
  passed=$((passed + $2)); failed=$((failed + $3))
  summary+=("$(printf '%-12s %4d passed, %4d failed' "$1" "$2" "$3")")
}

gate() { # name command...: one check that passes or fails as a whole
  local name=$1; shift
  echo "== $name"
  if "$@"; then note "$name" 1 0; else note "$name" 0 1; fi
}

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

echo "== phpt"
RUN_TESTS=$(find "$(php-config --extension-dir)/build" "$(dirname "$(php-config --extension-dir)")" /usr/lib/php /usr/share/php -name run-tests.php 2>/dev/null | head -n1)
if [ -z "$RUN_TESTS" ]; then
  echo "run-tests.php not found"; note phpt 0 1
else
  rm -rf "$BUILD/phpt-storage"
  out=$(TEST_PHP_EXECUTABLE=$(command -v $PHP) TEST_PHP_CGI_EXECUTABLE=$(command -v php-cgi8.2 || command -v php-cgi) NO_INTERACTION=1 \
    $PHP "$RUN_TESTS" -q --show-diff -n -d "extension=$EXT" -d "upload_progress.storage_dir=$BUILD/phpt-storage" tests/phpt 2>&1)
  echo "$out" | grep -E "^(PASS|FAIL|SKIP|BORK)|^Tests|^\-\-\-|^\+\+\+|^[0-9]+[-+]" | head -80
  p=$(echo "$out" | grep -E "^Tests passed" | grep -oE ":\s+[0-9]+" | grep -oE "[0-9]+" | head -1)
  f=$(echo "$out" | grep -E "^Tests failed" | grep -oE ":\s+[0-9]+" | grep -oE "[0-9]+" | head -1)
  b=$(echo "$out" | grep -cE "^BORK")
  note phpt "${p:-0}" "$(( ${f:-0} + b ))"
fi

echo "== integration (pytest)"
out=$(UPLOAD_PROGRESS_EXT=$EXT "$BUILD/venv/bin/pytest" -q -m "not soak" tests/integration 2>&1); rc=$?
echo "$out" | tail -40
p=$(echo "$out" | tail -3 | grep -oE "[0-9]+ passed" | grep -oE "[0-9]+" | head -1)
f=$(echo "$out" | tail -3 | grep -oE "[0-9]+ (failed|error)" | grep -oE "[0-9]+" | awk '{s+=$1} END {print s+0}')
[ $rc -ne 0 ] && [ "${f:-0}" = 0 ] && f=1
note integration "${p:-0}" "${f:-0}"

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

echo
printf '%s\n' "${summary[@]}"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
