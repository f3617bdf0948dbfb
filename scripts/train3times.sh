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
# JOBS=N (default 1) trains N folds side by side, each process on OMP_NUM_THREADS (default 1) threads, then tests
# them one after the other: on a CPU, single-threaded runs side by side learn more per second than one run on all
# cores (docs/benchmark/phantom_20p.md). Each side-by-side fold's output goes to logs/<exp>/fold<k>.out.
jobs=${JOBS:-1}
[[ "$jobs" =~ ^[1-9][0-9]*$ ]] || { echo "error: JOBS=$jobs: expected a positive integer" >&2; exit 2; }
log_dir="${DHC_LOG_ROOT:-logs}/$exp"
train_fold() {  # FOLD SEED [EXTRA TRAIN FLAGS]
  local k=$1 s=$2
  shift 2
  "${launch[@]}" code/train_"${method}".py --task "$task" --exp "$exp/fold$k" --seed "$s" "${gpu_flag[@]}" \
    "${lr[@]}" "${weight[@]}" -sl "labeled_${ratio}p" -su "unlabeled_${ratio}p" -r "$@"
}
fold=0
if [ "$jobs" -gt 1 ]; then
  mkdir -p "$log_dir"
  pids=()
  for seed in "${seeds[@]}"; do
    fold=$((fold + 1))
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
    echo "== ${method} on ${task}, ${ratio} % labels: fold ${fold} of ${#seeds[@]} (seed ${seed}) training" \
         "in the background (${log_dir}/fold${fold}.out)"
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} train_fold "$fold" "$seed" "$@" > "${log_dir}/fold${fold}.out" 2>&1 &
    pids+=($!)
  done
  failed=""
  for k in "${!pids[@]}"; do
    wait "${pids[$k]}" || failed="$failed fold$((k + 1))"
  done
  if [ -n "$failed" ]; then
    for f in $failed; do tail -n 3 "${log_dir}/${f}.out" >&2; done
    echo "error: training failed for${failed} (see ${log_dir}/fold<k>.out)" >&2
    exit 1
  fi
  for k in $(seq 1 "$fold"); do
    echo "== ${method}: testing fold ${k}"
    "${launch[@]}" code/test.py --task "$task" --exp "$exp/fold$k" "${gpu_flag[@]}" --cps AB
  done
else
  for seed in "${seeds[@]}"; do
    fold=$((fold + 1))
    echo "== ${method} on ${task}, ${ratio} % labels: fold ${fold} of ${#seeds[@]} (seed ${seed}): train, then test"
    train_fold "$fold" "$seed" "$@"
    "${launch[@]}" code/test.py --task "$task" --exp "$exp/fold$fold" "${gpu_flag[@]}" --cps AB
  done
fi
"$PY" code/evaluate_Ntimes.py --task "$task" --exp "$exp" --folds "$fold" --cps AB
