"""CPU scaling of DDP training, side by side in one run: DHC's full training iteration (forward, losses, backward,
gradient all-reduce, optimiser steps, class statistics reduced over ranks) in

  - 2 gloo processes x 1 thread each (torchrun; per-rank batch 2 + 2, so 8 patches per iteration in all),
  - 1 process x 2 threads, batch 2 + 2 (the same per-process work),
  - 1 process x 2 threads, batch 4 + 4 (the same global batch as the 2 processes),
  - 1 process x 1 thread, batch 2 + 2 (what one of the two processes would do alone),

reported as training samples (patches) per second, with the load average before and after (other work on the
machine distorts the figures: run it on a quiet machine). Phantom size by default: F = 8, patches 16x48x48.

    python bench/bench_ddp.py [--iters 6] [--n_filters 8] [--patch 16 48 48]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "code"))


def worker(args):
    """One process of one configuration: median seconds per iteration (rank 0 prints a JSON line)."""
    import torch
    from bench_train import StoredLabels
    from engine import Step, make_optimizers, optimize_step
    from train_dhc import DHC
    from utils import distributed
    from utils.runinfo import build_parser, resolve_config
    torch.set_num_threads(args.threads)
    distributed.init_from_env("cpu")
    argv = ["--task", "phantom", "--device", "cpu", "--n_filters", str(args.n_filters), "--patch_size",
            *map(str, args.patch), "--batch_size", str(args.batch), "-ep", "100"]
    cfg = resolve_config(DHC, build_parser(DHC).parse_args(argv))
    torch.manual_seed(0)
    method = DHC(cfg)
    method.on_train_start(StoredLabels(cfg.num_cls))
    wrappers = distributed.wrap_nets(method, cfg.device)
    optimizers, scaler = make_optimizers(method, cfg.base_lr), torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(1 + distributed.rank())
    x_l, x_u = (torch.rand(args.batch, 1, *args.patch) for _ in range(2))
    y_l = torch.randint(0, cfg.num_cls, (args.batch, 1, *args.patch))
    times = []
    for i in range(args.iters + 2):  # two warm-up iterations
        distributed.barrier()
        t0 = time.perf_counter()
        optimize_step(method, optimizers, scaler, cfg, x_l, y_l, x_u, Step(0, i, i, cfg.base_lr, 0.1), wrappers)
        distributed.barrier()
        times.append(time.perf_counter() - t0)
    if distributed.is_main():
        print(json.dumps({"sec": statistics.median(times[2:]), "world": distributed.world_size()}))
    distributed.shutdown()


def run(procs, threads, batch, args):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    this = [os.path.abspath(__file__), "--worker", "--threads", str(threads), "--batch", str(batch), "--iters",
            str(args.iters), "--n_filters", str(args.n_filters), "--patch", *map(str, args.patch)]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *this]
           if procs > 1 else [sys.executable, *this])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE)
    if out.returncode:
        raise SystemExit(f"error: {' '.join(cmd[:6])}: {out.stderr.strip().splitlines()[-1:]}")
    result = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    samples = 2 * batch * procs  # labeled + unlabeled patches per iteration over all processes
    return result["sec"], samples / result["sec"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--n_filters", type=int, default=8)
    p.add_argument("--patch", type=int, nargs=3, default=(16, 48, 48))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    load_before = os.getloadavg()[0]
    print(f"DHC training iteration on CPU, F={args.n_filters}, patch {tuple(args.patch)}, median of {args.iters}; "
          f"{os.cpu_count()} CPUs, load average {load_before:.1f}")
    rows = [("2 gloo processes x 1 thread, 2+2 each", 2, 1, 2), ("1 process x 2 threads, 2+2", 1, 2, 2),
            ("1 process x 2 threads, 4+4 (same global batch)", 1, 2, 4), ("1 process x 1 thread, 2+2", 1, 1, 2)]
    results = [(label, *run(procs, threads, batch, args)) for label, procs, threads, batch in rows]
    base = results[1][2]
    print(f"  {'configuration':48s} {'s/it':>7s} {'samples/s':>10s} {'vs 1x2':>7s}")
    for label, sec, rate in results:
        print(f"  {label:48s} {sec:7.3f} {rate:10.2f} {rate / base:6.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
