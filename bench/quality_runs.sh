#!/usr/bin/env bash
# The Amazon quality table of docs/benchmarks.md, one command per row, from a fresh clone with ../shared
# beside it: builds what it needs (the venv, the RQ-VAE semantic-ID table), trains from the shipped
# config (Beauty: configs/amazon.toml; Sports: configs/amazon_sports.toml, which extends it) with one
# step budget for every row (equal work, not equal time: the machines are shared), evaluates the test
# split with fair-eval (the service's search) and prints the test metrics JSON (fair-eval's keys) as
# its last line.
#
#   bash bench/quality_runs.sh beauty fair        # one row: the shipped FAIR configuration
#   bash bench/quality_runs.sh beauty             # every Beauty row: fair standard no_robust no_mi
#   bash bench/quality_runs.sh sports fair standard
#
# The semantic-ID table is built with one torch thread (bit-reproducible; what the table in the docs used).
#
# Environment: OUT (default runs/quality), STEPS (default: the config's max_steps), THREADS (torch
# threads per run, default 2), SHARED (default ../shared/data/amazon), SEED (train.seed; unset = the
# config's seed, 0; a run with SEED=N is named <dataset>_<row>_sN, so seeds of one row sit side by side),
# EXTRA (space-separated section.key=value overrides added to every row as --set, e.g.
# EXTRA="train.softmax=sampled train.num_negatives=1024"; give such runs their own OUT).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: $0 beauty|sports [fair|standard|no_robust|no_mi ...]" >&2; exit 2; }
case "${1:-}" in
  beauty) DATA=Beauty; CONFIG=configs/amazon.toml; DEFAULT_ROWS="fair standard no_robust no_mi" ;;
  sports) DATA=Sports; CONFIG=configs/amazon_sports.toml; DEFAULT_ROWS="fair standard" ;;
  *) usage ;;
esac
DATASET=$1; shift
ROWS=${*:-$DEFAULT_ROWS}
THREADS=${THREADS:-2}
SHARED=${SHARED:-../shared/data/amazon}
OUT=${OUT:-runs/quality}
[ -d "$SHARED/$DATA" ] || { echo "$0: no $SHARED/$DATA (set SHARED=...)" >&2; exit 2; }
for row in $ROWS; do
  case $row in fair|standard|no_robust|no_mi) ;; *) echo "$0: unknown row '$row'" >&2; usage ;; esac
done

[ -x .venv/bin/python ] || make install >&2
mkdir -p "$OUT"
log() { echo "$(date +%T) $*" | tee -a "$OUT/runs.log" >&2; }

SID="$OUT/sid/${DATASET}_rqvae.npz"
if [ ! -f "$SID" ]; then
  log "building the semantic-ID table $SID (MiniLM + RQ-VAE)"
  t0=$SECONDS
  .venv/bin/fair-sid build --data "$SHARED/$DATA" --out "$SID" --method rqvae --threads 1 --quiet >&2
  log "semantic IDs built in $((SECONDS - t0)) s"
fi

steps=()
[ -n "${STEPS:-}" ] && steps=(--set "train.max_steps=$STEPS")
seed=()
suffix=
if [ -n "${SEED:-}" ]; then
  [[ $SEED =~ ^[0-9]+$ ]] || { echo "$0: SEED must be a non-negative integer, got '$SEED'" >&2; exit 2; }
  seed=(--set "train.seed=$SEED")
  suffix=_s$SEED
fi

overrides=()
read -r -a extra_items <<< "${EXTRA:-}"
for item in "${extra_items[@]}"; do overrides+=(--set "$item"); done

for row in $ROWS; do
  case $row in
    fair) extra=() ;;
    standard) extra=(--set model.attention=standard) ;;
    no_robust) extra=(--set train.robust=false) ;;
    no_mi) extra=(--set train.mi=false) ;;
  esac
  name="${DATASET}_${row}${suffix}"
  rm -rf "${OUT:?}/$name"
  log "train $name (threads $THREADS ${STEPS:+steps $STEPS}${SEED:+ seed $SEED}${EXTRA:+ set $EXTRA})"
  t0=$SECONDS
  .venv/bin/python -m model.train.cli --data "$SHARED/$DATA" --sid "$SID" --out "$OUT/$name" \
    --config "$CONFIG" --threads "$THREADS" --no-final-eval --quiet "${steps[@]}" "${seed[@]}" "${extra[@]}" \
    "${overrides[@]}" \
    > "$OUT/$name.out" 2>&1 || { tail -n 20 "$OUT/$name.out" >&2; exit 1; }
  log "trained $name in $((SECONDS - t0)) s"
  t0=$SECONDS
  .venv/bin/python -m model.evaluate.cli --run "$OUT/$name" --data "$SHARED/$DATA" --split test --json \
    > "$OUT/$name.test.txt" 2>&1 || { tail -n 20 "$OUT/$name.test.txt" >&2; exit 1; }
  log "evaluated $name in $((SECONDS - t0)) s: $(tail -n 1 "$OUT/$name.test.txt")"
done
tail -n 1 "$OUT/$name.test.txt"
