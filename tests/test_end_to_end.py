"""The whole pipeline on a tiny phantom through the three-seed script: phantom -> preprocess -> train -> test ->
evaluate -> paper table, for DHC with two seeds in full detail and for every other method with one seed.
Asserts the files each step must produce and their contents."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import METHODS, REPO
from data.phantom import write_dataset
from data.preprocess import preprocess
from test_methods_common import EXTRA_FLAGS


def test_phantom_pipeline_end_to_end(tmp_path, monkeypatch):
    env = dict(os.environ, DHC_PHANTOM_RAW=str(tmp_path / "raw"), DHC_PHANTOM_DATA=str(tmp_path / "data"),
               DHC_LOG_ROOT=str(tmp_path / "logs"), PYTHON=sys.executable, SEEDS="0 1",
               PYTHONPATH=os.pathsep.join([os.path.join(REPO, "code"), REPO]))
    for key in ("DHC_PHANTOM_RAW", "DHC_PHANTOM_DATA", "DHC_LOG_ROOT"):
        monkeypatch.setenv(key, env[key])
    write_dataset(tmp_path / "raw", n_cases=10, seed=0, shape=(24, 64, 64), progress=False)
    summary = preprocess("phantom", progress=False)
    assert summary["splits"]["test"] == 2

    train_flags = ["-ep", "1", "--n_filters", "4", "--patch_size", "16", "32", "32", "--num_workers", "0"]
    out = subprocess.run(["bash", os.path.join(REPO, "train3times_seeds_20p.sh"), "-c", "0", "-t", "phantom",
                          "-m", "dhc", "-e", "_tiny", "-l", "3e-2", "-w", "0.1", "--", *train_flags],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    exp = tmp_path / "logs" / "Task_phantom_20p" / "dhc_tiny"
    test_ids = (tmp_path / "data" / "splits" / "test.txt").read_text().split()
    for fold in (1, 2):
        folder = exp / f"fold{fold}"
        run = json.loads((folder / "run.json").read_text())
        assert run["seed"] == (0, 1)[fold - 1] and run["args"]["max_epoch"] == 1
        assert (folder / "ckpts" / "best_model.pth").is_file() and (folder / "train.log").is_file()
        for case in test_ids:
            pred = sitk.ReadImage(str(folder / "predictions_AB" / f"{case}.nii.gz"))
            raw = sitk.ReadImage(str(tmp_path / "raw" / "labelsTr" / f"label{case}.nii.gz"))
            assert pred.GetPixelID() == sitk.sitkUInt8
            assert pred.GetSize() == (32, 32, 24)  # inference grid: in-plane halved (x, y, z)
            assert np.allclose(pred.GetSpacing(), np.array(raw.GetSpacing()) * (2, 2, 1))
            assert np.allclose(pred.GetOrigin(), raw.GetOrigin())

    text = (exp / "evaluation_res.txt").read_text()
    assert text.startswith("Fold1\n") and "\nFold2\n" in text and "Final Avg Dice:" in text
    rows = (exp / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * len(test_ids) * 13  # header + folds x cases x organs
    assert "Final Avg Dice" in out.stdout

    table = subprocess.run([sys.executable, os.path.join(REPO, "code", "make_table.py"), "--exps", str(exp),
                            "--out", str(tmp_path / "table")], env=env, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "| dhc_tiny |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "table.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def tiny_phantom(tmp_path_factory):
    """One tiny preprocessed phantom shared by the per-method pipeline runs (each writes its own run folder)."""
    root = tmp_path_factory.mktemp("phantom")
    env = dict(os.environ, DHC_PHANTOM_RAW=str(root / "raw"), DHC_PHANTOM_DATA=str(root / "data"),
               DHC_LOG_ROOT=str(root / "logs"), PYTHON=sys.executable, SEEDS="0",
               PYTHONPATH=os.pathsep.join([os.path.join(REPO, "code"), REPO]))
    code = ("from data.phantom import write_dataset; from data.preprocess import preprocess; "
            f"write_dataset({str(root / 'raw')!r}, n_cases=10, seed=0, shape=(24, 64, 64), progress=False); "
            "preprocess('phantom', progress=False)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return root, env


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dhc"])
def test_three_seed_script_runs_every_method(method, tiny_phantom):
    """``train3times_seeds_20p.sh -m <method>`` (one fold, one epoch): train -> test -> evaluate, for each method."""
    root, env = tiny_phantom
    train_flags = ["-ep", "1", "--n_filters", "4", "--patch_size", "16", "32", "32", "--num_workers", "0",
                   *EXTRA_FLAGS.get(method, [])]
    out = subprocess.run(["bash", os.path.join(REPO, "train3times_seeds_20p.sh"), "-c", "0", "-t", "phantom",
                          "-m", method, "-e", "", "-l", "3e-2", "-w", "0.1", "--", *train_flags],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    exp = root / "logs" / "Task_phantom_20p" / method
    run = json.loads((exp / "fold1" / "run.json").read_text())
    assert run["method"] == method and run["args"]["max_epoch"] == 1
    test_ids = (root / "data" / "splits" / "test.txt").read_text().split()
    preds = sorted(os.listdir(exp / "fold1" / "predictions_AB"))
    assert preds == sorted(f"{case}.nii.gz" for case in test_ids)
    text = (exp / "evaluation_res.txt").read_text()
    dice = float(text.split("Final Avg Dice: ")[1].split("±")[0])
    assert 0 <= dice <= 100 and text.count("===== Case-") == len(test_ids)


def test_three_seed_script_side_by_side(tiny_phantom):
    """``JOBS=2``: two folds trained at once (one thread each, output in fold<k>.out), then tested and evaluated
    over both folds, each with its own seed; a failing fold makes the script fail naming it."""
    root, env = tiny_phantom
    env = dict(env, SEEDS="0 1", JOBS="2")
    base = ["bash", os.path.join(REPO, "train3times_seeds_20p.sh"), "-c", "0", "-t", "phantom", "-m", "cps",
            "-e", "_jobs", "-l", "3e-2", "-w", "0.1", "--", "-ep", "0", "--n_filters", "4", "--num_workers", "0"]
    cmd = base + ["--patch_size", "16", "32", "32"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    exp = root / "logs" / "Task_phantom_20p" / "cps_jobs"
    seeds = [json.loads((exp / f"fold{k}" / "run.json").read_text())["args"]["seed"] for k in (1, 2)]
    assert seeds == [0, 1]
    assert "done: best mean dice" in (exp / "fold2.out").read_text()
    assert "\nFold2\n" in (exp / "evaluation_res.txt").read_text()
    bad = subprocess.run(base + ["--patch_size", "15", "32", "32"], env=dict(env, SEEDS="0"), capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 1 and "training failed for fold1" in bad.stderr
    assert subprocess.run(cmd, env=dict(env, JOBS="x"), capture_output=True, text=True).returncode == 2
