"""Sliding-window inference: utils.inference (test.py's path) vs the original's one-window-at-a-time loop.

Same two VNets, same volume, same window layout (docs/pipeline.md#sliding-window-inference). Outputs are checked first
(labels identical wherever the reference's top-two probabilities differ by more than 1e-4, probabilities
allclose), then median wall times over interleaved repetitions are printed with the ratio to the original.
CPU: phantom size (n_filters 8, patch 32x64x64, volume 48x96x96); CUDA: Synapse size (n_filters 32,
patch 64x128x128, halved volume 147x256x256, 175 windows).
Where the time goes on CPU (torch.profiler): the network, not the numpy accumulation. With batch 1 and small
layers PyTorch runs aten::slow_conv3d_forward; with batch >= 2 it runs oneDNN (mkldnn_convolution), so one
batch of 4 windows costs about one window of the original loop; channels-last weights add 1.2-1.5x.

    python bench/bench_inference.py [--reps 5] [--device auto|cpu|cuda]
"""
import argparse
import copy
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "code"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from models import build_network  # noqa: E402
from utils.inference import STRIDES, prepare_net, sliding_window_predict  # noqa: E402


def original_loop(net_a, net_b, image, patch, stride_xy, stride_z, num_classes, device):
    """The original's test_single_case_AB (docs/pipeline.md#sliding-window-inference): axes reversed to (W, H, D), one
    window at a time, batch 1, torch.no_grad, per-window transfer to numpy and numpy float32 accumulation."""
    image = image.transpose(2, 1, 0)
    pw, ph, pd = patch[::-1]
    ww, hh, dd = image.shape
    nx = math.ceil((ww - pw) / stride_xy) + 1
    ny = math.ceil((hh - ph) / stride_xy) + 1
    nz = math.ceil((dd - pd) / stride_z) + 1
    score = np.zeros((num_classes,) + image.shape, dtype=np.float32)
    cnt = np.zeros(image.shape, dtype=np.float32)
    for x in range(nx):
        xs = min(stride_xy * x, ww - pw)
        for y in range(ny):
            ys = min(stride_xy * y, hh - ph)
            for z in range(nz):
                zs = min(stride_z * z, dd - pd)
                window = image[xs:xs + pw, ys:ys + ph, zs:zs + pd]
                window = np.ascontiguousarray(window.transpose(2, 1, 0))[None, None]
                with torch.no_grad():
                    t = torch.from_numpy(window).to(device)
                    prob = torch.softmax((net_a(t) + net_b(t)) / 2, dim=1)
                prob = prob.cpu().numpy()[0].transpose(0, 3, 2, 1)
                score[:, xs:xs + pw, ys:ys + ph, zs:zs + pd] += prob
                cnt[xs:xs + pw, ys:ys + ph, zs:zs + pd] += 1
    score = score / cnt[None]
    return score.argmax(0).transpose(2, 1, 0), score.transpose(0, 3, 2, 1)


def make_nets(device, n_filters, num_classes):
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = build_network("VNet", 1, num_classes, n_filters)
        with torch.no_grad():  # non-trivial eval-mode statistics
            for name, buf in net.named_buffers():
                if name.endswith("running_mean"):
                    buf.normal_(0, 0.1)
                elif name.endswith("running_var"):
                    buf.uniform_(0.5, 1.5)
        nets.append(net.to(device).eval())
    return nets


def check(name, labels, prob, ref_labels, ref_prob, atol):
    top2 = np.sort(ref_prob, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-4
    assert np.array_equal(labels[clear], ref_labels[clear]), f"{name}: labels differ from the original loop"
    assert np.allclose(prob, ref_prob, atol=atol), f"{name}: probabilities differ by {np.abs(prob - ref_prob).max()}"
    return int((labels != ref_labels).sum()), float(np.abs(prob - ref_prob).max())


def verify(runs):
    """Every variant against the first (the original loop); fp16 variants report their agreement only."""
    ref_labels, ref_prob = list(runs.values())[0]()
    for name, fn in list(runs.items())[1:]:
        labels, prob = fn()
        if "AMP" in name:
            print(f"  {name}: label agreement {np.mean(labels == ref_labels):.5f}, "
                  f"max |dp| {np.abs(prob - ref_prob).max():.2e}")
        else:
            ndiff, dmax = check(name, labels, prob, ref_labels, ref_prob, atol=1e-4)
            print(f"  {name}: labels equal ({ndiff} voxels differ, only at near-ties), max |dp| {dmax:.2e}")


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cuda = device.type == "cuda"
    n_filters, patch, shape = (32, (64, 128, 128), (147, 256, 256)) if cuda else (8, (32, 64, 64), (48, 96, 96))
    num_classes, (sxy, sz) = 14, STRIDES[0]
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    nets = make_nets(device, n_filters, num_classes)
    fast = [prepare_net(copy.deepcopy(n), device) for n in nets]  # test.py's nets (channels-last on CPU)

    def ours(net_list, bs, amp=False):
        return lambda: sliding_window_predict(net_list, image, patch, sxy, sz, num_classes, sw_batch_size=bs,
                                              device=device, amp=amp)
    runs = {"original loop (batch 1, no_grad, numpy)": lambda: original_loop(*nets, image, patch, sxy, sz,
                                                                             num_classes, device),
            "ours, sw_batch_size 1": ours(nets, 1), "ours, sw_batch_size 4": ours(nets, 4),
            "ours, sw_batch_size 4 + prepare_net (test.py)": ours(fast, 4)}
    if cuda:
        runs["ours, sw_batch_size 4 + AMP fp16 (test.py default)"] = ours(fast, 4, amp=True)
    print(f"device {device} ({torch.get_num_threads()} threads), volume {shape}, patch {patch}, strides xy {sxy} "
          f"z {sz}, 2 VNets n_filters {n_filters}, {num_classes} classes")
    verify(runs)
    times = {name: [] for name in runs}
    for _ in range(args.reps):  # interleaved, so machine load affects every variant alike
        for name, fn in runs.items():
            times[name].append(timed(fn, device))
    base = statistics.median(times[next(iter(runs))])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:52s} median {med * 1000:9.1f} ms  (min {min(ts) * 1000:9.1f})  x{base / med:5.2f}")


if __name__ == "__main__":
    main()
