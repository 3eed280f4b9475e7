#!/usr/bin/env bash
# `make bench`: builds the load client, installs the Node anchors, runs bench/run.py and
# writes docs/benchmarks.md. BENCH_SCALE=small for a quick check (64 MiB, 100 connections);
# BENCH_ONLY=record,hook,upload,fanout,storm to run a subset (the doc is then not written).
set -euo pipefail
cd "$(dirname "$0")/.."
scale=${BENCH_SCALE:-full}
only=${BENCH_ONLY:-record,hook,upload,fanout,storm}

echo "bench: building bench/loadgen"
(cd bench/loadgen && CARGO_TARGET_DIR="$PWD/target" cargo build --release --quiet)
if [ ! -d bench/node/node_modules ]; then
  echo "bench: npm ci in bench/node"
  (cd bench/node && npm ci --silent --no-audit --no-fund)
fi
out=()
if [ "$only" = record,hook,upload,fanout,storm ] && [ "$scale" = full ]; then
  out=(--out docs/benchmarks.md)
fi
exec python3 bench/run.py --scale "$scale" --only "$only" --ext target/release/libupload_progress.so "${out[@]}"
