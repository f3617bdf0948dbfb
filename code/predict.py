"""Segment new scans: NIfTI in, uint8 label maps on each scan's own voxel grid out.

See docs/pipeline.md#segmenting-new-scans. Usage, from the repository root:

    python code/predict.py -i IN -o OUT --task synapse --exp Task_synapse_20p/dhc/fold1 [--cps AB]
    python code/predict.py -i IN -o OUT --task synapse --ckpt best_model.pth --method dhc [--n_filters 32]

``IN`` is one ``.nii.gz``/``.nii`` scan or a folder of them; ``OUT/<file name>`` gets each scan's labels (uint8,
the scan's size, spacing, origin and direction) and, with ``--save_probabilities``, ``OUT/<name>.npz`` its class
probabilities. Each scan goes through test.py's path (utils.inference: clip, min-max, Synapse/phantom in-plane
halving or the AMOS resize, the same sliding window); the class probabilities are brought back to the scan's grid
by trilinear interpolation and the argmax is taken there (``resample_to_scan``). Scans are processed one by one: a
bad one is one ``error:`` line and the others are still written; the exit code is 2 if any failed. Under
``torchrun`` the scans are split over the ranks.
"""
import argparse
import gzip
import logging
import os
import struct
import sys
import tempfile
import time

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from data.preprocess_common import nonfinite_counts
from utils import distributed
from utils.checkpoint import load_released_nets, load_run_nets
from utils.device import resolve_device
from utils.inference import (STRIDES, TRAINED_MIRRORS, Geometry, prepare_scan, resample_to_scan, sliding_window_scores,
                             strides_for, write_label_map)
from utils.io import (ConfigError, DataError, atomic_path, cli_main, is_out_of_memory, read_nifti,
                      remove_stale_tmp, write_bytes)
from utils.task import get_task, task_names

log = logging.getLogger("predict")

SUFFIXES = (".nii.gz", ".nii")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Segment NIfTI scans with a trained run or a released checkpoint: "
                                            "OUT/<file name> = uint8 labels on the scan's own grid")
    p.add_argument("-i", "--input", required=True, help="a .nii.gz/.nii scan or a folder of them")
    p.add_argument("-o", "--output", required=True, help="output folder (created)")
    p.add_argument("--task", required=True, choices=task_names(), help="preprocessing and classes of the model")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--exp", help="run folder under logs/ (run.json + ckpts/best_model.pth), as test.py")
    source.add_argument("--ckpt", help="a best_model.pth without run.json (e.g. the authors' released files)")
    p.add_argument("--method", help="with --ckpt: the method that trained it (a code/train_<m>.py name); "
                                    "picks the network")
    p.add_argument("--n_filters", type=int, default=None, help="with --ckpt: network width (default: read from "
                                                                "the checkpoint's weights)")
    p.add_argument("--patch_size", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="with --ckpt: the training patch = sliding window (default: the task's)")
    p.add_argument("--cps", default=None, choices=("A", "B", "AB"),
                   help="nets of an {A, B} checkpoint: A, B or AB (mean of logits, the default); ignored for one")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("-g", "--gpu", default="0", help="CUDA device index used when --device is auto")
    p.add_argument("--speed", type=int, default=0, choices=sorted(STRIDES),
                   help="window strides (xy, z): 0 = (32, 16), 1 = (64, 16), 2 = (128, 32)")
    p.add_argument("--sw_batch_size", "--sw-batch-size", type=int, default=4, help="windows per forward")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="fp16 autocast (default: on for CUDA, off on CPU)")
    p.add_argument("--tta", action="store_true",
                   help="mirroring test-time augmentation: logits averaged over every flip of --tta_axes")
    p.add_argument("--tta_axes", type=int, nargs="+", default=list(TRAINED_MIRRORS), choices=(0, 1, 2),
                   metavar="AXIS", help="axes of the (D, H, W) grid mirrored by --tta (default 1 2: the two axes "
                                        "training flips, 4 passes; 0 1 2: 8 passes, also the slice axis)")
    p.add_argument("--save_probabilities", action="store_true",
                   help="also write OUT/<name>.npz: 'probabilities' float16 (C, D, H, W) on the scan's grid")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (refused otherwise)")
    return p.parse_args(argv)


def check_flags(args):
    if args.ckpt is not None and args.method is None:
        raise ConfigError("--ckpt needs --method (the method that trained it picks the network)")
    if args.exp is not None:
        given = [f for f, v in (("--method", args.method), ("--n_filters", args.n_filters),
                                ("--patch_size", args.patch_size)) if v is not None]
        if given:
            raise ConfigError(f"{given[0]}: only with --ckpt (with --exp the network comes from run.json)")
    if args.sw_batch_size < 1:
        raise ConfigError(f"--sw_batch_size {args.sw_batch_size}: must be >= 1")
    if args.patch_size is not None and min(args.patch_size) < 1:
        raise ConfigError(f"--patch_size {' '.join(map(str, args.patch_size))}: must be positive")


# ------------------------------------------------------------------------------------------------ inputs, outputs
def scan_name(path):
    """File name without .nii.gz / .nii (the stem of the .npz)."""
    base = os.path.basename(path)
    return next(base[:-len(s)] for s in SUFFIXES if base.endswith(s))


def find_scans(path):
    """The scans to segment: ``path`` itself, or the .nii.gz/.nii files of the folder ``path`` (sorted)."""
    if os.path.isdir(path):
        scans = sorted(os.path.join(path, n) for n in os.listdir(path)
                       if n.endswith(SUFFIXES) and not n.startswith(".") and n not in SUFFIXES
                       and os.path.isfile(os.path.join(path, n)))
        if not scans:
            raise DataError(f"{path}: no .nii.gz or .nii files in this folder")
        return scans
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    if not path.endswith(SUFFIXES) or os.path.basename(path) in SUFFIXES:
        raise DataError(f"{path}: not a NIfTI file name (expected .nii.gz or .nii)")
    return [path]


def output_paths(scans, out_dir, with_probabilities):
    """{scan: (label path, npz path or None)}. Writing into the input folder is refused (same names)."""
    outputs = {}
    for scan in scans:
        if os.path.abspath(os.path.dirname(scan)) == os.path.abspath(out_dir):
            raise ConfigError(f"-o {out_dir}: is the input folder; the outputs would replace the scans")
        npz = os.path.join(out_dir, scan_name(scan) + ".npz") if with_probabilities else None
        if npz is not None and any(npz == other for _, other in outputs.values()):
            raise ConfigError(f"{scan}: its probabilities would go to {npz} as another scan's (same name with "
                              ".nii and .nii.gz); rename one")
        outputs[scan] = (os.path.join(out_dir, os.path.basename(scan)), npz)
    return outputs


def check_existing(outputs, overwrite):
    existing = [p for pair in outputs.values() for p in pair if p is not None and os.path.lexists(p)]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]}: exists ({len(existing)} of the outputs do); pass --overwrite to "
                          "replace them")


def read_scan(path):
    """(intensities (D, H, W), SimpleITK image) of a 3-D single-channel scan; anything else is a DataError."""
    array, image = read_nifti(path)  # missing, truncated, corrupt: DataError
    size = "x".join(map(str, image.GetSize()))
    if image.GetDimension() != 3:
        raise DataError(f"{path}: a {image.GetDimension()}-D image (size {size}), expected a 3-D scan")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{path}: {image.GetNumberOfComponentsPerPixel()} values per voxel (a vector image), "
                        "expected one intensity per voxel")
    if min(array.shape) < 2:
        raise DataError(f"{path}: size {size} is one voxel thick: a 2-D slice, expected a 3-D scan")
    if array.dtype.kind not in "iuf":
        raise DataError(f"{path}: voxel type {array.dtype} is not a number")
    # ITK 5.4 reads NaN/inf as 0: count them in the file (nonfinite_counts), then in the array for other readers
    if array.dtype.kind == "f" and (any(nonfinite_counts(path)) or not np.isfinite(array).all()):
        raise DataError(f"{path}: image contains NaN or infinite intensities")
    return array, image


# NIfTI-1 header bytes that place the voxels in space: pixdim (qfac, spacing), xyzt_units, qform/sform codes,
# quaternion, offsets and the sform rows
GEOMETRY_BYTES = (slice(76, 108), slice(123, 124), slice(252, 328))


def nifti1_header(path):
    """(348 header bytes, byte order '<' or '>') of a NIfTI-1 file, or (None, None) for anything else."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        header = f.read(348)
    order = next((o for o in "<>" if len(header) == 348 and struct.unpack(o + "i", header[:4])[0] == 348), None)
    return (header, order) if order else (None, None)


def write_labels(path, labels, scan, image):
    """``labels`` as a uint8 NIfTI at ``path`` (atomically) on the scan's grid. SimpleITK writes it from the
    scan's spacing, origin and direction; then the geometry fields of the scan's own NIfTI-1 header
    (GEOMETRY_BYTES) are copied in, so both files place every voxel identically, bit for bit: SimpleITK alone
    re-derives an oblique direction through float32 fields and can differ from the scan by ~1e-9."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, plain = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-", suffix=".nii", dir=folder)
    os.close(fd)
    try:
        write_label_map(plain, labels, Geometry(spacing=image.GetSpacing(), origin=image.GetOrigin(),
                                                direction=image.GetDirection()))
        with open(plain, "rb") as f:
            data = bytearray(f.read())
    finally:
        os.remove(plain)
    source, order = nifti1_header(scan)
    if source is not None and struct.unpack(order + "i", bytes(data[:4]))[0] == 348:  # same byte order
        for field in GEOMETRY_BYTES:
            data[field] = source[field]
    with atomic_path(path) as tmp:
        write_bytes(tmp, gzip.compress(bytes(data), compresslevel=6) if path.endswith(".gz") else bytes(data))


def write_probabilities(path, probs, task):
    """``path`` (.npz, uncompressed): 'probabilities' float16 (C, D, H, W) in the label map's array order,
    'class_names' (C,) with 'background' first."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, probabilities=probs, class_names=np.array(("background",) + tuple(task.class_names)))


# ------------------------------------------------------------------------------------------------ one scan
def segment(scan, outputs, run_nets, task, args, device, strides):
    """Segment one scan and write its outputs; returns (scan shape, seconds per stage)."""
    start = time.perf_counter()
    raw, image = read_scan(scan)
    grid = prepare_scan(raw, task)
    loaded = time.perf_counter()
    try:
        prob = sliding_window_scores(run_nets.nets, grid, run_nets.patch_size, *strides, task.num_cls,
                                     args.sw_batch_size, device, args.amp, args.tta_axes if args.tta else ())
        _sync(device)
        windows = time.perf_counter()
        labels, probs = resample_to_scan(prob, raw.shape, keep_probabilities=args.save_probabilities)
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        raise DataError(f"{scan}: out of memory on {device} (scan {tuple(raw.shape)}, inference grid "
                        f"{tuple(grid.shape)}, --sw_batch_size {args.sw_batch_size}): lower --sw_batch_size "
                        "(or use --device cpu)") from None
    del prob
    resampled = time.perf_counter()
    label_path, npz_path = outputs
    if npz_path is not None:  # first, so a label map on disk means the scan is complete
        write_probabilities(npz_path, probs, task)
    write_labels(label_path, labels, scan, image)
    done = time.perf_counter()
    return raw.shape, {"read": loaded - start, "window": windows - loaded, "resample": resampled - windows,
                       "write": done - resampled, "total": done - start}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_inference_device(args):
    device = resolve_device(args.device, args.gpu)
    if distributed.launched_by_torchrun() and device.type == "cuda":  # one GPU per rank
        device = torch.device("cuda", distributed.local_rank())
    if args.amp and device.type != "cuda":
        raise ConfigError("--amp needs a CUDA device (fp16 autocast); CPU inference runs in fp32")
    return device


def load_nets(args, task, device):
    if args.exp is not None:
        return load_run_nets(task, args.exp, args.cps, device)
    return load_released_nets(task, args.ckpt, args.method, args.cps, device, args.n_filters, args.patch_size)


def run(args):
    """Segment every scan of ``args.input``; returns the scans that failed (this rank's and the others')."""
    check_flags(args)
    task = get_task(args.task)
    scans = find_scans(args.input)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise ConfigError(f"-o {args.output}: exists and is not a folder")
    outputs = output_paths(scans, args.output, args.save_probabilities)
    check_existing(outputs, args.overwrite)
    device = resolve_inference_device(args)
    run_nets = load_nets(args, task, device)
    strides = strides_for(args.speed, run_nets.patch_size)
    if distributed.is_main():
        os.makedirs(args.output, exist_ok=True)
        remove_stale_tmp(args.output)  # temporaries of killed runs
    distributed.barrier()
    log.info("%s x%d (%s) on %s, patch %s, speed %d%s: %d scan(s) -> %s", run_nets.spec["name"],
             len(run_nets.nets), "+".join(k or "bare" for k in run_nets.keys), device, run_nets.patch_size,
             args.speed, ", mirroring TTA" if args.tta else "", len(scans), args.output)
    failed, stopped = [], None
    try:
        segment_all(distributed.shard(scans), outputs, run_nets, task, args, device, strides, failed)
    except Exception as e:  # disk full, a bug: the other ranks must not wait for this one forever
        stopped = e
    ranks = distributed.gather_objects((failed, stopped is not None))
    if stopped is not None:
        raise stopped
    if any(rank_stopped for _, rank_stopped in ranks):
        raise DataError(f"{args.output}: another process stopped (its error names the cause); the scans "
                        "written so far are complete")
    return sorted(s for rank_failed, _ in ranks for s in rank_failed)


def segment_all(scans, outputs, run_nets, task, args, device, strides, failed):
    """Segment ``scans`` one by one (progress bar on a terminal, one line per scan); a bad scan is one error
    line and is appended to ``failed``."""
    with logging_redirect_tqdm():
        for scan in tqdm(scans, desc="predict", unit="scan", disable=None):
            try:
                shape, seconds = segment(scan, outputs[scan], run_nets, task, args, device, strides)
            except DataError as e:
                tqdm.write(f"error: {e}", file=sys.stderr)
                failed.append(scan)
                continue
            log.info("%s: %s -> %s in %.1f s (read %.1f, window %.1f, back to the scan's grid %.1f, write %.1f)",
                     os.path.basename(scan), "x".join(map(str, shape)), outputs[scan][0], seconds["total"],
                     seconds["read"], seconds["window"], seconds["resample"], seconds["write"])


@cli_main
def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if distributed.rank_from_env() == 0 else logging.WARNING,
                        format="%(message)s")
    if distributed.launched_by_torchrun():  # torchrun: the scans are split over the ranks
        distributed.init_from_env("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    try:
        failed = run(args)
    finally:
        distributed.shutdown()
    if failed:
        if distributed.rank_from_env() == 0:
            names = ", ".join(os.path.basename(s) for s in failed)
            print(f"error: {len(failed)} scan(s) failed: {names}; the others were written to {args.output}",
                  file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
