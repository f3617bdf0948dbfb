"""Synthetic abdominal CT phantom: the built-in dataset behind ``-t phantom`` (described in the README, 'The built-in
phantom').

Writes the cases of ``data.phantom_anatomy.make_case`` (anatomy, orientation, per-case variation: see that
module) as raw NIfTI in the Synapse or AMOS layout, with direction = identity (ITK's LPS frame), the case's
spacing and origin, and a manifest so that a complete folder is skipped and an interrupted one completed.
``make_case`` and ``LAYOUTS`` are re-exported here.
"""
import argparse
import logging
import os
import sys

import numpy as np

if __name__ == "__main__":  # `python code/data/phantom.py` puts code/data, not code/, on sys.path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.phantom_anatomy import _VERSION, LAYOUTS, _build_case, make_case  # noqa: E402
from utils.io import ConfigError, atomic_path, cli_main, read_nifti, write_json  # noqa: E402
from utils.task import get_task  # noqa: E402

__all__ = ["LAYOUTS", "MANIFEST", "case_files", "class_voxel_fractions", "main", "make_case", "write_dataset"]
log = logging.getLogger(__name__)

MANIFEST = "phantom.json"  # generator parameters; a complete, matching one makes reruns skip


# ------------------------------------------------------------------------------------------ label statistics
def class_voxel_fractions(label, num_cls):
    """Share of the voxels holding each class 0..num_cls-1 (float64, length num_cls, sums to 1)."""
    label = np.asarray(label)
    counts = np.bincount(label.ravel(), minlength=num_cls)
    if counts.size > num_cls:
        raise ValueError(f"label values up to {counts.size - 1} outside 0..{num_cls - 1}")
    return counts / label.size


# ------------------------------------------------------------------------------------------------ writing
def case_files(out_dir, layout="synapse", n_cases=20, n_val=0):
    """[(id, image path, label path, case number)] in the raw layout of the task (docs/pipeline.md#raw-data)."""
    if layout == "synapse":
        return [(f"{i:04d}", os.path.join(out_dir, "imagesTr", f"img{i:04d}.nii.gz"),
                 os.path.join(out_dir, "labelsTr", f"label{i:04d}.nii.gz"), i) for i in range(1, n_cases + 1)]
    return [(f"amos_{i:04d}", os.path.join(out_dir, f"images{part}", f"amos_{i:04d}.nii.gz"),
             os.path.join(out_dir, f"labels{part}", f"amos_{i:04d}.nii.gz"), i)
            for i in range(1, n_cases + n_val + 1) for part in ["Tr" if i <= n_cases else "Va"]]


def _write_nifti(path, array, geo):
    import SimpleITK as sitk
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(geo["spacing"])
    image.SetOrigin(geo["origin"])
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))  # LPS: x -> left, y -> posterior, z -> head
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, tmp, useCompression=True)


def _existing_niftis(out_dir):
    found = set()
    for sub in ("imagesTr", "labelsTr", "imagesVa", "labelsVa"):
        folder = os.path.join(out_dir, sub)
        if os.path.isdir(folder):
            found.update(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".nii.gz"))
    return found


def _read_manifest(out_dir):
    import json
    try:
        with open(os.path.join(out_dir, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _check_args(n_cases, seed, layout, n_val):
    """n_val resolved (AMOS default: half the training cases, as AMOS22's 240 Tr / 120 Va)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if n_val is None:
        n_val = max(1, n_cases // 2) if layout == "amos" else 0
    if n_val and layout != "amos":
        raise ConfigError(f"--val-cases {n_val}: validation cases (imagesVa/) exist only with --layout amos")
    if n_cases < 1 or n_val < 0 or seed < 0:
        raise ConfigError(f"--cases {n_cases}, --val-cases {n_val}, --seed {seed}: need cases >= 1, others >= 0")
    return n_val


def write_dataset(out_dir, n_cases=20, seed=0, layout="synapse", n_val=None, overwrite=False, progress=True,
                  shape=None):
    """Write the phantom as raw NIfTI under ``out_dir``; returns the ids written (empty when skipped).

    Layouts: synapse ``imagesTr/img0001.nii.gz`` + ``labelsTr/label0001.nii.gz``; amos
    ``images{Tr,Va}/amos_0001.nii.gz`` + ``labels{Tr,Va}/...`` (Va ids continue after the Tr ids).
    ``out_dir/phantom.json`` records the parameters: a complete folder with the same ones is left as it is
    and an interrupted one is completed. Other NIfTI files there raise ConfigError unless ``overwrite``."""
    from tqdm import tqdm
    n_val = _check_args(n_cases, seed, layout, n_val)
    params = {"generator": "code/data/phantom.py", "version": _VERSION, "seed": int(seed), "layout": layout,
              "n_cases": int(n_cases), "n_val": int(n_val), "shape": None if shape is None else list(shape)}
    files = case_files(out_dir, layout, n_cases, n_val)
    expected = {p for f in files for p in f[1:3]}
    old = _read_manifest(out_dir)
    same = old is not None and {k: v for k, v in old.items() if k != "complete"} == params
    existing = _existing_niftis(out_dir)
    if same and old.get("complete") and expected <= existing and not overwrite:
        log.info("%s: phantom already complete (%d cases), nothing written", out_dir, len(files))
        return []
    if existing and not same and not overwrite:
        what = f"another phantom ({MANIFEST} differs)" if old else "NIfTI files of another dataset"
        raise ConfigError(f"{out_dir}: holds {what}; use --force (overwrite=True) to replace them")
    _remove_stale(existing - expected, old is not None)
    write_json(os.path.join(out_dir, MANIFEST), {**params, "complete": False})
    written = []
    for cid, image_path, label_path, number in tqdm(files, desc="phantom", disable=None if progress else True):
        if same and not overwrite and os.path.isfile(image_path) and os.path.isfile(label_path):
            continue  # finished by an interrupted run with the same parameters: deterministic, keep it
        image, label, geo = _build_case(number, seed, layout, shape)
        _write_nifti(label_path, label, geo)
        _write_nifti(image_path, image, geo)
        written.append(cid)
    write_json(os.path.join(out_dir, MANIFEST), {**params, "complete": True})
    return written


def _remove_stale(stale, ours):
    """Drop files left by an earlier phantom with more cases; never touch files the phantom did not write."""
    if stale and not ours:
        log.warning("%d NIfTI files not written by the phantom are left in place", len(stale))
        return
    for path in sorted(stale):
        os.remove(path)


# ---------------------------------------------------------------------------------------------------- CLI
def _summary(out_dir, layout, files, written, seconds):
    """Per-class voxel share (mean and min over the cases holding it, and in how many cases)."""
    names = ("background",) + get_task(layout).class_names
    fractions = np.array([class_voxel_fractions(read_nifti(f[2])[0], len(names)) for f in files])
    lines = [f"phantom ({layout}): {len(written)} of {len(files)} cases written to {out_dir} in {seconds:.1f} s",
             f"{'class':<26}{'mean %':>9}{'min %':>9}{'cases':>8}"]
    for k, name in enumerate(names):
        present = fractions[:, k] > 0
        low = fractions[present, k].min() * 100 if present.any() else 0.0
        lines.append(f"{k:2d} {name:<23}{fractions[:, k].mean() * 100:9.3f}{low:9.3f}{present.sum():5d}/{len(files)}")
    return "\n".join(lines)


@cli_main
def main(argv=None):
    import time
    parser = argparse.ArgumentParser(description="Write the synthetic abdominal CT phantom (raw NIfTI).")
    parser.add_argument("--out", default=None, help="output folder (default: the phantom task's raw_dir, "
                                                    "./Datasets/Phantom or $DHC_PHANTOM_RAW)")
    parser.add_argument("--cases", type=int, default=20, help="training cases (imagesTr), default 20")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=LAYOUTS, default="synapse", help="raw file layout and classes")
    parser.add_argument("--val-cases", type=int, default=None,
                        help="AMOS layout only: imagesVa/labelsVa cases (default: half of --cases)")
    parser.add_argument("--shape", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                        help="voxel grid of every case (default: the phantom task's raw_shape in config.py, "
                             "32 128 128, for --layout synapse; 48-64 x 192 x 192 drawn per case for amos); the "
                             "field of view and anatomy stay the same, so a smaller grid means coarser voxels")
    parser.add_argument("--force", action="store_true", help="rewrite even if the folder already holds data")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    task = get_task("phantom")
    out = args.out or task.raw_dir
    shape = args.shape or (task.raw_shape if args.layout == "synapse" else None)
    start = time.perf_counter()
    written = write_dataset(out, args.cases, args.seed, args.layout, args.val_cases, overwrite=args.force,
                            shape=shape)
    seconds = time.perf_counter() - start
    n_val = _check_args(args.cases, args.seed, args.layout, args.val_cases)
    print(_summary(out, args.layout, case_files(out, args.layout, args.cases, n_val), written, seconds))


if __name__ == "__main__":
    sys.exit(main())
