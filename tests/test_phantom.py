"""Synthetic CT phantom (code/data/phantom.py; described in the README, 'The built-in phantom'): determinism, class
shares, intensities, orientation, NIfTI geometry, AMOS layout, idempotent reruns, CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from data import phantom
from data.phantom import class_voxel_fractions, make_case, write_dataset
from utils.io import ConfigError

SMALL = (24, 64, 64)  # same anatomy and field of view on a coarse grid: ~0.03 s a case
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYN = {"spleen": 1, "kidney_r": 2, "kidney_l": 3, "gallbladder": 4, "esophagus": 5, "liver": 6, "stomach": 7,
       "aorta": 8, "ivc": 9, "veins": 10, "pancreas": 11, "adrenal_r": 12, "adrenal_l": 13}


@pytest.fixture(scope="module")
def full_case():
    """The one full-size case of this file (~0.5 s)."""
    return make_case(1, seed=0)


def test_same_seed_identical_other_seed_or_case_differs():
    a, b = make_case(2, seed=0, shape=SMALL), make_case(2, seed=0, shape=SMALL)
    assert a[0].dtype == np.int16 and a[1].dtype == np.uint8 and a[0].shape == a[1].shape == SMALL
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    for other in (make_case(2, seed=1, shape=SMALL), make_case(3, seed=0, shape=SMALL)):
        assert not np.array_equal(a[0], other[0])
        assert not np.array_equal(a[1], other[1])
        assert a[2] != other[2]


def test_class_voxel_fractions_hand_computed():
    label = np.array([[[0, 0, 1, 2], [0, 0, 0, 2]]], np.uint8)  # 8 voxels: 5 x 0, 1 x 1, 2 x 2
    assert np.allclose(class_voxel_fractions(label, 4), [5 / 8, 1 / 8, 2 / 8, 0.0])
    with pytest.raises(ValueError):
        class_voxel_fractions(label, 2)


def test_full_case_size_and_class_shares(full_case):
    image, label, spacing = full_case
    d, h, w = image.shape
    assert 48 <= d <= 64 and (h, w) == (192, 192)
    frac = class_voxel_fractions(label, 14)
    assert np.all(frac[1:] > 0), f"missing organs: {np.nonzero(frac == 0)[0]}"
    assert frac[0] > 0.85                              # background is the vast majority
    assert 0.02 < frac[SYN["liver"]] < 0.06            # liver: a few per cent, the largest organ
    assert frac[SYN["liver"]] == frac[1:].max()
    for organ in ("spleen", "kidney_r", "kidney_l", "stomach"):
        assert 0.001 < frac[SYN[organ]] < 0.015, organ
    for organ in ("adrenal_r", "adrenal_l"):         # real Synapse: liver / adrenal ~ 100-300
        assert 50 < frac[SYN["liver"]] / frac[SYN[organ]] < 400, organ
        assert frac[SYN[organ]] <= np.sort(frac[1:])[1]  # the two smallest organs


def test_full_case_intensities(full_case):
    image, label, spacing = full_case
    air = image[:, :4, :4].astype(float)  # a corner of the field of view, outside the body
    assert abs(air.mean() + 1000) < 15 and 8 < air.std() < 27  # noise sigma 10-25 HU
    mean = {name: image[label == k].mean() for name, k in SYN.items()}
    vessels = min(mean["aorta"], mean["ivc"], mean["veins"])
    assert vessels > mean["liver"] > max(mean["pancreas"], mean["adrenal_r"], mean["adrenal_l"])
    assert mean["gallbladder"] < 30
    for organ in ("adrenal_r", "adrenal_l", "esophagus"):  # soft-tissue HU, like crus and heart, inside the
        core = ndimage.binary_erosion(label == SYN[organ], structure=np.ones((1, 3, 3), bool))  # fat around them
        assert 25 < image[core].mean() < 75, organ
    assert image.max() > 400  # bone


def test_thin_organs_stand_out_from_the_fat_around_them(full_case):
    """Adrenals in periadrenal fat, the esophagus in its fat sleeve (phantom versions 2 and 3): the unlabeled voxels
    within two in-plane voxels of each are fat-dark, and the organ is brighter than that ring."""
    image, label, _ = full_case
    for organ in ("esophagus", "adrenal_r", "adrenal_l"):
        mask = label == SYN[organ]
        ring = ndimage.binary_dilation(mask, structure=np.ones((1, 3, 3), bool), iterations=2) & (label == 0)
        organ_hu, ring_hu = image[mask].mean(), image[ring].mean()
        assert ring_hu < -30 and organ_hu - ring_hu > 50, (organ, organ_hu, ring_hu)
        if organ != "esophagus":  # version 3: a fat plane against the liver too (version 2: liver on 57-72 %)
            near = ndimage.binary_dilation(mask, structure=np.ones((1, 3, 3), bool), iterations=2) & ~mask
            assert np.mean(label[near] == SYN["liver"]) < 0.05, organ


def test_orientation_documented_in_module(full_case):
    """z feet -> head, y anterior -> posterior, x patient right -> left (module docstring)."""
    _, label, _ = full_case
    c = {name: np.argwhere(label == k).mean(0) for name, k in SYN.items()}  # (z, y, x) centroids
    assert c["liver"][2] < label.shape[2] / 2 < c["spleen"][2]  # liver on the image's left = patient right
    assert c["kidney_r"][2] < c["kidney_l"][2]
    assert c["pancreas"][1] < c["kidney_r"][1] and c["pancreas"][1] < c["kidney_l"][1]  # kidneys posterior
    assert c["esophagus"][0] > c["liver"][0] > c["kidney_r"][0]  # higher slices are more cranial


def test_written_nifti_geometry_and_content(tmp_path):
    ids = write_dataset(tmp_path, n_cases=2, seed=0, progress=False, shape=SMALL)
    assert ids == ["0001", "0002"]
    for cid, number in (("0001", 1), ("0002", 2)):
        image, label, geo = phantom._build_case(number, 0, "synapse", SMALL)
        img = sitk.ReadImage(str(tmp_path / "imagesTr" / f"img{cid}.nii.gz"))
        lab = sitk.ReadImage(str(tmp_path / "labelsTr" / f"label{cid}.nii.gz"))
        assert img.GetPixelID() == sitk.sitkInt16 and lab.GetPixelID() == sitk.sitkUInt8
        assert np.array_equal(sitk.GetArrayFromImage(img), image)
        assert np.array_equal(sitk.GetArrayFromImage(lab), label)
        for x in (img, lab):
            assert np.allclose(x.GetSpacing(), geo["spacing"], atol=1e-4)
            assert np.allclose(x.GetOrigin(), geo["origin"], atol=1e-3)
            assert np.allclose(x.GetDirection(), np.eye(3).ravel())
        sx, sy, sz = img.GetSpacing()
        assert sx == pytest.approx(sy) and sz > 1.5 * sx  # anisotropic: thick slices
    assert make_case(1, shape=SMALL)[2] != make_case(2, shape=SMALL)[2]  # spacing varies per case


def test_amos_layout_names_classes_and_missing_classes(tmp_path):
    ids = write_dataset(tmp_path, n_cases=3, seed=0, layout="amos", n_val=1, progress=False, shape=SMALL)
    assert ids == ["amos_0001", "amos_0002", "amos_0003", "amos_0004"]
    assert sorted(os.listdir(tmp_path / "imagesTr")) == ["amos_0001.nii.gz", "amos_0002.nii.gz", "amos_0003.nii.gz"]
    assert sorted(os.listdir(tmp_path / "labelsTr")) == sorted(os.listdir(tmp_path / "imagesTr"))
    assert os.listdir(tmp_path / "imagesVa") == os.listdir(tmp_path / "labelsVa") == ["amos_0004.nii.gz"]
    present = []
    for part, cid in (("Tr", 1), ("Tr", 2), ("Tr", 3), ("Va", 4)):
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"labels{part}" / f"amos_{cid:04d}.nii.gz")))
        present.append(set(np.unique(label).tolist()))
    assert set().union(*present) == set(range(16))  # all 15 AMOS classes occur
    assert 14 not in present[2] and 15 not in present[2]  # case 3 ends above the pelvis: no bladder/prostate
    assert {13, 14, 15} <= present[0]  # duodenum, bladder, prostate/uterus


def test_rerun_skips_resumes_and_refuses_foreign_data(tmp_path):
    assert write_dataset(tmp_path, n_cases=2, progress=False, shape=SMALL) == ["0001", "0002"]
    label2 = tmp_path / "labelsTr" / "label0002.nii.gz"
    stamp = os.stat(label2).st_mtime_ns
    assert write_dataset(tmp_path, n_cases=2, progress=False, shape=SMALL) == []  # complete: nothing written
    assert os.stat(label2).st_mtime_ns == stamp
    os.remove(tmp_path / "imagesTr" / "img0001.nii.gz")  # a lost file is rewritten, the rest kept
    assert write_dataset(tmp_path, n_cases=2, progress=False, shape=SMALL) == ["0001"]
    assert json.loads((tmp_path / "phantom.json").read_text())["complete"] is True
    with pytest.raises(ConfigError, match="another phantom"):
        write_dataset(tmp_path, n_cases=2, seed=1, progress=False, shape=SMALL)
    assert write_dataset(tmp_path, n_cases=1, seed=1, progress=False, shape=SMALL, overwrite=True) == ["0001"]
    assert sorted(os.listdir(tmp_path / "labelsTr")) == ["label0001.nii.gz"]  # stale case 0002 removed
    foreign = tmp_path / "real"
    (foreign / "imagesTr").mkdir(parents=True)
    (foreign / "imagesTr" / "img0001.nii.gz").write_bytes(b"not ours")
    with pytest.raises(ConfigError, match="another dataset"):
        write_dataset(foreign, n_cases=1, progress=False, shape=SMALL)


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="--val-cases"):
        write_dataset(tmp_path, n_cases=2, n_val=2, layout="synapse", progress=False, shape=SMALL)
    with pytest.raises(ConfigError, match="layout"):
        make_case(1, layout="btcv", shape=SMALL)
    assert phantom.main(["--out", str(tmp_path), "--cases", "0"]) == 2
    assert not os.path.exists(tmp_path / "imagesTr")


def test_cli_as_script_writes_and_summarises(tmp_path):
    """`python code/data/phantom.py` works without PYTHONPATH; it writes the phantom task's grid (config.py
    raw_shape) unless --shape says otherwise."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, os.path.join(REPO, "code", "data", "phantom.py"), "--out",
                          str(tmp_path), "--cases", "1"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "1 of 1 cases written" in run.stdout and "adrenal_l" in run.stdout
    assert os.path.isfile(tmp_path / "imagesTr" / "img0001.nii.gz")
    from config import get_task
    size = sitk.ReadImage(str(tmp_path / "imagesTr" / "img0001.nii.gz")).GetSize()
    assert size[::-1] == get_task("phantom").raw_shape == (32, 128, 128)
    assert phantom.main(["--out", str(tmp_path / "s"), "--cases", "1", "--shape", "16", "40", "48"]) == 0
    assert sitk.ReadImage(str(tmp_path / "s" / "labelsTr" / "label0001.nii.gz")).GetSize() == (48, 40, 16)
