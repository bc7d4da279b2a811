#!/usr/bin/env bash
# Per-step training time of each quickstart method at 1 thread, two at a time (as
# `run --jobs 2 --threads 1` does), at the recipe's batch sizes. Prints the loop-average
# images/s (train_log.jsonl) and the load average.
cd "$(dirname "$0")/../.."
T() { tag=$1; m=$2; b=$3; n=$4
  .venv/bin/spheregen train experiments/tuning/base.toml --threads 1 --method $m --set name=\"qs-tune-time2-$tag\" \
    --set methods.$m.train.steps=$n --set methods.$m.train.batch_size=$b --set train.log_every=$n --fresh > /tmp/qs_time2_$tag.log 2>&1
  ips=$(tail -1 runs/qs-tune-time2-$tag/$m/train_log.jsonl | sed 's/.*"images_per_s": \([0-9.]*\).*/\1/')
  echo "$m batch=$b steps=$n img/s=$ips s/step=$(python3 -c "print(round($b/$ips,3))") load: $(uptime | sed 's/.*average: //')"
}
( T sl sphere-latent 64 80; T mf meanflow 64 80 ) &
( T fl fm-latent 64 120; T se sphere-encoder 16 40; T fp fm-pixel 32 80 ) &
wait
