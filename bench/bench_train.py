"""Training speed and peak memory of every method: one full iteration (2 labeled + 2 unlabeled patches, forward,
losses, backward, optimiser steps, method updates), side by side with DHC, plus the cost of DHC's per-iteration
class statistics kept on the device (torch.bincount) versus a numpy round trip.

Each method runs in its own process, so its peak memory is its own. CPU: a tiny size (F = 4, 16x32x32) and the
phantom benchmark's size (F = 16, 16x64x64, config.BENCHMARK), then, for DHC and the fully supervised VNet at that
size, two single-threaded processes side by side against one process on two threads (training throughput: what
``make benchmark`` and ``make demo`` rely on). CUDA (when present): the paper size, 32 filters on 64x128x128
patches, AMP. Usage: python bench/bench_train.py [--iters 5] [--methods dhc cps ...]
"""
import argparse
import glob
import importlib
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "code")
sys.path[:0] = [CODE]
from engine import Method, Step, make_optimizers, optimize_step  # noqa: E402
from train_dhc import DistDW  # noqa: E402
from utils.runinfo import build_parser, resolve_config  # noqa: E402


# Networks that cannot take the CPU rows' patches: the nearest patch they accept (UNETR++ needs multiples of 32).
PATCH_OVERRIDES = {"dhc_unetrpp": {(16, 32, 32): (32, 32, 32), (16, 64, 64): (32, 32, 32)}}


def all_methods():
    return sorted(os.path.basename(p)[6:-3] for p in glob.glob(os.path.join(CODE, "train_*.py")))


def method_class(name):
    module = importlib.import_module(f"train_{name}")
    (cls,) = [c for _, c in inspect.getmembers(module, inspect.isclass)
              if issubclass(c, Method) and c.__module__ == module.__name__]
    return cls


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StoredLabels:
    """Stand-in for the labeled dataset a method sees in ``on_train_start``: random full-size label volumes."""

    def __init__(self, num_cls, n=4, shape=(32, 96, 96)):
        rng = np.random.default_rng(0)
        self.ids = [f"{i:04d}" for i in range(n)]
        self.num_cls = num_cls
        self._labels = [rng.integers(0, num_cls, size=shape).astype(np.int8) for _ in range(n)]

    def __len__(self):
        return len(self.ids)

    def iter_stored_labels(self):
        return iter(self._labels)


def bench_step(name, device, n_filters, patch, iters, amp):
    """Median seconds per iteration and peak memory (bytes) of one method's full training iteration."""
    cls = method_class(name)
    argv = ["--task", "phantom", "--device", str(device), "--n_filters", str(n_filters),
            "--patch_size", *map(str, patch), "--amp" if amp else "--no-amp", "-ep", "100"]
    cfg = resolve_config(cls, build_parser(cls).parse_args(argv))
    torch.manual_seed(0)
    method = cls(cfg)
    for module in (*method.nets.values(), *method.aux.values()):
        module.to(device).train()
    method.on_train_start(StoredLabels(cfg.num_cls))
    optimizers, scaler = make_optimizers(method, cfg.base_lr), torch.amp.GradScaler(device.type, enabled=amp)
    n = cfg.batch_size
    x_l, x_u = (torch.rand(n, 1, *patch, device=device) for _ in range(2))
    y_l = torch.randint(0, cfg.num_cls, (n, 1, *patch), device=device)
    if not cls.uses_unlabeled:
        x_u = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(iters + 2):  # two warm-up iterations
        sync(device)
        t0 = time.perf_counter()
        optimize_step(method, optimizers, scaler, cfg, x_l, y_l, x_u, Step(0, i, i, cfg.base_lr, 0.1))
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    params = sum(p.numel() for net in method.nets.values() for p in net.parameters())
    return {"sec": statistics.median(times[2:]), "peak": peak, "params": params}


def _child(name, device, n_filters, patch, iters, amp, threads=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--device", device, "--n_filters",
           str(n_filters), "--patch", *map(str, patch), "--iters", str(iters)] + (["--amp"] if amp else [])
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _result(name, proc):
    out, err = proc.communicate()
    if proc.returncode != 0:
        print(f"  {name}: failed ({err.strip().splitlines()[-1] if err.strip() else proc.returncode})")
        return None
    return json.loads(out.strip().splitlines()[-1])


def run_isolated(name, device, n_filters, patch, iters, amp, threads=None):
    """``bench_step`` in a fresh process (its own peak RSS); None if the method failed there."""
    return _result(name, _child(name, device, n_filters, patch, iters, amp, threads))


def print_side_by_side(n_filters, patch, iters, methods=("dhc", "fully")):
    """Iterations per second of the whole machine: one process on 2 threads vs two 1-thread processes at once."""
    print(f"\ncpu F={n_filters} patch {tuple(patch)}: one process x 2 threads vs two processes x 1 thread side by side")
    for m in methods:
        one = run_isolated(m, "cpu", n_filters, patch, iters, False, threads=2)
        procs = [_child(m, "cpu", n_filters, patch, iters, False, threads=1) for _ in range(2)]
        two = [_result(m, p) for p in procs]
        if one is None or None in two:
            continue
        a, b = 1 / one["sec"], sum(1 / r["sec"] for r in two)
        print(f"  {m:12s} 1x2 threads {one['sec'] * 1000:7.1f} ms/it = {a:5.2f} it/s | 2x1 thread "
              f"{two[0]['sec'] * 1000:7.1f} / {two[1]['sec'] * 1000:7.1f} ms/it = {b:5.2f} it/s -> {b / a:4.2f}x")


def print_rows(device, n_filters, patch, iters, amp, methods):
    print(f"\n{device} F={n_filters} patch {tuple(patch)} {'AMP' if amp else 'fp32'}, batch 2+2 "
          f"(fully: 4 labeled), median of {iters}:")
    print(f"  {'method':12s} {'ms/it':>9s} {'vs dhc':>7s} {'peak ' + ('GPU' if device == 'cuda' else 'RSS'):>10s}"
          f" {'params':>12s}")
    patches = {m: PATCH_OVERRIDES.get(m, {}).get(tuple(patch), tuple(patch)) for m in methods}
    rows = {m: run_isolated(m, device, n_filters, patches[m], iters, amp) for m in methods}
    base = rows.get("dhc")
    for m, r in rows.items():
        if r is None:
            continue
        ratio = f"{r['sec'] / base['sec']:6.2f}x" if base else "     -"
        note = f"  (patch {patches[m]})" if patches[m] != tuple(patch) else ""
        print(f"  {m:12s} {r['sec'] * 1000:9.1f} {ratio:>7s} {r['peak'] / 2**30:8.2f} GiB {r['params']:12,d}{note}")


def numpy_distdw_update(dist, logits):
    """The naive way: argmax to the host, np.bincount, weights back to the device."""
    counts = np.bincount(logits.argmax(1).cpu().numpy().ravel(), minlength=dist.num_cls)
    cur = dist._cal_weights(torch.from_numpy(counts)).to(logits.device)
    dist.weights = 0.99 * dist.weights.to(logits.device) + 0.01 * cur
    return dist.weights


def bench_stats(device, num_cls, patch, reps=20):
    logits = torch.randn(2, num_cls, *patch, device=device)
    results = {}
    for name, fn in (("device", lambda d: d.get_ema_weights(logits)), ("numpy", lambda d: numpy_distdw_update(d, logits))):
        dist = DistDW(num_cls)
        dist.init_weights([np.arange(num_cls)])
        fn(dist)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            w = fn(dist)
        sync(device)
        results[name] = ((time.perf_counter() - t0) / reps, w.cpu())
    assert torch.allclose(results["device"][1], results["numpy"][1], atol=1e-5)
    return results["device"][0], results["numpy"][0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=None, help="default: every code/train_<m>.py")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--n_filters", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--patch", type=int, nargs=3, default=(16, 32, 32), help=argparse.SUPPRESS)
    parser.add_argument("--amp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # child process: one method, one configuration, a JSON line
        print(json.dumps(bench_step(args.one, torch.device(args.device), args.n_filters, tuple(args.patch),
                                    args.iters, args.amp)))
        return
    methods = args.methods or all_methods()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no CUDA"))
    from utils.task import config_module
    BENCHMARK = config_module().BENCHMARK
    for n_filters, patch in ((4, (16, 32, 32)), (BENCHMARK.n_filters, BENCHMARK.patch_size)):
        print_rows("cpu", n_filters, patch, args.iters, False, methods)
    print_side_by_side(BENCHMARK.n_filters, BENCHMARK.patch_size, args.iters)
    if torch.cuda.is_available():
        print_rows("cuda", 32, (64, 128, 128), args.iters, True, methods)
    else:
        print("\ncuda paper size (F=32, 64x128x128, AMP): unmeasured, no CUDA device here")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        device = torch.device(device)
        patch = (64, 128, 128)
        ours, naive = bench_stats(device, 14, patch)
        print(f"{device.type:4s} DistDW update on 2x14x{patch}: device {ours * 1000:.2f} ms vs numpy round trip "
              f"{naive * 1000:.2f} ms -> {naive / ours:.1f}x")


if __name__ == "__main__":
    main()
