"""Training/validation dataset over the preprocessed npy volumes (docs/pipeline.md#dataset-and-normalisation, #loaders;
Qn: docs/original-quirks.md).

Unlike the original ``Synapse_AMOS``, which re-read both npy files and re-did the intensity window and the
Synapse in-plane halving of the whole volume on every sample (Q24), every volume is loaded and prepared once
at construction and kept in memory; per sample only the crop, flips and tensor conversion remain.
"""
import logging
import os
import random

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from data.transforms import prepare_image, prepare_label
from utils.io import DataError, read_list

log = logging.getLogger(__name__)


def npy_paths(task, case_id):
    """(image path, label path) of one preprocessed case (brief: ``<data_dir>/npy/<id>_{image,label}.npy``)."""
    return (os.path.join(task.npy_dir, f"{case_id}_image.npy"),
            os.path.join(task.npy_dir, f"{case_id}_label.npy"))


def load_npy(path, split_path=None):
    """``np.load`` with a one-line DataError for a missing or unreadable file."""
    if not os.path.isfile(path):
        listed = f" (listed in {split_path})" if split_path else ""
        raise DataError(f"{path}: npy file not found{listed}; run preprocessing first")
    try:
        return np.load(path)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: unreadable npy file ({e}); preprocessing rewrites damaged files") from None


def check_label_values(label, label_path, num_cls):
    """Stored labels are class ids: integer values in 0..C-1 (float arrays allowed, Q19, but no 1.5 that a
    reader would round into another class); DataError naming the file otherwise."""
    if label.dtype.kind not in "iubf":
        raise DataError(f"{label_path}: expected integer class ids, found dtype {label.dtype}")
    if label.dtype.kind == "f":
        if not np.isfinite(label).all():
            raise DataError(f"{label_path}: label contains NaN or infinite values")
        if (label != np.rint(label)).any():
            raise DataError(f"{label_path}: non-integer label values")
    lo, hi = label.min(), label.max()
    if lo < 0 or hi > num_cls - 1:
        raise DataError(f"{label_path}: label values {lo}..{hi} outside 0..{num_cls - 1}")


def check_pair(image, label, image_path, label_path, num_cls):
    """Shapes, NaNs, dtypes and label values of one stored case; DataError naming the file otherwise."""
    if image.ndim != 3:
        raise DataError(f"{image_path}: expected a 3-D (D, H, W) volume, got shape {image.shape}")
    if label.shape != image.shape:
        raise DataError(f"{label_path}: label shape {label.shape} differs from image shape {image.shape} "
                        f"({image_path})")
    if image.dtype.kind not in "iuf":
        raise DataError(f"{image_path}: expected a numeric volume, found dtype {image.dtype}")
    if image.dtype.kind == "f" and np.isnan(image).any():
        raise DataError(f"{image_path}: image contains NaN intensities")
    check_label_values(label, label_path, num_cls)


class VolumeDataset(Dataset):
    """Cases of one split, prepared once and kept in memory.

    ``__len__`` is ``repeat`` (the labeled loader cycles its few cases N_u times) or the number of ids;
    item ``i`` is case ``ids[i % n]`` as ``transform({"image": float32 (D,H,W), "label": uint8 (D,H,W)})``,
    normally {"image": FloatTensor [1,D,H,W], "label": LongTensor [D,H,W]}. ``unlabeled=True`` zeroes the
    label (still returned, as the original). Without a transform the prepared arrays are returned as tensors.
    Holds no TaskConfig, so it pickles into DataLoader workers under any start method."""

    def __init__(self, task, split, *, repeat=None, transform=None, unlabeled=False):
        self.split = split
        self.split_path = task.split_path(split)
        self.ids = read_list(self.split_path)
        if repeat is not None and int(repeat) < 1:
            raise ValueError(f"repeat must be a positive int or None, got {repeat!r}")
        self.repeat = None if repeat is None else int(repeat)
        self.transform = transform
        self.unlabeled = bool(unlabeled)
        self.num_cls = task.num_cls
        self._paths = [npy_paths(task, i) for i in self.ids]
        self._images, self._labels = [], []
        for paths in tqdm(self._paths, desc=f"loading {split}", leave=False, disable=None):
            image, label = self._load_prepared(task, *paths)
            self._images.append(image)
            self._labels.append(label)
        log.info("split %s: %d cases, %d samples per epoch", split, len(self.ids), len(self))

    def _load_prepared(self, task, image_path, label_path):
        image = load_npy(image_path, self.split_path)
        label = load_npy(label_path, self.split_path)
        check_pair(image, label, image_path, label_path, self.num_cls)
        image = prepare_image(image, task)  # window + min-max (Q25), then Synapse/phantom halving (Q24)
        label = prepare_label(label, task)
        if self.unlabeled:  # "for safety", as the original: unlabeled cases never expose their labels
            label = np.zeros_like(label)
        return image, label

    def __len__(self):
        return self.repeat if self.repeat is not None else len(self.ids)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        k = index % len(self.ids)
        sample = {"image": self._images[k], "label": self._labels[k]}
        if self.transform is None:
            return {"image": torch.from_numpy(sample["image"].copy()).unsqueeze(0),
                    "label": torch.from_numpy(sample["label"].astype(np.int64))}
        return self.transform(sample)

    def prepared(self, k):
        """(image, label) of case ``ids[k]`` on the training grid, read-only views of the cache."""
        image, label = self._images[k].view(), self._labels[k].view()
        image.flags.writeable = label.flags.writeable = False
        return image, label

    def iter_stored_labels(self):
        """Each case's label exactly as stored on disk (full resolution, before halving), re-read lazily.

        DistDW initialises from these full stored volumes, not from crops (Q27)."""
        for _, label_path in self._paths:
            yield load_npy(label_path, self.split_path)


def class_counts(labels, num_cls):
    """Voxel count per class (int64, length ``num_cls``) over an iterable of label arrays of any int/float dtype.

    Values outside 0..num_cls-1 raise ValueError (bincount's minlength would silently grow the histogram)."""
    counts = np.zeros(num_cls, dtype=np.int64)
    for label in labels:
        label = np.asarray(label)
        if label.dtype.kind == "f":  # AMOS labels were stored as float32 (Q19)
            label = np.rint(label)
        flat = label.astype(np.int64, copy=False).ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= num_cls):
            raise ValueError(f"label values {flat.min()}..{flat.max()} outside 0..{num_cls - 1}")
        counts += np.bincount(flat, minlength=num_cls)
    return counts


def seed_worker(worker_id):
    """DataLoader ``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed (docs/pipeline.md#loaders).

    The torch seed is base_seed + worker_id, the base drawn from the main torch RNG per iterator, so the
    crops and flips (numpy global RNG) differ per worker and per epoch yet follow ``torch.manual_seed``."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)
