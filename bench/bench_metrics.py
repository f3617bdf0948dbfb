"""Per-case metrics: utils.metrics.case_metrics vs the original's medpy loop (evaluate_Ntimes.py,
docs/pipeline.md#evaluation).

Synthetic Synapse-like case on the halved evaluation grid: 148 x 256 x 256, 13 organs with realistic voxel
counts (liver ~2e5 voxels, adrenals ~1e3), prediction = the same organs with perturbed size, position and
boundary noise (one adrenal missed). Checks that the [13, 2] (Dice x100, ASD) arrays are identical, then prints
median wall times of all 13 classes and the ratio.

    python bench/bench_metrics.py [--repeats 3]
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "code"))
from utils.metrics import case_metrics, class_stats  # noqa: E402

SHAPE = (148, 256, 256)
# (centre z, y, x), semi-axes (z, y, x) in voxels (halved grid: ~1.5 mm in-plane, ~3 mm slices), Synapse order
ORGANS = [
    ((40, 150, 200), (12, 22, 16)),   # 1 spleen
    ((75, 165, 70), (18, 16, 13)),    # 2 right kidney
    ((70, 165, 185), (18, 16, 13)),   # 3 left kidney
    ((65, 95, 75), (8, 12, 10)),      # 4 gallbladder
    ((20, 140, 140), (20, 6, 6)),     # 5 esophagus (short tube)
    ((45, 110, 80), (26, 50, 45)),    # 6 liver
    ((45, 95, 170), (18, 30, 25)),    # 7 stomach
    ((74, 140, 140), (74, 8, 8)),     # 8 aorta (all slices)
    ((74, 135, 105), (74, 7, 9)),     # 9 IVC
    ((55, 125, 130), (4, 5, 45)),     # 10 portal / splenic veins
    ((62, 115, 140), (6, 10, 42)),    # 11 pancreas
    ((48, 150, 92), (5, 6, 3)),       # 12 right adrenal
    ((46, 150, 172), (5, 6, 3)),      # 13 left adrenal
]


def make_label_map(rng, jitter=0.0, drop=()):
    """Noisy ellipsoids written in organ order; ``jitter`` perturbs centres, sizes and boundaries."""
    label = np.zeros(SHAPE, np.uint8)
    for c, (centre, axes) in enumerate(ORGANS, start=1):
        if c in drop:
            continue
        centre = np.array(centre) + jitter * rng.normal(0, 1.5, 3)
        axes = np.array(axes, float) * (1 + jitter * rng.normal(0, 0.08, 3))
        lo = np.maximum(np.floor(centre - 1.3 * axes).astype(int), 0)
        hi = np.minimum(np.ceil(centre + 1.3 * axes).astype(int) + 1, SHAPE)
        grid = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
        r2 = sum(((g - m) / s) ** 2 for g, m, s in zip(grid, centre, axes))
        noise = ndimage.gaussian_filter(rng.normal(size=r2.shape), 2.0)
        inside = r2 + 3.0 * (0.5 + jitter) * noise < 1
        label[tuple(slice(a, b) for a, b in zip(lo, hi))][inside] = c
    return label


def original_case(pred, label, num_cls):
    """The original's per-class loop with medpy (evaluate_Ntimes.py; docs/pipeline.md#evaluation)."""
    from medpy import metric
    values = np.zeros((num_cls - 1, 2))
    for i in range(1, num_cls):
        pred_i, label_i = pred == i, label == i
        if pred_i.sum() > 0 and label_i.sum() > 0:
            values[i - 1] = metric.binary.dc(pred_i, label_i) * 100, metric.binary.asd(pred_i, label_i)
        elif pred_i.sum() > 0 or label_i.sum() > 0:
            values[i - 1] = 0, 128
        else:
            values[i - 1] = 1, 0
    return values


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    gt = make_label_map(rng)
    pred = make_label_map(rng, jitter=0.5, drop=(13,))
    counts = np.bincount(gt.ravel(), minlength=14)[1:]
    print(f"case {SHAPE}, 13 organs, GT voxels per organ: min {counts.min()}, max {counts.max()}; "
          f"prediction misses organ 13")

    ours, ref = case_metrics(pred, gt, 14), original_case(pred, gt, 14)
    assert np.array_equal(ours, ref), (ours, ref)
    print("identical [13, 2] (Dice x100, ASD) arrays: yes; mean Dice %.2f, mean ASD %.3f" % tuple(ours.mean(0)))

    t_ref = median_time(lambda: original_case(pred, gt, 14), args.repeats)
    t_ours = median_time(lambda: case_metrics(pred, gt, 14), max(args.repeats, 5))
    t_mm = median_time(lambda: class_stats(pred, gt, 14, spacing_mm=(3.0, 1.5, 1.5)), max(args.repeats, 5))
    print(f"medpy loop (original)          : {t_ref * 1e3:9.1f} ms per case (median of {args.repeats})")
    print(f"utils.metrics.case_metrics     : {t_ours * 1e3:9.1f} ms per case")
    print(f"  + symmetric ASSD in mm       : {t_mm * 1e3:9.1f} ms per case (class_stats with spacing)")
    print(f"speed-up                       : {t_ref / t_ours:9.1f}x")


if __name__ == "__main__":
    main()
