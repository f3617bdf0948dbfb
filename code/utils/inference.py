"""Sliding-window inference and the per-case inputs/geometry of ``code/test.py``.

See docs/pipeline.md#sliding-window-inference (window placement, logit mean, uniform averaging), #preprocessing
(stored npy); quirks (docs/original-quirks.md) Q40 (prediction geometry), Q41 (volumes smaller than the patch), Q42
(one preprocessing path).
Arrays are (D, H, W) = (z, y, x); tensors [B, C, D, H, W].
"""
import errno
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from itertools import combinations, product

import numpy as np
import torch
import torch.nn.functional as F

from data.transforms import prepare_image, stored_volume
from utils.device import place_module
from utils.io import DataError, atomic_path

log = logging.getLogger(__name__)

# test.py --speed -> (stride_xy, stride_z) in voxels
STRIDES = {0: (32, 16), 1: (64, 16), 2: (128, 32)}
ALL_MIRRORS = (0, 1, 2)  # every flip of the D, H and W axes (8 passes)
TRAINED_MIRRORS = (1, 2)  # --tta default: the axes training flips (H and W, data/transforms.py), 4 passes


def strides_for(speed, patch_size):
    """``--speed`` strides, capped at the patch: --speed 2 (xy 128) would leave gaps with the phantom's 64."""
    stride_xy, stride_z = STRIDES[speed]
    capped = min(stride_xy, patch_size[1], patch_size[2]), min(stride_z, patch_size[0])
    if capped != (stride_xy, stride_z):
        log.warning("--speed %d strides (xy %d, z %d) capped to the patch %s: (xy %d, z %d)", speed, stride_xy,
                    stride_z, tuple(patch_size), *capped)
    return capped


def window_starts(size, patch, stride):
    """Starts of the windows along one axis: ceil((size - patch) / stride) + 1 windows, the k-th at
    ``min(stride * k, size - patch)`` so the last one is flush with the border.

    Needs ``size >= patch`` (callers pad first, Q41)."""
    if patch < 1 or stride < 1:
        raise ValueError(f"patch ({patch}) and stride ({stride}) must be >= 1")
    if size < patch:
        raise ValueError(f"axis of size {size} is smaller than the patch ({patch}); pad it first (Q41)")
    count = math.ceil((size - patch) / stride) + 1
    return [min(stride * k, size - patch) for k in range(count)]


def _coverage(size, patch, starts):
    """How many windows cover each position of one axis (float32, >= 1 everywhere)."""
    cover = np.zeros(size, dtype=np.float32)
    for s in starts:
        cover[s:s + patch] += 1
    return cover


def prepare_net(net, device):
    """Move ``net`` (in place) to ``device`` in eval mode (channels-last-3d on CPU: outputs equal to ~3e-8)."""
    return place_module(net, device, channels_last=True).eval()


def _check_inputs(nets, image, patch_size, stride_xy, stride_z, num_classes, sw_batch_size):
    if isinstance(nets, torch.nn.Module):
        nets = [nets]
    nets = list(nets)
    if not nets:
        raise ValueError("nets is empty: pass at least one network")
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be a (D, H, W) array, got shape {image.shape}")
    patch_size = tuple(int(p) for p in patch_size)
    if len(patch_size) != 3 or min(patch_size) < 1:
        raise ValueError(f"patch_size must be 3 positive ints (D, H, W), got {patch_size}")
    for name, value in (("stride_xy", stride_xy), ("stride_z", stride_z), ("num_classes", num_classes),
                        ("sw_batch_size", sw_batch_size)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return nets, image, patch_size


def _pad_to_patch(image, patch_size):
    """Zero-pad each axis symmetrically (extra voxel after, like nnU-Net) to at least the patch (Q41).

    Returns the padded tensor and the slices that crop it back."""
    pads, crop = [], []
    for size, patch in zip(image.shape, patch_size):
        total = max(patch - size, 0)
        before = total // 2
        pads.append((before, total - before))
        crop.append(slice(before, before + size))
    if any(p != (0, 0) for p in pads):
        flat = [v for pair in reversed(pads) for v in pair]  # F.pad wants the last axis first
        image = F.pad(image, flat)
    return image, tuple(crop)


def mirror_sets(mirror_axes):
    """Every subset of ``mirror_axes`` (spatial axes of (D, H, W)), the empty one first: the flips of --tta."""
    axes = sorted(set(int(a) for a in mirror_axes))
    if any(a not in ALL_MIRRORS for a in axes):
        raise ValueError(f"mirror_axes must be among {ALL_MIRRORS} (D, H, W), got {tuple(mirror_axes)}")
    return [flip for r in range(len(axes) + 1) for flip in combinations(axes, r)]


def _forward(nets, x, amp, mirrors=((),)):
    """Mean of the nets' logits (the original's (A(x) + B(x)) / 2), then softmax, per window. With mirroring
    (--tta, not in the original) the mean also runs over the flipped windows, each output flipped back."""
    with torch.autocast(device_type=x.device.type, dtype=torch.float16, enabled=amp):
        logits = None
        for flip in mirrors:
            dims = [a + 2 for a in flip]  # [B, 1, D, H, W]
            x_in = x.flip(dims) if dims else x
            for net in nets:
                out = net(x_in)
                out = out[0] if isinstance(out, (tuple, list)) else out  # eval-mode nets return logits only
                out = out.float().flip(dims) if dims else out.float()
                logits = out if logits is None else logits + out
    return torch.softmax(logits / (len(nets) * len(mirrors)), dim=1)


def sliding_window_predict(nets, image, patch_size, stride_xy, stride_z, num_classes, sw_batch_size=4,
                           device=None, amp=None, return_probs=True, mirror_axes=()):
    """Label and probability maps of a (D, H, W) normalised float32 volume on the inference grid.

    Windows of ``patch_size`` (D, H, W) start at ``window_starts`` per axis (z with ``stride_z``, y and x with
    ``stride_xy``); per window p = softmax(mean_n logits_n); overlaps are averaged uniformly (score / count)
    and the label is the argmax. Volumes smaller than the patch are zero-padded and cropped back (Q41).
    ``amp`` None = fp16 autocast on CUDA, fp32 on CPU (the original ran fp32: pass amp=False to match).
    ``mirror_axes``: test-time mirroring over every flip of these axes (``sliding_window_scores``).
    Returns (label_map (D, H, W) int64, prob_map (C, D, H, W) float32 or None if not ``return_probs``).
    """
    score = sliding_window_scores(nets, image, patch_size, stride_xy, stride_z, num_classes, sw_batch_size,
                                  device, amp, mirror_axes)
    labels = score.argmax(dim=0).cpu().numpy().astype(np.int64)
    return labels, (score.cpu().numpy() if return_probs else None)


def sliding_window_scores(nets, image, patch_size, stride_xy, stride_z, num_classes, sw_batch_size=4,
                          device=None, amp=None, mirror_axes=()):
    """The averaged class probabilities of ``sliding_window_predict``, (C, D, H, W) float32 on ``device``.

    ``mirror_axes`` (spatial axes, e.g. (0, 1, 2)): every window is also run flipped along each subset of them
    (2**k passes) and the logits are averaged with the nets' before the softmax (nnU-Net's mirroring); () is
    the original's single pass."""
    nets, image, patch_size = _check_inputs(nets, image, patch_size, stride_xy, stride_z, num_classes,
                                            sw_batch_size)
    mirrors = mirror_sets(mirror_axes)
    if device is None:
        device = next(iter(nets[0].parameters()), torch.empty(0)).device
    device = torch.device(device)
    amp = (device.type == "cuda") if amp is None else bool(amp)
    volume = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32), device=device)
    volume, crop = _pad_to_patch(volume, patch_size)
    strides = (int(stride_z), int(stride_xy), int(stride_xy))
    starts = [window_starts(s, p, st) for s, p, st in zip(volume.shape, patch_size, strides)]
    if any(b - a > p for axis, p in zip(starts, patch_size) for a, b in zip(axis, axis[1:])):
        # the original would leave voxels no window covers (count 0 -> NaN probabilities)
        raise ValueError(f"strides (xy {stride_xy}, z {stride_z}) larger than the patch {patch_size} leave gaps")
    score = _accumulate(nets, volume, patch_size, starts, int(num_classes), int(sw_batch_size), amp, mirrors)
    # count map = product of the per-axis coverages (each window adds 1 to a box)
    cover = [torch.as_tensor(_coverage(s, p, st), device=device)
             for s, p, st in zip(volume.shape, patch_size, starts)]
    score /= cover[0][:, None, None] * cover[1][None, :, None] * cover[2][None, None, :]
    return score[(slice(None),) + crop]


def _accumulate(nets, volume, patch_size, starts, num_classes, sw_batch_size, amp, mirrors=((),)):
    """Sum of the per-window probabilities on the device, windows batched by ``sw_batch_size``.

    Batching matters on CPU too: for batch 1 and small layers PyTorch picks its native slow_conv3d instead of
    oneDNN (torch.profiler, phantom-size VNet), so 4 windows cost about what 1 does."""
    pd, ph, pw = patch_size
    score = torch.zeros((num_classes,) + tuple(volume.shape), dtype=torch.float32, device=volume.device)
    windows = list(product(*starts))
    with torch.inference_mode():
        for i in range(0, len(windows), sw_batch_size):
            batch = windows[i:i + sw_batch_size]
            windows_x = torch.stack([volume[z:z + pd, y:y + ph, x:x + pw] for z, y, x in batch])[:, None]
            prob = _forward(nets, windows_x, amp, mirrors)
            if prob.shape[1:] != (num_classes, pd, ph, pw):
                raise ValueError(f"network output {tuple(prob.shape[1:])} for a {patch_size} window; expected "
                                 f"({num_classes}, {pd}, {ph}, {pw})")
            for (z, y, x), p in zip(batch, prob):
                score[:, z:z + pd, y:y + ph, x:x + pw] += p
    return score


# ----------------------------------------------------------------------------------------------------------
# Per-case inputs and output geometry (test.py)

@dataclass(frozen=True)
class Geometry:
    """Header of a prediction: SimpleITK order (x, y, z), spacing in mm of the inference grid (Q40)."""
    spacing: tuple = (1.0, 1.0, 1.0)
    origin: tuple = (0.0, 0.0, 0.0)
    direction: tuple = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def grid_geometry(spacing, origin, direction, source_shape, grid_shape):
    """Geometry of ``grid_shape`` (D, H, W) resampled from a source of ``source_shape`` (D, H, W).

    Spacing is scaled per axis by source/grid size (Synapse in-plane x2, AMOS size/(80,160,160));
    origin and direction are the source's: voxel i of the grid is source voxel i*scale, as for the nearest-
    resized labels the networks were trained on (Q40)."""
    scale = [s / g for s, g in zip(reversed(source_shape), reversed(grid_shape))]  # -> (x, y, z)
    return Geometry(spacing=tuple(float(sp) * f for sp, f in zip(spacing, scale)),
                    origin=tuple(float(o) for o in origin), direction=tuple(float(d) for d in direction))


def raw_image_candidates(task, case_id):
    """Where the raw NIfTI of a case would be (docs/pipeline.md#raw-data), in lookup order."""
    if task.raw_layout == "amos":
        return [os.path.join(task.raw_dir, sub, f"{case_id}.nii.gz") for sub in ("imagesVa", "imagesTr")]
    return [os.path.join(task.raw_dir, "imagesTr", f"img{case_id}.nii.gz")]


def _meta_geometry(path, stored_shape):
    try:
        with open(path) as f:
            meta = json.load(f)
        spacing, origin, direction = meta["spacing"], meta["origin"], meta["direction"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: unreadable meta.json ({type(e).__name__}: {e})") from None
    if len(spacing) != 3 or len(origin) != 3 or len(direction) != 9:
        raise DataError(f"{path}: expected 3 spacing, 3 origin and 9 direction values")
    shape = tuple(meta.get("shape") or stored_shape)
    if shape != tuple(stored_shape):
        raise DataError(f"{path}: shape {list(shape)} does not match the stored image {list(stored_shape)}")
    return spacing, origin, direction, tuple(meta.get("source_shape") or shape)


def _raw_geometry(path):
    from utils.io import read_nifti_header
    reader = read_nifti_header(path)
    return reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(), tuple(reversed(reader.GetSize()))


def case_geometry(task, case_id, stored_shape, grid_shape):
    """Geometry of a case's prediction: from ``<id>_meta.json``, else the raw NIfTI header, else identity
    with spacing 1 (the original's header, Q40) and a warning."""
    meta_path = os.path.join(task.npy_dir, f"{case_id}_meta.json")
    if os.path.isfile(meta_path):
        return grid_geometry(*_meta_geometry(meta_path, stored_shape), grid_shape)
    for path in raw_image_candidates(task, case_id):
        if os.path.isfile(path):
            return grid_geometry(*_raw_geometry(path), grid_shape)
    log.warning("%s: no meta.json or raw NIfTI; prediction gets spacing 1, origin 0, identity direction", case_id)
    return Geometry()


def load_image(task, case_id):
    """The stored float32 raw-intensity volume ``<npy_dir>/<id>_image.npy``, checked."""
    path = os.path.join(task.npy_dir, f"{case_id}_image.npy")
    if not os.path.isfile(path):
        raise DataError(f"{path}: image not found (run preprocessing first)")
    try:
        image = np.load(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable npy ({e})") from None
    if image.ndim != 3:
        raise DataError(f"{path}: expected a (D, H, W) volume, found shape {list(image.shape)}")
    if image.dtype.kind not in "iuf":
        raise DataError(f"{path}: expected a numeric volume, found dtype {image.dtype}")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise DataError(f"{path}: image contains NaN or infinite intensities")
    return image


def prepare_case(task, case_id):
    """(normalised float32 volume on the inference grid, Geometry of that grid) for one case.

    ``prepare_image`` is the one preprocessing path of every method, Synapse halving included (Q42)."""
    stored = load_image(task, case_id)
    image = prepare_image(stored, task)
    return image, case_geometry(task, case_id, stored.shape, image.shape)


def write_label_map(path, labels, geometry):
    """uint8 labels with ``geometry``'s spacing, origin and direction (Q40), atomically. test.py passes the
    inference grid's geometry, predict.py the scan's own."""
    import SimpleITK as sitk
    assert labels.min() >= 0 and labels.max() < 256, "label ids must fit uint8"
    image = sitk.GetImageFromArray(labels.astype(np.uint8))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, tmp, True)
        except RuntimeError as e:  # ITK's write errors are RuntimeErrors: name a full disk as one
            if shutil.disk_usage(os.path.dirname(tmp)).free < 2 * labels.size:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from None
            raise DataError(f"{path}: cannot write the prediction ({str(e).strip().splitlines()[-1]})") from None


# ----------------------------------------------------------------------------------------------------------
# A new scan in, labels on its own grid out (predict.py, docs/pipeline.md#segmenting-new-scans)

def prepare_scan(image, task):
    """Raw scan (D, H, W) -> normalised float32 volume on the inference grid: the volume preprocessing would
    store (``stored_volume``: AMOS resized to 80x160x160) through test.py's ``prepare_image`` (clip, min-max,
    Synapse/phantom in-plane halving)."""
    return prepare_image(stored_volume(image, task), task)


def _lerp_z(prob, n_out, device):
    """(lo, hi, w) of the linear interpolation along z from prob's d grid slices to ``n_out`` scan slices: scan
    slice j = (1 - w) grid[lo] + w grid[hi] at grid coordinate j * d / n_out, clamped to the last grid slice."""
    n_in = prob.shape[1]
    coord = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = coord.floor().clamp(max=n_in - 1)
    w = (coord - lo).clamp(0, 1)
    lo = lo.long()
    return lo.to(device), (lo + 1).clamp(max=n_in - 1).to(device), w.to(device=device, dtype=torch.float32)


def _inplane(part, size):
    """Bilinear resize of (C, k, h, w) to (C, k, H, W) with scan voxel j at grid coordinate j * h / H: the last
    grid row/column is repeated once and F.interpolate's align_corners=True maps H + 1 outputs onto those h + 1
    inputs (coordinate j * h / H), of which the first H are kept."""
    if tuple(part.shape[2:]) == tuple(size):
        return part
    padded = F.pad(part, (0, 1, 0, 1), mode="replicate")
    out = F.interpolate(padded, size=(size[0] + 1, size[1] + 1), mode="bilinear", align_corners=True)
    return out[:, :, :size[0], :size[1]]


def resample_to_scan(prob, shape, keep_probabilities=False, chunk_bytes=1 << 28):
    """Class probabilities (C, d, h, w) on the inference grid -> (labels uint8 (D, H, W), probabilities float16
    (C, D, H, W) or None) on the scan's grid ``shape``, argmax taken there.

    Trilinear interpolation that puts grid voxel i on scan voxel i * N / n along each axis (N scan, n grid
    voxels), where the nearest-resized training labels (``label[:, ::2, ::2]`` for Synapse) and test.py's header
    put it: scan voxel j takes grid coordinate j * n / N, scan voxels past the last grid voxel take its value, and
    where a grid voxel falls on a scan voxel the value is exactly the grid's. Runs on ``prob``'s device in slabs of
    scan slices of about ``chunk_bytes``, so a 148x512x512 scan never needs its whole float32 volume at once."""
    shape = tuple(int(s) for s in shape)
    num_classes, device = prob.shape[0], prob.device
    z_lo, z_hi, z_w = _lerp_z(prob, shape[0], device)
    labels = np.empty(shape, dtype=np.uint8)
    probs = np.empty((num_classes,) + shape, dtype=np.float16) if keep_probabilities else None
    slab = max(1, chunk_bytes // (4 * num_classes * (shape[1] + 1) * (shape[2] + 1)))
    for z0 in range(0, shape[0], slab):
        z = slice(z0, min(z0 + slab, shape[0]))
        part = prob.index_select(1, z_lo[z])
        part = part + (prob.index_select(1, z_hi[z]) - part) * z_w[z].view(1, -1, 1, 1)  # exactly grid where w = 0
        part = _inplane(part, shape[1:])
        # torch.max's indices: the first maximum, as argmax, but 4x faster on the CPU (measured, 14 classes)
        labels[z] = torch.max(part, dim=0).indices.to(torch.uint8).cpu().numpy()
        if probs is not None:
            probs[:, z] = part.to(torch.float16).cpu().numpy()
    return labels, probs
