#!/usr/bin/env bash
# Shared body of train3times_seeds_<N>p.sh: three seeds (0, 1, 666 -> fold1..fold3) of one method at N % labels,
# each fold tested (sliding window, A+B ensemble), then evaluated over the three folds (Q11, Q12).
# Usage: scripts/train3times.sh N -c GPU -t synapse|amos|phantom -m METHOD [-e SUFFIX] [-l LR] [-w W] [-- EXTRA TRAIN FLAGS]
# Epochs come from config.py (200 for 2/5/10 %, 300 for 20/40 % on the real tasks, as the original scripts).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
ratio=$1; shift
gpu=0; task=synapse; method=dhc; suffix=""; lr=(); weight=()
usage() { echo "usage: $0 -c GPU -t synapse|amos|phantom -m METHOD [-e SUFFIX] [-l LR] [-w W] [-- TRAIN FLAGS]" >&2; exit 2; }
while getopts "c:t:m:e:l:w:h" opt; do
  case $opt in
    c) gpu=$OPTARG ;; t) task=$OPTARG ;; m) method=$OPTARG ;; e) suffix=$OPTARG ;;
    l) lr=(--base_lr "$OPTARG") ;; w) weight=(-w "$OPTARG") ;; *) usage ;;
  esac
done
shift $((OPTIND - 1))
[ -f "code/train_${method}.py" ] || { echo "error: code/train_${method}.py: unknown method '${method}'" >&2; exit 2; }
exp="Task_${task}_${ratio}p/${method}${suffix}"
read -r -a seeds <<< "${SEEDS:-0 1 666}"
fold=0
for seed in "${seeds[@]}"; do
  fold=$((fold + 1))
  echo "== ${method} on ${task}, ${ratio} % labels: fold ${fold} of ${#seeds[@]} (seed ${seed}): train, then test"
  "$PY" code/train_"${method}".py --task "$task" --exp "$exp/fold$fold" --seed "$seed" -g "$gpu" "${lr[@]}" \
    "${weight[@]}" -sl "labeled_${ratio}p" -su "unlabeled_${ratio}p" -r "$@"
  "$PY" code/test.py --task "$task" --exp "$exp/fold$fold" -g "$gpu" --cps AB
done
"$PY" code/evaluate_Ntimes.py --task "$task" --exp "$exp" --folds "$fold" --cps AB
