#!/usr/bin/env bash
# Shared body of train3times_seeds_<N>p.sh: three seeds (0, 1, 666 -> fold1..fold3) of one method at N % labels,
# each fold tested (sliding window, A+B ensemble), then evaluated over the three folds (Q11, Q12 in
# docs/original-quirks.md).
# Usage: scripts/train3times.sh N -c GPU -t synapse|amos|phantom -m METHOD [-e SUFFIX] [-l LR] [-w W] [-- EXTRA TRAIN FLAGS]
# -c 0 runs one process on GPU 0 (the original's command); -c 0,1,2,3 trains and tests with
# torchrun --standalone --nproc_per_node 4 on those GPUs (2 + 2 patches per GPU: the global batch grows with them).
# Epochs come from config.py (200 for 2/5/10 %, 300 for 20/40 % on the real tasks, as the original scripts).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
ratio=$1; shift
gpu=0; task=synapse; method=dhc; suffix=""; lr=(); weight=()
usage() { echo "usage: $0 -c GPU[,GPU...] -t synapse|amos|phantom -m METHOD [-e SUFFIX] [-l LR] [-w W] [-- TRAIN FLAGS]" >&2; exit 2; }
while getopts "c:t:m:e:l:w:h" opt; do
  case $opt in
    c) gpu=$OPTARG ;; t) task=$OPTARG ;; m) method=$OPTARG ;; e) suffix=$OPTARG ;;
    l) lr=(--base_lr "$OPTARG") ;; w) weight=(-w "$OPTARG") ;; *) usage ;;
  esac
done
shift $((OPTIND - 1))
[ -f "code/train_${method}.py" ] || { echo "error: code/train_${method}.py: unknown method '${method}'" >&2; exit 2; }
[[ "$gpu" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "error: -c $gpu: expected GPU indices such as 0 or 0,1,2,3" >&2; exit 2; }
IFS=, read -r -a gpus <<< "$gpu"
if [ "${#gpus[@]}" -gt 1 ]; then  # one process per GPU; each sees its own as cuda:LOCAL_RANK
  export CUDA_VISIBLE_DEVICES="$gpu"
  launch=("$PY" -m torch.distributed.run --standalone --nproc_per_node "${#gpus[@]}")
  gpu_flag=()
else
  launch=("$PY")
  gpu_flag=(-g "$gpu")
fi
exp="Task_${task}_${ratio}p/${method}${suffix}"
read -r -a seeds <<< "${SEEDS:-0 1 666}"
fold=0
for seed in "${seeds[@]}"; do
  fold=$((fold + 1))
  echo "== ${method} on ${task}, ${ratio} % labels: fold ${fold} of ${#seeds[@]} (seed ${seed}): train, then test"
  "${launch[@]}" code/train_"${method}".py --task "$task" --exp "$exp/fold$fold" --seed "$seed" "${gpu_flag[@]}" \
    "${lr[@]}" "${weight[@]}" -sl "labeled_${ratio}p" -su "unlabeled_${ratio}p" -r "$@"
  "${launch[@]}" code/test.py --task "$task" --exp "$exp/fold$fold" "${gpu_flag[@]}" --cps AB
done
"$PY" code/evaluate_Ntimes.py --task "$task" --exp "$exp" --folds "$fold" --cps AB
