"""VolumeDataset, class_counts, seed_worker (docs/pipeline.md#dataset-and-normalisation, #loaders;
Q21, Q24, Q25, Q27 in docs/original-quirks.md)."""
import dataclasses
import os
import random
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data.dataset import VolumeDataset, class_counts, seed_worker
from data.transforms import make_train_transform
from utils.io import DataError
from utils.task import get_task


def _task(tmp_path, name="phantom"):
    return dataclasses.replace(get_task(name), data_dir=str(tmp_path))


def _write_case(task, case_id, image, label):
    os.makedirs(task.npy_dir, exist_ok=True)
    np.save(os.path.join(task.npy_dir, f"{case_id}_image.npy"), image)
    np.save(os.path.join(task.npy_dir, f"{case_id}_label.npy"), label)


def _write_split(task, split, text):
    os.makedirs(task.splits_dir, exist_ok=True)
    with open(task.split_path(split), "w") as f:
        f.write(text)


def _make_cases(task, n=3, shape=(4, 8, 10), label_dtype=np.int8):
    """Case k: HU volume whose window bounds are reached, label = k on one voxel row."""
    cases = {}
    for k in range(n):
        rng = np.random.RandomState(k)
        image = rng.uniform(-500, 600, size=shape).astype(np.float32)
        label = np.zeros(shape, dtype=label_dtype)
        label[:, 0, :] = k + 1
        label[0, 1, 1] = 13
        case_id = f"{k + 1:04d}"
        _write_case(task, case_id, image, label)
        cases[case_id] = (image, label)
    _write_split(task, "train", "".join(f"{i}\n" for i in sorted(cases, reverse=True)))
    return cases


def test_repeat_length_and_modulo_ids(tmp_path):
    task = _task(tmp_path)
    _make_cases(task)
    ds = VolumeDataset(task, "train", repeat=7)
    assert ds.ids == ["0001", "0002", "0003"] and len(ds) == 7
    for i in range(7):
        a, b = ds[i], ds[i % 3]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert int(ds[4]["label"][0, 0, 0]) == 2  # ids[4 % 3] = "0002", label 2 on row 0 (halved: row 0 kept)
    assert len(VolumeDataset(task, "train")) == 3
    with pytest.raises(IndexError):
        ds[7]


def test_unlabeled_zeroes_labels_but_returns_them(tmp_path):
    task = _task(tmp_path)
    _make_cases(task)
    ds = VolumeDataset(task, "train", unlabeled=True)
    for i in range(3):
        label = ds[i]["label"]
        assert label.dtype == torch.int64 and label.shape == (4, 4, 5) and int(label.abs().sum()) == 0
    assert int(next(ds.iter_stored_labels())[0, 0, 0]) == 1  # stored labels untouched on disk


def test_normalisation_window_and_min_max_without_halving_for_amos(tmp_path):
    task = _task(tmp_path, "amos")
    image = np.array([-1000, -75, 0, 100, 275, 3000, 200, -40], dtype=np.float32).reshape(2, 2, 2)
    _write_case(task, "amos_0001", image, np.zeros((2, 2, 2), np.float32))
    _write_split(task, "eval", "amos_0001\n")
    out = VolumeDataset(task, "eval")[0]["image"][0].numpy()
    expected = (np.clip(image, -75, 275) + 75) / 350  # clipped volume reaches both bounds
    assert out.shape == (2, 2, 2)  # AMOS: no in-plane halving
    np.testing.assert_allclose(out, expected, atol=1e-7)
    assert out.min() == 0.0 and out.max() == 1.0


def test_min_max_uses_the_clipped_volume_range_and_guards_zero_range(tmp_path):
    task = _task(tmp_path, "amos")
    _write_case(task, "amos_0001", np.array([0, 50, 100, 150], np.float32).reshape(1, 2, 2),
                np.zeros((1, 2, 2), np.uint8))
    _write_case(task, "amos_0002", np.full((1, 2, 2), 42.0, np.float32), np.zeros((1, 2, 2), np.uint8))
    _write_split(task, "eval", "amos_0001\namos_0002\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 0/0 RuntimeWarning (Q25)
        ds = VolumeDataset(task, "eval")
        np.testing.assert_allclose(ds[0]["image"].flatten().numpy(), [0, 1 / 3, 2 / 3, 1], atol=1e-7)
        assert ds[1]["image"].abs().sum() == 0


@pytest.mark.parametrize("name,halved", [("phantom", True), ("synapse", True), ("amos", False)])
def test_inplane_halving_per_task(tmp_path, name, halved):
    task = _task(tmp_path, name)
    cases = _make_cases(task, n=1)
    image, label = cases["0001"]
    ds = VolumeDataset(task, "train")
    out = ds[0]
    norm = (np.clip(image, -75, 275) - np.clip(image, -75, 275).min()) / np.ptp(np.clip(image, -75, 275))
    if halved:  # 2x2 in-plane mean of the normalised volume; label[:, ::2, ::2] (Q24)
        norm = norm.reshape(4, 4, 2, 5, 2).mean(axis=(2, 4))
        label = label[:, ::2, ::2]
    assert out["image"].shape == (1, *norm.shape)
    np.testing.assert_allclose(out["image"][0].numpy(), norm, atol=1e-6)
    np.testing.assert_array_equal(out["label"].numpy(), label.astype(np.int64))


def test_iter_stored_labels_are_full_resolution_as_stored(tmp_path):
    task = _task(tmp_path)
    cases = _make_cases(task)
    ds = VolumeDataset(task, "train")
    stored = list(ds.iter_stored_labels())
    assert [s.shape for s in stored] == [(4, 8, 10)] * 3  # not halved (Q27)
    for case_id, s in zip(ds.ids, stored):
        assert s.dtype == np.int8
        np.testing.assert_array_equal(s, cases[case_id][1])
    # class histogram of the stored volumes: per case 40 voxels of class k+1, 1 of class 13, 279 background
    counts = class_counts(stored, task.num_cls)
    assert counts.dtype == np.int64 and counts.shape == (14,)
    assert counts.tolist() == [3 * 279, 40, 40, 40] + [0] * 9 + [3]


def test_class_counts_float_labels_and_range():
    counts = class_counts([np.array([0.0, 2.0, 2.0]), np.array([[1, 1], [2, 0]], np.uint8)], 4)
    assert counts.tolist() == [2, 2, 3, 0]
    with pytest.raises(ValueError, match="outside 0..3"):
        class_counts([np.array([4])], 4)


def test_one_line_split_file(tmp_path):
    # np.loadtxt turned a one-line file into its characters in the original (Q21)
    task = _task(tmp_path)
    _make_cases(task, n=2)
    _write_split(task, "labeled_5p", "0002")
    ds = VolumeDataset(task, "labeled_5p")
    assert ds.ids == ["0002"] and len(ds) == 1 and int(ds[0]["label"][0, 0, 0]) == 2


def test_data_errors_name_the_file(tmp_path):
    task = _task(tmp_path)
    _make_cases(task, n=2)
    with pytest.raises(DataError, match="missing.txt: split file not found"):
        VolumeDataset(task, "missing")
    _write_split(task, "empty", "\n\n")
    with pytest.raises(DataError, match="empty.txt: split file is empty"):
        VolumeDataset(task, "empty")
    _write_split(task, "bad", "0001\n0009\n")
    with pytest.raises(DataError, match=r"npy/0009_image\.npy: npy file not found \(listed in .*bad\.txt\)"):
        VolumeDataset(task, "bad")
    _write_case(task, "0005", np.zeros((4, 8, 10), np.float32), np.zeros((4, 8, 8), np.int8))
    _write_split(task, "mismatch", "0005\n")
    with pytest.raises(DataError, match=r"0005_label\.npy: label shape \(4, 8, 8\) differs from image shape"):
        VolumeDataset(task, "mismatch")
    _write_case(task, "0006", np.zeros((4, 8, 10), np.float32), np.full((4, 8, 10), 14, np.int8))
    _write_split(task, "range", "0006\n")
    with pytest.raises(DataError, match=r"0006_label\.npy: label values 14\.\.14 outside 0\.\.13"):
        VolumeDataset(task, "range")
    nan = np.zeros((4, 8, 10), np.float32)
    nan[1, 2, 3] = np.nan
    _write_case(task, "0007", nan, np.zeros((4, 8, 10), np.int8))
    _write_split(task, "nan", "0007\n")
    with pytest.raises(DataError, match="0007_image.npy: image contains NaN"):
        VolumeDataset(task, "nan")


def _epoch(ds, seed):
    torch.manual_seed(seed)
    loader = DataLoader(ds, batch_size=2, shuffle=True, num_workers=2, worker_init_fn=seed_worker)
    return [(b["image"].clone(), b["label"].clone()) for b in loader]


def test_dataloader_with_seed_worker_is_reproducible(tmp_path):
    task = _task(tmp_path)
    _make_cases(task, n=3, shape=(8, 16, 16))
    ds = VolumeDataset(task, "train", repeat=6, transform=make_train_transform(task, (4, 4, 4)))
    first, again, other = _epoch(ds, 0), _epoch(ds, 0), _epoch(ds, 1)
    assert len(first) == 3 and first[0][0].shape == (2, 1, 4, 4, 4) and first[0][1].shape == (2, 4, 4, 4)
    for (xa, ya), (xb, yb) in zip(first, again):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(first, other))


def test_seed_worker_seeds_numpy_and_random_from_torch():
    torch.manual_seed(2 ** 32 + 123)  # reduced modulo 2**32
    seed_worker(0)
    assert np.random.rand() == np.random.RandomState(123).rand()
    assert random.random() == random.Random(123).random()
