"""NIfTI -> npy + splits (docs/pipeline.md#preprocessing, #splits; Q15, Q16, Q19, Q20 in
docs/original-quirks.md; bad input as the README's Preprocessing section)."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from data.preprocess import ORIGINAL_TEST, preprocess, synapse_splits
from data.preprocess import main as preprocess_main
from data.preprocess_amos import amos_splits
from data.preprocess_amos import main as amos_main
from data.preprocess_amos import preprocess as preprocess_amos
from data.preprocess_common import format_summary, labeled_split
from utils.io import DataError
from utils.task import REPO_ROOT, get_task

SPACING, ORIGIN = (0.75, 0.625, 2.5), (-10.0, 20.0, 30.5)
DIRECTION = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)  # non-trivial: x/y swapped, z flipped
SYNAPSE_IDS = [f"{i:04d}" for i in [*range(1, 11), *range(21, 41)]]  # the 30 BTCV training cases


def ids_of(n):
    return [f"{i:04d}" for i in range(1, n + 1)]


def write_nifti(path, array):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sitk.WriteImage(image, str(path))


def synapse_paths(raw, cid, btcv=False):
    img, lbl = ("Training/img", "Training/label") if btcv else ("imagesTr", "labelsTr")
    return os.path.join(raw, img, f"img{cid}.nii.gz"), os.path.join(raw, lbl, f"label{cid}.nii.gz")


def make_synapse(raw, ids, shape=(2, 4, 4), btcv=False, seed=0):
    """Random int16 HU image + uint8 labels 0..13 per id; returns {id: (image, label)}."""
    rng, data = np.random.default_rng(seed), {}
    for cid in ids:
        image = rng.integers(-1000, 1500, shape).astype(np.int16)
        label = rng.integers(0, 14, shape).astype(np.uint8)
        img_path, lbl_path = synapse_paths(raw, cid, btcv)
        write_nifti(img_path, image)
        write_nifti(lbl_path, label)
        data[cid] = image, label
    return data


def snapshot(root):
    """{relative path: bytes} of every file under root (hidden staging folders included)."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                out[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return out


def split_file(out, name):
    with open(os.path.join(out, "splits", f"{name}.txt")) as f:
        return f.read()


def read_splits(out):
    return {n[:-4]: split_file(out, n[:-4]).split() for n in os.listdir(os.path.join(out, "splits"))
            if n.endswith(".txt")}


def check_partition(splits, ids, ratios):
    assert sorted(splits["train"] + splits["eval"] + splits["test"]) == sorted(ids)  # complete, disjoint
    for p in ratios:
        lab, unl = splits[f"labeled_{p}p"], splits[f"unlabeled_{p}p"]
        assert sorted(lab + unl) == splits["train"]
        assert len(lab) == max(1, len(splits["train"]) * p // 100)
    for members in splits.values():
        assert members == sorted(members)


# ---------------------------------------------------------------- Synapse / phantom layout

def test_round_trip_values_dtypes_and_meta(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    data = make_synapse(raw, ids_of(6), shape=(8, 16, 16))
    summary = preprocess("synapse", raw_dir=str(raw), out_dir=str(out), progress=False)
    assert summary["converted"] == ids_of(6) and summary["skipped"] == []
    for cid, (image, label) in data.items():
        stored_image = np.load(out / "npy" / f"{cid}_image.npy")
        stored_label = np.load(out / "npy" / f"{cid}_label.npy")
        assert stored_image.dtype == np.float32 and stored_label.dtype == np.int8
        np.testing.assert_array_equal(stored_image, image.astype(np.float32))  # raw HU, no resampling
        np.testing.assert_array_equal(stored_label, label)
        meta = json.loads((out / "npy" / f"{cid}_meta.json").read_text())
        src = sitk.ReadImage(synapse_paths(raw, cid)[0])
        assert meta == {"spacing": list(src.GetSpacing()), "origin": list(src.GetOrigin()),
                        "direction": list(src.GetDirection()), "shape": [8, 16, 16], "source_shape": [8, 16, 16],
                        "source": synapse_paths(raw, cid)[0]}
        np.testing.assert_allclose(meta["spacing"], SPACING)
        np.testing.assert_allclose(meta["origin"], ORIGIN)
        np.testing.assert_allclose(meta["direction"], DIRECTION, atol=1e-6)


def test_btcv_layout_is_accepted(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    data = make_synapse(raw, ids_of(6), btcv=True)
    preprocess("synapse", raw_dir=str(raw), out_dir=str(out), progress=False)
    assert sorted(os.listdir(out / "npy")) == sorted(f"{c}_{k}" for c in ids_of(6)
                                                     for k in ("image.npy", "label.npy", "meta.json"))
    np.testing.assert_array_equal(np.load(out / "npy" / "0004_label.npy"), data["0004"][1])
    assert json.loads((out / "npy" / "0004_meta.json").read_text())["source"].endswith("Training/img/img0004.nii.gz")


def test_random_rule_counts_partition_and_determinism(tmp_path):
    raw = tmp_path / "raw"
    make_synapse(raw, ids_of(20))  # phantom-sized: no original test ids -> seeded 80/20 rule
    summary = preprocess("phantom", raw_dir=str(raw), out_dir=str(tmp_path / "a"), seed=3, progress=False)
    splits = read_splits(tmp_path / "a")
    # 20 -> int(0.8*20) = 16 train+eval, 4 test; int(16*5/6) = 13 train, 3 eval; labeled 1, 2, 5 of 13.
    assert {n: len(v) for n, v in splits.items()} == {
        "train": 13, "eval": 3, "test": 4, "labeled_10p": 1, "unlabeled_10p": 12, "labeled_20p": 2,
        "unlabeled_20p": 11, "labeled_40p": 5, "unlabeled_40p": 8}
    assert summary["splits"] == {n: len(v) for n, v in splits.items()}
    check_partition(splits, ids_of(20), (10, 20, 40))
    assert split_file(tmp_path / "a", "test") == "".join(f"{i}\n" for i in splits["test"])  # one id per line
    info = json.loads((tmp_path / "a" / "splits" / "split_info.json").read_text())
    assert info["seed"] == 3 and info["task"] == "phantom" and info["kept"] == []
    assert info["counts"] == {n: len(v) for n, v in splits.items()}
    assert "int(0.8 N)" in info["rules"]["test"] and info["rules"]["labeled_10p"] == (
        "labeled_10p = first max(1, int(n*p/100)) of a permutation (default_rng([seed, p])) of the sorted train ids; "
        "unlabeled_10p = the rest")
    preprocess("phantom", raw_dir=str(raw), out_dir=str(tmp_path / "b"), seed=3, progress=False)
    preprocess("phantom", raw_dir=str(raw), out_dir=str(tmp_path / "c"), seed=4, progress=False)
    assert read_splits(tmp_path / "b") == splits
    assert read_splits(tmp_path / "c")["train"] != splits["train"]


def test_original_test_ids_are_the_test_split(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_synapse(raw, SYNAPSE_IDS, shape=(1, 2, 2))
    preprocess("synapse", raw_dir=str(raw), out_dir=str(out), progress=False)
    splits = read_splits(out)
    assert splits["test"] == list(ORIGINAL_TEST)  # Q15: HEAD test.txt
    assert [len(splits[n]) for n in ("train", "eval", "labeled_10p", "labeled_20p", "labeled_40p")] == [20, 4, 2, 4, 8]
    check_partition(splits, SYNAPSE_IDS, (10, 20, 40))
    assert "Q15" in json.loads((out / "splits" / "split_info.json").read_text())["rules"]["train"]


def test_split_rules_reproduce_the_original_counts():
    other30 = [f"{i:04d}" for i in range(101, 131)]  # 30 ids without the original test ids: 24 / 6 -> 20 / 4 / 6
    assert [len(v) for v in synapse_splits(other30, None, 0)[0].values()] == [20, 4, 6]
    assert synapse_splits(other30, None, 0) == synapse_splits(other30, None, 0)
    train = synapse_splits(SYNAPSE_IDS, None, 0)[0]["train"]
    assert [len(labeled_split(train, p, 0)[f"labeled_{p}p"]) for p in (10, 20, 40)] == [2, 4, 8]
    tr, va = [f"amos_{i:04d}" for i in range(1, 241)], [f"amos_{i:04d}" for i in range(301, 421)]
    amos = amos_splits(tr, va, None, 0)[0]
    assert [len(amos[n]) for n in ("train", "eval", "test")] == [216, 24, 120] and amos["test"] == va
    # 216 train: int(216*p/100) = 4, 10, 21 labeled for p = 2, 5, 10 (docs/pipeline.md#splits)
    assert [len(labeled_split(amos["train"], p, 0)[f"labeled_{p}p"]) for p in (2, 5, 10)] == [4, 10, 21]


def write_list_file(out, name, ids):
    os.makedirs(out / "splits", exist_ok=True)
    (out / "splits" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))


def test_existing_splits_and_npy_kept_unless_force(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    data = make_synapse(raw, ids_of(8))
    custom = {"train": ["0001", "0002", "0003", "0004"], "eval": ["0005", "0006"], "test": ["0007", "0008"]}
    for name, ids in custom.items():
        write_list_file(out, name, ids)
    summary = preprocess("synapse", raw_dir=str(raw), out_dir=str(out), ratios=[40], progress=False)
    assert summary["splits_kept"] == ["train", "eval", "test"]
    assert summary["splits_written"] == ["labeled_40p", "unlabeled_40p"]
    splits = read_splits(out)
    assert {n: splits[n] for n in custom} == custom
    check_partition(splits, ids_of(8), (40,))  # labeled 1 of the kept 4 train ids
    info = json.loads((out / "splits" / "split_info.json").read_text())
    assert info["kept"] == ["train", "eval", "test"] and info["seeds"]["train"] is None

    marker = np.zeros(data["0001"][0].shape, np.float32)  # intact and of the label's shape: kept
    np.save(out / "npy" / "0001_image.npy", marker)  # a re-run skips existing cases ...
    summary = preprocess("synapse", raw_dir=str(raw), out_dir=str(out), ratios=[40], progress=False)
    assert summary["skipped"] == ids_of(8) and summary["splits_written"] == []
    np.testing.assert_array_equal(np.load(out / "npy" / "0001_image.npy"), marker)

    summary = preprocess("synapse", raw_dir=str(raw), out_dir=str(out), ratios=[40], force=True, progress=False)
    assert summary["converted"] == ids_of(8) and summary["splits_kept"] == []  # ... --force rewrites everything
    np.testing.assert_array_equal(np.load(out / "npy" / "0001_image.npy"), data["0001"][0])
    fresh = synapse_splits(ids_of(8), None, 0)[0]
    assert {n: read_splits(out)[n] for n in custom} == fresh != custom


def test_case_whose_source_changed_is_converted_again(tmp_path):
    """A kept case whose NIfTI was rewritten after its npy (a regenerated phantom, a corrected label) is stale:
    converted again, the others kept, and the summary says which file and why."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_synapse(raw, ids_of(6))
    preprocess("synapse", raw_dir=str(raw), out_dir=str(out), ratios=[40], progress=False)
    corrected = np.full((2, 4, 4), 3, np.uint8)
    label_path = synapse_paths(raw, "0002")[1]
    write_nifti(label_path, corrected)
    earlier = os.path.getmtime(label_path) - 100  # times apart, not within one second: image < npy < label
    os.utime(synapse_paths(raw, "0002")[0], (earlier, earlier))
    for kind in ("image.npy", "label.npy", "meta.json"):
        os.utime(out / "npy" / f"0002_{kind}", (earlier + 10, earlier + 10))
    summary = preprocess("synapse", raw_dir=str(raw), out_dir=str(out), ratios=[40], progress=False)
    assert summary["converted"] == ["0002"] and summary["skipped"] == ["0001", *ids_of(6)[2:]]
    np.testing.assert_array_equal(np.load(out / "npy" / "0002_label.npy"), corrected)
    assert f"converted again: {label_path}: newer than its preprocessed copy" in format_summary(summary)
    again = preprocess("synapse", raw_dir=str(raw), out_dir=str(out), ratios=[40], progress=False)
    assert again["converted"] == []  # the new copy is newer than its source: kept from now on


def test_existing_test_list_alone_is_kept(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_synapse(raw, ids_of(8))
    write_list_file(out, "test", ["0002", "0005"])  # the original ships only test.txt (Q15)
    preprocess("synapse", raw_dir=str(raw), out_dir=str(out), progress=False)
    splits = read_splits(out)
    assert splits["test"] == ["0002", "0005"] and (len(splits["train"]), len(splits["eval"])) == (5, 1)
    check_partition(splits, ids_of(8), (10, 20, 40))


def test_cases_outside_kept_splits_are_reported(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_synapse(raw, ids_of(6))
    for name, ids in {"train": ["0001", "0002"], "eval": ["0003"], "test": ["0004", "0005"]}.items():
        write_list_file(out, name, ids)
    summary = preprocess("synapse", raw_dir=str(raw), out_dir=str(out), ratios=[40], progress=False)
    assert summary["unsplit"] == ["0006"]
    assert format_summary(summary).splitlines()[-1] == (
        "warning: 1 cases are in none of the kept train/eval/test lists: 0006")


@pytest.mark.parametrize("lists, message", [
    ({"train": ["0001", "0002"]}, "{s}: has train.txt but not eval.txt test.txt; use --force to regenerate the splits"),
    ({"train": ["0001", "0002", "0003"], "eval": ["0004"], "test": ["0003", "0005"]},
     "{s}/train.txt: shares ids 0003 with test.txt"),
    ({"train": ["0001", "0002"], "eval": ["0004"], "test": ["0099"]},
     "{s}/test.txt: ids 0099 are not among the cases in {raw}; use --force to regenerate the splits"),
])
def test_inconsistent_existing_splits_are_refused(tmp_path, lists, message):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_synapse(raw, ids_of(6))
    for name, ids in lists.items():
        write_list_file(out, name, ids)
    before = snapshot(tmp_path)
    with pytest.raises(DataError) as e:
        preprocess("synapse", raw_dir=str(raw), out_dir=str(out), progress=False)
    assert str(e.value) == message.format(s=out / "splits", raw=raw)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- AMOS

def test_amos_fixed_grid_va_is_test_and_90_10(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    task = dataclasses.replace(get_task("amos"), fixed_grid=(8, 16, 16))
    rng, data = np.random.default_rng(1), {}
    tr, va = [f"amos_{i:04d}" for i in range(1, 11)], ["amos_0501", "amos_0502", "amos_0503"]
    for sub, ids in (("Tr", tr), ("Va", va)):
        for cid in ids:
            image = rng.normal(0, 100, (16, 32, 32)).astype(np.float32)
            label = rng.integers(0, 16, (16, 32, 32)).astype(np.uint8)
            write_nifti(os.path.join(raw, f"images{sub}", f"{cid}.nii.gz"), image)
            write_nifti(os.path.join(raw, f"labels{sub}", f"{cid}.nii.gz"), label)
            data[cid] = image, label
    summary = preprocess_amos(task, raw_dir=str(raw), out_dir=str(out), progress=False)
    assert summary["converted"] == sorted(tr + va)
    for cid, (image, label) in data.items():
        stored_image = np.load(out / "npy" / f"{cid}_image.npy")
        stored_label = np.load(out / "npy" / f"{cid}_label.npy")
        assert stored_image.dtype == np.float32 and stored_label.dtype == np.uint8  # Q19: uint8, not float32
        # Trilinear (align_corners=False) halving of every axis = mean of each 2x2x2 block; nearest = every 2nd voxel.
        np.testing.assert_allclose(stored_image, image.reshape(8, 2, 16, 2, 16, 2).mean(axis=(1, 3, 5)), atol=1e-4)
        np.testing.assert_array_equal(stored_label, label[::2, ::2, ::2])
        meta = json.loads((out / "npy" / f"{cid}_meta.json").read_text())
        assert (meta["shape"], meta["source_shape"]) == ([8, 16, 16], [16, 32, 32])
        np.testing.assert_allclose(meta["spacing"], SPACING)
    splits = read_splits(out)
    assert splits["test"] == va and (len(splits["train"]), len(splits["eval"])) == (9, 1)  # int(0.9*10) = 9
    check_partition(splits, tr + va, (2, 5, 10))
    assert [len(splits[f"labeled_{p}p"]) for p in (2, 5, 10)] == [1, 1, 1]  # int(9*p/100) = 0 -> at least 1


def test_amos_odd_shapes_reach_the_grid(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    task = dataclasses.replace(get_task("amos"), fixed_grid=(4, 6, 6))
    cases = (("Tr", "amos_0001", (5, 9, 7)), ("Tr", "amos_0002", (3, 4, 4)), ("Tr", "amos_0003", (4, 6, 6)),
             ("Va", "amos_0500", (2, 8, 9)))
    for sub, cid, shape in cases:
        write_nifti(os.path.join(raw, f"images{sub}", f"{cid}.nii.gz"), np.full(shape, 42.0, np.float32))
        write_nifti(os.path.join(raw, f"labels{sub}", f"{cid}.nii.gz"), np.full(shape, 7, np.uint8))
    preprocess_amos(task, raw_dir=str(raw), out_dir=str(out), progress=False)
    for _, cid, _ in cases:
        np.testing.assert_allclose(np.load(out / "npy" / f"{cid}_image.npy"), np.full((4, 6, 6), 42.0), rtol=1e-6)
        np.testing.assert_array_equal(np.load(out / "npy" / f"{cid}_label.npy"), np.full((4, 6, 6), 7))


# ---------------------------------------------------------------- bad input: one line, nothing written

def _rm(path):
    os.remove(path)


def _with(dtype, value):
    """A (4, 8, 8) volume of ones with one voxel set to ``value`` (ITK reads NaN/inf back as 0)."""
    volume = np.ones((4, 8, 8), dtype)
    volume[2, 3, 4] = value
    return volume


BAD_INPUTS = {
    "image without label": (lambda raw: _rm(synapse_paths(raw, "0003")[1]),
                            "{img3}: image without label (expected {lbl3})"),
    "label without image": (lambda raw: _rm(synapse_paths(raw, "0003")[0]),
                            "{lbl3}: label without image (expected {img3})"),
    "shape mismatch": (lambda raw: write_nifti(synapse_paths(raw, "0003")[1], np.zeros((4, 8, 9), np.uint8)),
                       "{lbl3}: label shape (4, 8, 9) differs from image shape (4, 8, 8) ({img3})"),
    "label out of range": (lambda raw: write_nifti(synapse_paths(raw, "0003")[1], np.full((4, 8, 8), 14, np.uint8)),
                           "{lbl3}: label values 14..14 outside 0..13"),
    "non-integer label": (lambda raw: write_nifti(synapse_paths(raw, "0003")[1], np.full((4, 8, 8), 1.5, np.float32)),
                          "{lbl3}: non-integer label values"),
    "NaN intensities": (lambda raw: write_nifti(synapse_paths(raw, "0006")[0], _with(np.float32, np.nan)),
                        "{img6}: image contains NaN intensities"),
    "infinite intensities": (lambda raw: write_nifti(synapse_paths(raw, "0006")[0], _with(np.float64, -np.inf)),
                             "{img6}: image contains infinite intensities"),
    "NaN label": (lambda raw: write_nifti(synapse_paths(raw, "0003")[1], _with(np.float32, np.nan)),
                  "{lbl3}: label contains NaN values"),
    "unreadable NIfTI": (lambda raw: open(synapse_paths(raw, "0003")[0], "wb").write(b"not a nifti"),
                         "{img3}: unreadable NIfTI ("),
    "empty input folder": (lambda raw: [_rm(p) for c in ids_of(6) for p in synapse_paths(raw, c)],
                           "{raw}: no cases found (expected imagesTr/img*.nii.gz + labelsTr/label*.nii.gz, "
                           "or BTCV Training/img/img*.nii.gz + Training/label/label*.nii.gz)"),
}


def _expected(message, raw):
    img3, lbl3 = synapse_paths(raw, "0003")
    return message.format(img3=img3, lbl3=lbl3, img6=synapse_paths(raw, "0006")[0], raw=raw)


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_one_line_error_and_nothing_written(tmp_path, kind):
    raw, out = str(tmp_path / "raw"), str(tmp_path / "deep" / "out")
    make_synapse(raw, ids_of(6), shape=(4, 8, 8))
    damage, message = BAD_INPUTS[kind]
    damage(raw)
    before = snapshot(tmp_path)
    with pytest.raises(DataError) as e:
        preprocess("synapse", raw_dir=raw, out_dir=out, progress=False)
    assert str(e.value).startswith(_expected(message, raw)) and "\n" not in str(e.value)
    if not message.endswith("("):
        assert str(e.value) == _expected(message, raw)
    assert snapshot(tmp_path) == before and not os.path.exists(tmp_path / "deep")  # no npy, splits or staging


def test_bad_input_leaves_an_existing_output_unchanged(tmp_path):
    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    make_synapse(raw, ids_of(6), shape=(4, 8, 8))
    preprocess("synapse", raw_dir=raw, out_dir=out, progress=False)
    BAD_INPUTS["NaN intensities"][0](raw)  # the last case fails after five were converted
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match="image contains NaN intensities"):
        preprocess("synapse", raw_dir=raw, out_dir=out, force=True, progress=False)
    assert snapshot(tmp_path) == before


def test_missing_input_folder_and_amos_without_va(tmp_path):
    with pytest.raises(DataError) as e:
        preprocess("synapse", raw_dir=str(tmp_path / "nope"), out_dir=str(tmp_path / "out"), progress=False)
    assert str(e.value) == f"{tmp_path / 'nope'}: input folder not found"
    raw = tmp_path / "amos"
    write_nifti(os.path.join(raw, "imagesTr", "amos_0001.nii.gz"), np.zeros((2, 2, 2), np.int16))
    write_nifti(os.path.join(raw, "labelsTr", "amos_0001.nii.gz"), np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(DataError) as e:
        preprocess_amos("amos", raw_dir=str(raw), out_dir=str(tmp_path / "out"), progress=False)
    assert str(e.value) == (f"{raw / 'imagesVa'}: no cases found (expected amos_XXXX.nii.gz with labels in "
                            f"{raw / 'labelsVa'})")
    assert not os.path.exists(tmp_path / "out")


# ---------------------------------------------------------------- CLI

def _cli(script, *args):
    return subprocess.run([sys.executable, f"code/data/{script}", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_success_with_phantom_seed_and_ratios(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_synapse(raw, ids_of(6))
    result = _cli("preprocess.py", "--task", "phantom", "--raw", str(raw), "--out", str(out), "--seed", "5",
                  "--ratios", "20")
    assert result.returncode == 0, result.stderr
    assert f"phantom: 6 cases from {raw} -> {out / 'npy'}: 6 written, 0 already there" in result.stdout
    # 6 -> 4 train+eval (3 train, 1 eval), 2 test; labeled_20p: max(1, int(3*0.2)) = 1
    assert "splits written (seed 5): train=3 eval=1 test=2 labeled_20p=1 unlabeled_20p=2" in result.stdout
    assert sorted(os.listdir(out / "splits")) == ["eval.txt", "labeled_20p.txt", "split_info.json", "test.txt",
                                                  "train.txt", "unlabeled_20p.txt"]


def test_cli_bad_input_exit_2_one_line(tmp_path):
    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    make_synapse(raw, ids_of(6))
    os.remove(synapse_paths(raw, "0003")[1])
    result = _cli("preprocess.py", "--raw", raw, "--out", out)
    assert result.returncode == 2
    # the only stderr line: no traceback, no progress bar (the error comes before any case is read)
    expected = _expected("error: {img3}: image without label (expected {lbl3})", raw)
    assert result.stderr.strip().splitlines() == [expected]
    assert not os.path.exists(out)


@pytest.mark.parametrize("main, args, message", [
    (preprocess_main, ["--task", "nope"], "unknown task 'nope'; choose one of synapse, amos, phantom"),
    (preprocess_main, ["--task", "amos"], "--task amos: has the amos raw layout; run code/data/preprocess_amos.py"),
    (amos_main, ["--task", "phantom"], "--task phantom: has the synapse raw layout; run code/data/preprocess.py"),
    (preprocess_main, ["--ratios", "10", "100"], "--ratios 100: not a percentage in 1..99"),
    (preprocess_main, ["--seed", "-1"], "--seed -1: must be >= 0"),
])
def test_cli_config_errors_exit_2(tmp_path, capsys, main, args, message):
    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    make_synapse(raw, ids_of(6))
    assert main(["--raw", raw, "--out", out, *args]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message}"]
    assert not os.path.exists(out)
