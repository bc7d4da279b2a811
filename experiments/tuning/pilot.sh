#!/usr/bin/env bash
# One pilot: train + sample + score one quickstart method at 1 thread under its own
# experiment name (runs/qs-tune-TAG/), logging load and wall time.
# usage: experiments/tuning/pilot.sh TAG METHOD [--set KEY=VALUE ...]
set -u
cd "$(dirname "$0")/../.."
tag=$1; method=$2; shift 2
log=experiments/tuning/logs/$tag.log
mkdir -p experiments/tuning/logs
{
  echo "# $(date -Is) pilot $tag method=$method $*"
  echo "# load before: $(uptime)"
  start=$(date +%s)
  /usr/bin/time -f "# time: wall=%e user=%U sys=%S cpu=%P" .venv/bin/spheregen run experiments/tuning/base.toml --threads 1 --method "$method" \
    --set name=\"qs-tune-$tag\" --set eval.num_samples=500 "$@"
  rc=$?
  echo "# rc=$rc wall=$(( $(date +%s) - start ))s"
  echo "# load after: $(uptime)"
} > "$log" 2>&1
