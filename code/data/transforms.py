"""Per-volume preparation (intensity window, Synapse in-plane halving) and per-sample transforms.

See docs/pipeline.md#dataset-and-normalisation and #crops-and-flips; quirks Q22-Q26 (docs/original-quirks.md). Arrays
are (D, H, W). Per-volume work is done once per volume (Q24), never per sample.
"""
import numpy as np
import torch
import torch.nn.functional as F


def normalize_intensity(image, window=(-75.0, 275.0)):
    """Clip to the CT window, then per-volume min-max to [0, 1] (float32).

    A constant volume (zero range after clipping) maps to 0 instead of dividing by zero (Q25)."""
    lo, hi = window
    image = np.clip(np.asarray(image, dtype=np.float32), lo, hi)
    vmin, vmax = float(image.min()), float(image.max())
    if vmax - vmin <= 0:
        return np.zeros_like(image, dtype=np.float32)
    return ((image - vmin) / (vmax - vmin)).astype(np.float32, copy=False)


def resize_image(image, shape):
    """Trilinear (align_corners=False) resize of a (D, H, W) volume to ``shape``, float32 (F.interpolate)."""
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0].numpy()


def resize_label(label, shape):
    """Nearest resize of a (D, H, W) label volume to ``shape`` as the original (F.interpolate 'nearest' on a float
    tensor), keeping the dtype; a volume already of that shape is returned as it is."""
    label = np.asarray(label)
    if tuple(label.shape) == tuple(shape):
        return label
    t = torch.from_numpy(np.ascontiguousarray(label).astype(np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="nearest")[0, 0].numpy().astype(label.dtype)


def halve_inplane_image(image):
    """Trilinear resize (align_corners=False) of a (D, H, W) volume to (D, H//2, W//2), float32.

    For even H and W this equals the mean of each 2x2 in-plane block, computed without interpolation."""
    image = np.asarray(image, dtype=np.float32)
    d, h, w = image.shape
    if h % 2 == 0 and w % 2 == 0:
        return image.reshape(d, h // 2, 2, w // 2, 2).mean(axis=(2, 4), dtype=np.float32)
    return resize_image(image, (d, h // 2, w // 2))


def halve_inplane_label(label):
    """Nearest resize of a (D, H, W) label volume to (D, H//2, W//2), keeping the dtype.

    For even H and W PyTorch's nearest picks every second voxel (``label[:, ::2, ::2]``)."""
    label = np.asarray(label)
    d, h, w = label.shape
    if h % 2 == 0 and w % 2 == 0:
        return np.ascontiguousarray(label[:, ::2, ::2])
    return resize_label(label, (d, h // 2, w // 2))


def stored_volume(image, task):
    """Raw scan (D, H, W) -> the float32 volume preprocessing stores in ``<id>_image.npy``: raw intensities,
    resized trilinearly to ``task.fixed_grid`` (AMOS, Q19) or on the scan's own grid (Synapse, phantom)."""
    if task.fixed_grid:
        return resize_image(image, task.fixed_grid)
    return np.asarray(image, dtype=np.float32)


def prepare_image(image, task):
    """Stored raw-intensity volume -> normalised float32 volume on the training/inference grid."""
    image = normalize_intensity(image, task.window)
    return halve_inplane_image(image) if task.inplane_halving else image


def prepare_label(label, task):
    """Stored label volume -> int64-compatible label volume on the training/inference grid."""
    label = np.asarray(label)
    if label.dtype.kind == "f":  # AMOS labels are stored as float32 by the original (Q19)
        label = np.rint(label)
    label = label.astype(np.uint8 if label.max(initial=0) < 256 else np.int64)
    return halve_inplane_label(label) if task.inplane_halving else label


# ---------------------------------------------------------------------------------------------------------------
# Per-sample transforms (docs/pipeline.md#crops-and-flips) on *prepared* arrays: {"image": float32 (D, H, W), "label":
# int (D, H, W)}. Offsets and flips consume the numpy global RNG exactly as the original (np.random.randint per axis
# in D, H, W order, then two np.random.uniform per flip transform). Workers seeded by seed_worker take their numpy
# seed from the loader's base seed, which every epoch's loaders and every validation's eval loader draw from the
# global torch generator as the original's do; so with the original's loader settings (--num_workers 2, the CUDA
# default) a seeded run draws the original's crops in every epoch. With --num_workers 0 (the CPU default) the crops
# come from the main process's numpy stream instead (seeded by --seed) and are not the original's. Every transform is
# a module-level class: picklable for workers.
# ---------------------------------------------------------------------------------------------------------------


def _check_patch(patch_size):
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or min(patch) < 1:
        raise ValueError(f"patch_size must be three positive ints (D, H, W), got {tuple(patch_size)}")
    return patch


def random_crop_offsets(shape, patch):
    """Original RandomCrop offsets: ``np.random.randint(0, S - P)`` per axis, D then H then W.

    The upper bound is exclusive, so the flush-right offset S - P is never drawn (kept for fidelity, Q22).
    An axis with S <= P (where the original crashes) gets offset 0 without a draw and is padded by crop_or_pad."""
    return tuple(int(np.random.randint(0, s - p)) if s > p else 0 for s, p in zip(shape, patch))


def center_crop_offsets(shape, patch):
    """Original CenterCrop offsets ``int(round((S - P) / 2))``: Python round, half to even (Q23); 0 if S <= P."""
    return tuple(int(round((s - p) / 2.0)) if s > p else 0 for s, p in zip(shape, patch))


def crop_or_pad(array, offsets, patch):
    """``array[o:o+P]`` per axis; an axis with S <= P is kept whole and zero-padded symmetrically to P.

    Fixes the original's padding (Q22), which padded by (P - S)//2 + 3 from the un-halved shape without
    shifting the offsets; here every output is exactly ``patch`` and contains all of a small axis."""
    slices, pads = [], []
    for o, p, s in zip(offsets, patch, array.shape):
        if s <= p:
            before = (p - s) // 2
            slices.append(slice(None))
            pads.append((before, p - s - before))
        else:
            slices.append(slice(o, o + p))
            pads.append((0, 0))
    out = array[tuple(slices)]
    if any(b or a for b, a in pads):
        out = np.pad(out, pads, mode="constant", constant_values=0)
    return out


class RandomCrop:
    """Same random patch of every array in the sample (the original's RandomCrop, offsets from the image shape)."""

    def __init__(self, patch_size):
        self.patch_size = _check_patch(patch_size)

    def __call__(self, sample):
        offsets = random_crop_offsets(sample["image"].shape, self.patch_size)
        return {k: crop_or_pad(v, offsets, self.patch_size) for k, v in sample.items()}


class CenterCrop:
    """Central patch of every array in the sample (the original's CenterCrop, validation)."""

    def __init__(self, patch_size):
        self.patch_size = _check_patch(patch_size)

    def __call__(self, sample):
        offsets = center_crop_offsets(sample["image"].shape, self.patch_size)
        return {k: crop_or_pad(v, offsets, self.patch_size) for k, v in sample.items()}


class RandomFlip:
    """Flip every array along ``axis`` with probability ``prob``, as the original's RandomFlip_LR/_UD.

    Each call draws two U(0, 1) values and uses only the one at index ``draw`` (flip if <= prob): RandomFlip_LR
    is ``RandomFlip(axis=1, draw=0)`` (y), RandomFlip_UD is ``RandomFlip(axis=2, draw=1)`` (x) (Q26)."""

    def __init__(self, axis, draw, prob=0.5):
        self.axis, self.draw, self.prob = int(axis), int(draw), float(prob)

    def __call__(self, sample):
        draws = (np.random.uniform(0, 1), np.random.uniform(0, 1))
        if draws[self.draw] <= self.prob:
            return {k: np.flip(v, self.axis) for k, v in sample.items()}
        return sample


class ToTensor:
    """image -> float32 tensor [1, D, H, W]; label -> int64 tensor [D, H, W]; any other key is an error."""

    def __call__(self, sample):
        out = {}
        for key, item in sample.items():
            # ascontiguousarray copies crops (views of the cached volume) and flips (negative strides)
            if key == "image":
                out[key] = torch.from_numpy(np.ascontiguousarray(item, dtype=np.float32)).unsqueeze(0)
            elif key == "label":
                out[key] = torch.from_numpy(np.ascontiguousarray(item, dtype=np.int64))
            else:
                raise ValueError(f"ToTensor: unexpected sample key {key!r} (expected 'image' and 'label')")
        return out


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, sample):
        for t in self.transforms:
            sample = t(sample)
        return sample


def make_train_transform(task, patch_size=None, flip=True):
    """RandomCrop -> RandomFlip_LR -> RandomFlip_UD -> ToTensor, the original's training order.

    ``flip=False`` drops both flips (paper-era runs trained without them, Q26). ``patch_size`` defaults to the
    task's. The arrays must already be prepared (prepare_image/prepare_label), so no task-specific resize here."""
    steps = [RandomCrop(patch_size if patch_size is not None else task.patch_size)]
    if flip:
        steps += [RandomFlip(axis=1, draw=0), RandomFlip(axis=2, draw=1)]
    return Compose(steps + [ToTensor()])


def make_eval_transform(task, patch_size=None):
    """CenterCrop -> ToTensor (validation inside training, docs/pipeline.md#validation-and-checkpoints)."""
    return Compose([CenterCrop(patch_size if patch_size is not None else task.patch_size), ToTensor()])
