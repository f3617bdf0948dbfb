"""DHC training speed and peak memory: iterations/s of the full step (two VNets, 2+2 patches, both weightings,
four losses, backward, two SGD steps), and the cost of the per-iteration class statistics kept on the device
(torch.bincount / scatter) versus a numpy round trip.

CPU: the phantom size (F = 8, 16x48x48), a tiny and a larger size. CUDA (when present): the paper size, two
32-filter VNets on 64x128x128 patches, with AMP and in fp32.   Usage: python bench/bench_train.py [--iters 5]
"""
import argparse
import os
import resource
import statistics
import sys
import time

import numpy as np
import torch

sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "code")]
from engine import Step, make_optimizers, optimize_step  # noqa: E402
from train_dhc import DHC, DistDW  # noqa: E402
from utils.runinfo import build_parser, resolve_config  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_step(device, n_filters, patch, iters, amp):
    argv = ["--task", "phantom", "--device", str(device), "--n_filters", str(n_filters),
            "--patch_size", *map(str, patch), "--amp" if amp else "--no-amp"]
    cfg = resolve_config(DHC, build_parser(DHC).parse_args(argv))
    torch.manual_seed(0)
    method = DHC(cfg)
    for net in method.nets.values():
        net.to(device).train()
    rng = np.random.default_rng(0)
    method.on_train_start([rng.integers(0, cfg.num_cls, size=(8, 64, 64))])
    optimizers, scaler = make_optimizers(method, cfg.base_lr), torch.amp.GradScaler(device.type, enabled=amp)
    x_l, x_u = (torch.rand(2, 1, *patch, device=device) for _ in range(2))
    y_l = torch.randint(0, cfg.num_cls, (2, 1, *patch), device=device)
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
    return statistics.median(times[2:]), peak


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
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no CUDA"))
    for device in devices:
        configs = ([(4, (16, 32, 32), False), (8, (16, 48, 48), False), (8, (32, 64, 64), False)]
                   if device.type == "cpu" else [(32, (64, 128, 128), True), (32, (64, 128, 128), False)])
        for n_filters, patch, amp in configs:
            sec, peak = bench_step(device, n_filters, patch, args.iters, amp)
            print(f"{device.type:4s} DHC step F={n_filters:2d} patch {patch} 2+2 {'AMP ' if amp else 'fp32'}: "
                  f"{1 / sec:7.2f} it/s ({sec * 1000:8.1f} ms), peak {'GPU' if device.type == 'cuda' else 'RSS'} "
                  f"{peak / 2**30:.2f} GiB")
        patch = (64, 128, 128)
        ours, naive = bench_stats(device, 14, patch)
        print(f"{device.type:4s} DistDW update on 2x14x{patch}: device {ours * 1000:.2f} ms vs numpy round trip "
              f"{naive * 1000:.2f} ms -> {naive / ours:.1f}x")


if __name__ == "__main__":
    main()
