"""Training-sample throughput: prepared-once VolumeDataset vs the original's per-sample full-volume pipeline.

The original (``Synapse_AMOS`` + ``RandomCrop``, docs/pipeline.md#dataset-and-normalisation and #crops-and-flips; Q24
in docs/original-quirks.md) re-read the npy files, re-normalised and trilinear/nearest-resized the whole 512x512
volume for every sample. Ours does that once per volume at construction; per sample only crop + flips + tensor
conversion remain. First checks both give the same patches for the same np.random draws, then times each (median after
warm-up).

    python bench/bench_data.py [--naive-samples 5] [--ours-samples 100]
"""
import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "code"))

from data.dataset import VolumeDataset  # noqa: E402
from data.transforms import make_train_transform  # noqa: E402
from utils.io import save_npy, write_list  # noqa: E402
from utils.task import get_task  # noqa: E402


def naive_sample(image_path, label_path, patch, window=(-75.0, 275.0)):
    """The original's per-sample work, written out: load, window + min-max, full-volume halving, crop, flips."""
    image, label = np.load(image_path), np.load(label_path)
    image = image.clip(min=window[0], max=window[1])
    image = (image - image.min()) / (image.max() - image.min())
    d, h, w = image.shape
    offsets = [np.random.randint(0, s - p) for s, p in zip((d, h // 2, w // 2), patch)]
    out = {}
    for key, item in (("image", image), ("label", label)):
        t = torch.FloatTensor(item)[None, None]
        mode = dict(mode="trilinear", align_corners=False) if key == "image" else dict(mode="nearest")
        item = F.interpolate(t, size=(d, h // 2, w // 2), **mode)[0, 0].numpy()
        out[key] = item[tuple(slice(o, o + p) for o, p in zip(offsets, patch))]
    for axis, draw in ((1, 0), (2, 1)):  # RandomFlip_LR then RandomFlip_UD, two uniforms each
        u = (np.random.uniform(0, 1), np.random.uniform(0, 1))
        if u[draw] <= 0.5:
            out = {k: np.flip(v, axis).copy() for k, v in out.items()}
    return {"image": torch.from_numpy(out["image"]).unsqueeze(0).float(),
            "label": torch.from_numpy(out["label"]).long()}


def write_volume(task, shape, seed=0):
    """One Synapse-like case: HU noise spanning the window, 14-class blocky label (int8, as preprocessing)."""
    rng = np.random.RandomState(seed)
    image = rng.uniform(-1000, 1000, size=shape).astype(np.float32)
    label = np.kron(rng.randint(0, 14, size=(shape[0], shape[1] // 16, shape[2] // 16)),
                    np.ones((1, 16, 16))).astype(np.int8)
    save_npy(os.path.join(task.npy_dir, "0001_image.npy"), image)
    save_npy(os.path.join(task.npy_dir, "0001_label.npy"), label)
    write_list(task.split_path("train"), ["0001"])
    return [os.path.join(task.npy_dir, f"0001_{k}.npy") for k in ("image", "label")]


def check_equal(ds, paths, patch, seeds):
    for seed in seeds:
        np.random.seed(seed)
        ref = naive_sample(*paths, patch)
        np.random.seed(seed)
        ours = ds[0]
        torch.testing.assert_close(ours["image"], ref["image"], rtol=0, atol=1e-6)
        assert torch.equal(ours["label"], ref["label"]), f"label patches differ for seed {seed}"


def median_seconds(fn, n, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(148, 512, 512), help="stored volume (D H W)")
    parser.add_argument("--patch", type=int, nargs=3, default=(64, 128, 128))
    parser.add_argument("--naive-samples", type=int, default=5)
    parser.add_argument("--ours-samples", type=int, default=100)
    args = parser.parse_args()
    patch = tuple(args.patch)
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        task = dataclasses.replace(get_task("synapse"), data_dir=tmp)
        paths = write_volume(task, tuple(args.shape))
        t0 = time.perf_counter()
        ds = VolumeDataset(task, "train", transform=make_train_transform(task, patch))
        prep = time.perf_counter() - t0
        check_equal(ds, paths, patch, seeds=range(8))
        print(f"identical patches for 8 seeds (image atol 1e-6, label exact); device cpu, "
              f"{torch.get_num_threads()} torch threads, volume {tuple(args.shape)}, patch {patch}")
        t_naive = median_seconds(lambda: naive_sample(*paths, patch), args.naive_samples)
        t_ours = median_seconds(lambda: ds[0], args.ours_samples, warmup=3)
    print(f"naive per-sample full volume: {1 / t_naive:8.2f} samples/s  (median {t_naive * 1e3:8.1f} ms)")
    print(f"ours (prepared once)        : {1 / t_ours:8.2f} samples/s  (median {t_ours * 1e3:8.1f} ms)")
    print(f"speed-up {t_naive / t_ours:.0f}x; one-time load + prepare of the volume {prep:.2f} s")


if __name__ == "__main__":
    main()
