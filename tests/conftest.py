"""Shared fixtures: a tiny on-disk dataset in the phantom task's layout, the fast training flags, and the list of
method scripts (every ``code/train_<m>.py``), so a new method is picked up by the generic tests automatically."""
import glob
import os

import numpy as np
import pytest
import torch

from utils.io import write_list

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = sorted(os.path.basename(p)[len("train_"):-len(".py")]
                 for p in glob.glob(os.path.join(REPO, "code", "train_*.py")))

SHAPE = (24, 64, 64)  # stored; the phantom task halves in-plane -> 24 x 32 x 32
FAST = ["--task", "phantom", "--n_filters", "4", "--patch_size", "16", "32", "32", "--device", "cpu",
        "--num_workers", "0", "--eval_every", "1"]


def blob_case(rng):
    """Raw-HU volume with three bright boxes of classes 1..3 (class 3 small) on a soft-tissue background."""
    image = rng.normal(40, 10, SHAPE).astype(np.float32)
    label = np.zeros(SHAPE, np.int8)
    for cls, size, hu in ((1, 14, 200), (2, 10, -50), (3, 6, 250)):
        z, y, x = (rng.integers(0, s - size) for s in (SHAPE[0], SHAPE[1], SHAPE[2]))
        label[z:z + size, y:y + 2 * size, x:x + 2 * size] = cls
        image[label == cls] = rng.normal(hu, 10, (label == cls).sum())
    return image, label


@pytest.fixture(autouse=True)
def no_repository_data(tmp_path_factory, monkeypatch):
    """No test reads the repository's own raw data, phantom npy files or logs (after ``make demo`` they exist):
    those paths point into an empty temporary folder unless a test sets its own. The shipped split lists
    (``synapse_data/splits``, ``amos_data/splits``) stay visible."""
    root = tmp_path_factory.mktemp("no-repo-data")
    for var in ("DHC_SYNAPSE_RAW", "DHC_AMOS_RAW", "DHC_PHANTOM_RAW", "DHC_PHANTOM_DATA", "DHC_LOG_ROOT"):
        monkeypatch.setenv(var, str(root / var.lower()))


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    npy = tmp_path / "data" / "npy"
    npy.mkdir(parents=True)
    ids = [f"{i:04d}" for i in range(1, 9)]
    for i in ids:
        image, label = blob_case(rng)
        np.save(npy / f"{i}_image.npy", image)
        np.save(npy / f"{i}_label.npy", label)
    splits = tmp_path / "data" / "splits"
    write_list(splits / "labeled_20p.txt", ids[:2])
    write_list(splits / "unlabeled_20p.txt", ids[2:6])
    write_list(splits / "eval.txt", ids[6:])
    write_list(splits / "train.txt", ids[:6])
    monkeypatch.setenv("DHC_PHANTOM_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("DHC_LOG_ROOT", str(tmp_path / "logs"))
    return tmp_path


def last_nets(root, exp):
    return torch.load(root / "logs" / exp / "ckpts" / "last.pth", weights_only=False)["nets"]


