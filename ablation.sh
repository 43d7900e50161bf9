#!/usr/bin/env bash
# The ablation: five encoder configurations, each adding one pitch switch, times several seeds,
# trained with the small CPU preset, then decoded on the test split and tabulated.
#
#   ./ablation.sh [DATA_DIR] [OUT]      e.g. ./ablation.sh data out/ablation
#   SEEDS="0 1 2" JOBS=2 ./ablation.sh  (JOBS runs at once, one thread each)
#
# DATA_DIR holds FLEURS-layout data (downloaded, or served: FLEURS_BASE_URL=http://host:port/ ...).
set -euo pipefail
data_dir=${1:-data}
out=${2:-out/ablation}
seeds=${SEEDS:-0 1 2}
jobs=${JOBS:-2}
mkdir -p "$out"
configs=("std|" "mel|--rope mel" "mel-radii|--rope mel --radii" "mel-radii-theta|--rope mel --radii --theta_mod"
         "all|--rope mel --radii --theta_mod --pitch_bias")
runs=()
for seed in $seeds; do
  for c in "${configs[@]}"; do
    runs+=("$out/${c%%|*}-seed$seed|--seed $seed ${c#*|}")
  done
done
printf '%s\n' "${runs[@]}" | OMP_NUM_THREADS=1 xargs -P "$jobs" -I{} bash -c '
  run="${1%%|*}"; flags="${1#*|}"
  [ -f "$run/eval_test_best.json" ] && exit 0   # finished earlier: skip
  resume=""; [ -f "$run/last.pt" ] && resume="--resume"
  python train.py --preset small --data_dir "$0" --out_dir "$run" $resume $flags > "$run.log" 2>&1
  python eval.py --ckpt "$run/best.pt" --split test >> "$run.log" 2>&1
' "$data_dir" {}
python eval.py --compare "$out"/*/
