#!/usr/bin/env bash
# GPU check, to run as is on one CUDA GPU (about 5-8 minutes on an H100/H200); prints one table:
#   - every method's training iteration at the paper size (32 filters, 2 + 2 patches of 64x128x128, AMP):
#     it/s and peak GPU memory (each method in its own process, bench/bench_train.py --one);
#   - DHC's AMP vs fp32 step-time ratio;
#   - sliding-window inference (two 32-filter VNets, A+B, --speed 0 strides, test.py's path) of one Synapse-sized
#     volume: 148x512x512 stored, 148x256x256 after test.py's in-plane halving -> seconds;
#   - a 1-process torchrun run (NCCL process group, train_dhc.py for 2 epochs on a small generated dataset).
# Usage: bench/gpu_check.sh [--dry-run] [--iters N] [--methods "dhc cps ..."]
#   --dry-run: the same steps on the CPU at tiny sizes (F = 4, 16x32x32 patches, a 24x64x64 volume, fp32 only),
#   to check the script itself without a GPU. Every step has its own time limit; a step that fails or runs out of
#   time prints its row as such and the script goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
dry=0; iters=10; methods=""
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry=1; iters=1 ;;
    --iters) iters=$2; shift ;;
    --methods) methods=$2; shift ;;
    -h|--help) sed -n 2,12p "$0"; exit 0 ;;
    *) echo "error: $1: unknown option (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ "$iters" =~ ^[1-9][0-9]*$ ]] || { echo "error: --iters $iters: expected a positive integer" >&2; exit 2; }
DRY=$dry ITERS=$iters METHODS=$methods exec timeout 470 "$PY" - <<'EOF'
import json, os, shutil, subprocess, sys, tempfile, time
sys.path[:0] = ["code", "tests", "bench"]
import torch

dry, iters = os.environ["DRY"] == "1", int(os.environ["ITERS"])
if not dry and not torch.cuda.is_available():
    sys.exit("error: no CUDA device; run with --dry-run to check the script on the CPU")
from bench_train import PATCH_OVERRIDES, all_methods
device = "cpu" if dry else "cuda"
F, patch = (4, (16, 32, 32)) if dry else (32, (64, 128, 128))
methods = os.environ["METHODS"].split() or all_methods()
rows = []  # (what, value, unit, note)
name = "CPU (dry run, tiny sizes)" if dry else torch.cuda.get_device_name()
print(f"gpu_check on {name}; torch {torch.__version__}; {iters} timed iterations per method", flush=True)


def train_row(m, amp, limit):
    p = PATCH_OVERRIDES.get(m, {}).get(patch, patch) if dry else patch
    cmd = [sys.executable, "bench/bench_train.py", "--one", m, "--device", device, "--n_filters", str(F),
           "--patch", *map(str, p), "--iters", str(iters)] + (["--amp"] if amp else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return None, f"over {limit} s"
    if out.returncode:
        lines = out.stderr.strip().splitlines()
        return None, (lines[-1] if lines else f"exit {out.returncode}")[:70]
    return json.loads(out.stdout.strip().splitlines()[-1]), ("" if p == patch else f"patch {p}")


amp = not dry
limit = 60 if dry else 25
dhc = {}
for m in methods:
    r, note = train_row(m, amp, limit)
    if m == "dhc":
        dhc[amp] = r
    label = f"train {m} ({'AMP' if amp else 'fp32'})"
    if r is None:
        rows.append((label, "failed", "", note))
    else:
        rows.append((label, f"{1 / r['sec']:.2f} it/s", f"{r['peak'] / 2**30:.2f} GiB peak "
                     f"{'GPU' if device == 'cuda' else 'RSS'}", note))
    print(f"  {rows[-1]}", flush=True)
if not dry:  # AMP vs fp32 step time of DHC
    r32, note = train_row("dhc", False, 40)
    if r32 and dhc.get(True):
        rows.append(("DHC step fp32 / AMP", f"{r32['sec'] / dhc[True]['sec']:.2f}x", f"fp32 {r32['peak'] / 2**30:.2f} "
                     "GiB peak", "time ratio: > 1 means AMP is faster"))
    else:
        rows.append(("DHC step fp32 / AMP", "failed", "", note))
else:
    rows.append(("DHC step fp32 / AMP", "n/a", "", "AMP needs CUDA"))

# sliding-window inference of one volume (test.py's function and strides)
from models import build_network
from utils.inference import STRIDES, prepare_net, sliding_window_predict
vol = (24, 64, 64) if dry else (148, 256, 256)
try:
    torch.manual_seed(0)
    nets = [prepare_net(build_network("VNet", 1, 14, F, has_dropout=False), torch.device(device)) for _ in "AB"]
    image = torch.rand(vol).numpy()
    sxy, sz = STRIDES[0]
    sxy, sz = min(sxy, patch[1]), min(sz, patch[0])
    sliding_window_predict(nets, image[:patch[0] * 2, :patch[1] * 2, :patch[2] * 2], patch, sxy, sz, 14,
                           device=torch.device(device), return_probs=False)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    sliding_window_predict(nets, image, patch, sxy, sz, 14, device=torch.device(device), return_probs=False)
    if device == "cuda":
        torch.cuda.synchronize()
    rows.append((f"inference {vol[0]}x{vol[1]}x{vol[2]} A+B", f"{time.perf_counter() - t0:.1f} s", "",
                 "speed 0, sw batch 4" + ("" if dry else ", AMP; stored 148x512x512")))
except Exception as e:  # noqa: BLE001 - one row per step
    rows.append((f"inference {vol}", "failed", "", f"{type(e).__name__}: {str(e)[:60]}"))
print(f"  {rows[-1]}", flush=True)

# 1-process torchrun: train_dhc.py for 2 epochs on a small generated dataset (the tests' blob volumes)
tmp = tempfile.mkdtemp(prefix="gpu_check_")
try:
    import numpy as np
    from conftest import blob_case
    from utils.io import write_list
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(tmp, "data", "npy"))
    ids = [f"{i:04d}" for i in range(1, 9)]
    for i in ids:
        image, label = blob_case(rng)
        np.save(os.path.join(tmp, "data", "npy", f"{i}_image.npy"), image)
        np.save(os.path.join(tmp, "data", "npy", f"{i}_label.npy"), label)
    for split, part in (("labeled_20p", ids[:2]), ("unlabeled_20p", ids[2:6]), ("eval", ids[6:]), ("train", ids[:6])):
        write_list(os.path.join(tmp, "data", "splits", f"{split}.txt"), part)
    env = dict(os.environ, DHC_PHANTOM_DATA=os.path.join(tmp, "data"), DHC_LOG_ROOT=os.path.join(tmp, "logs"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "code/train_dhc.py", "--task", "phantom", "--n_filters", "4", "--patch_size", "16", "32", "32",
           "--device", device, "-ep", "1", "--exp", "torchrun1", "--eval_every", "1"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    ok = out.returncode == 0 and os.path.isfile(os.path.join(tmp, "logs", "torchrun1", "ckpts", "best_model.pth"))
    rows.append(("torchrun --nproc_per_node 1 train_dhc", "ok" if ok else "failed", f"{time.perf_counter() - t0:.0f} s",
                 "2 epochs, tiny data" if ok else (out.stderr.strip().splitlines() or ["?"])[-1][:70]))
except Exception as e:  # noqa: BLE001
    rows.append(("torchrun --nproc_per_node 1 train_dhc", "failed", "", f"{type(e).__name__}: {str(e)[:60]}"))
finally:
    shutil.rmtree(tmp, ignore_errors=True)

print(f"\n| check ({name}) | value | memory / time | note |\n|---|---|---|---|")
for what, value, extra, note in rows:
    print(f"| {what} | {value} | {extra} | {note} |")
EOF
