#!/usr/bin/env bash
# The Amazon quality table of docs/benchmarks.md: every run gets the same step budget (not a time
# budget: on a shared machine a time budget gives runs unequal amounts of training).
#   bash bench/quality_runs.sh beauty   # FAIR, standard attention, no L_robust, no L_mi on Beauty
#   bash bench/quality_runs.sh sports   # FAIR and standard attention on Sports
# Needs the semantic-ID tables runs/sid/{beauty,sports}_rqvae.npz (fair-sid build --method rqvae).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-4000}
THREADS=${THREADS:-1}
SHARED=${SHARED:-../shared/data/amazon}
OUT=${OUT:-runs/quality}
mkdir -p "$OUT"

run() { # name dataset extra-args...
  local name=$1 data=$2; shift 2
  local sid="runs/sid/$(echo "$data" | tr 'A-Z' 'a-z')_rqvae.npz"
  rm -rf "$OUT/$name"
  echo "$(date +%T) start $name" >> "$OUT/runs.log"
  local t0=$SECONDS
  .venv/bin/python -m model.train.cli --data "$SHARED/$data" --sid "$sid" --out "$OUT/$name" \
    --config configs/cpu_small.toml --threads "$THREADS" --no-final-eval --quiet \
    --set train.budget_minutes=0 --set train.max_steps="$STEPS" --set train.eval_every=500 "$@" \
    > "$OUT/$name.out" 2>&1
  echo "$(date +%T) end $name train_seconds=$((SECONDS - t0))" >> "$OUT/runs.log"
  .venv/bin/python -m model.evaluate.cli --run "$OUT/$name" --data "$SHARED/$data" --split test --json \
    > "$OUT/$name.test.txt" 2>&1
  echo "$(date +%T) evaluated $name: $(tail -n 1 "$OUT/$name.test.txt")" >> "$OUT/runs.log"
}

case "${1:-}" in
  beauty)
    run beauty_fair Beauty
    run beauty_standard Beauty --set model.attention=standard
    run beauty_no_robust Beauty --set train.robust=false
    run beauty_no_mi Beauty --set train.mi=false
    ;;
  sports)
    run sports_fair Sports
    run sports_standard Sports --set model.attention=standard
    ;;
  *) echo "usage: $0 beauty|sports" >&2; exit 2 ;;
esac
