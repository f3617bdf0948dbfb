"""evaluate_Ntimes.py and make_table.py on hand-built NIfTI cases (docs/pipeline.md#evaluation; Q45-Q52 in
docs/original-quirks.md).

Task: the phantom task cut to 3 classes ("c1", "c2", "c3"), 2 test cases, 3 folds, evaluation grid (4, 4, 6)
(raw labels (4, 8, 12), halved in-plane). Per fold f, case, class -> (Dice x100, ASD voxels):
  case 0001, c1: GT = cube [0:2, 0:2, 0:2]; every voxel of a 2-wide block is surface.
     f1 pred = GT                      -> (100, 0)
     f2 pred shifted +1 along W        -> Dice 2*4/16 = 50; ASD: 4 of 8 pred voxels at distance 1 -> 0.5
     f3 pred = [0:2, 0:2, 0:3]          -> Dice 2*8/20 = 80; ASD: 4 of 12 at distance 1 -> 1/3
  case 0001, c2: GT = [2:4, 2:4, 3:6]; f1 pred misses it (one-sided, Q46 -> (0, 128)); f2, f3 exact.
  case 0002, c1: GT = cube [1:3, 1:3, 1:3], predicted exactly in every fold -> (100, 0).
  case 0002, c2: absent from GT; absent from pred in f1, f2 (both empty, Q45 -> (1, 0)); f3 predicts a
     single voxel [3, 3, 5] (one-sided -> (0, 128)).
  c3: absent everywhere -> (1, 0).
"""
import dataclasses
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

import evaluate_Ntimes as ev
import make_table as mt
from utils.task import get_task

SHAPE = (4, 4, 6)
SPACING_XYZ = (2.0, 2.0, 3.0)  # prediction header: W (x) spacing 2 mm
NAMES = ("c1", "c2", "c3")

# values[fold][case][class] = (dice, asd), from the module docstring
EXPECTED = np.array([
    [[(100, 0), (0, 128), (1, 0)], [(100, 0), (1, 0), (1, 0)]],
    [[(50, 0.5), (100, 0), (1, 0)], [(100, 0), (1, 0), (1, 0)]],
    [[(80, 1 / 3), (100, 0), (1, 0)], [(100, 0), (0, 128), (1, 0)]],
], dtype=float)


def _gt(case):
    g = np.zeros(SHAPE, np.uint8)
    if case == "0001":
        g[0:2, 0:2, 0:2] = 1
        g[2:4, 2:4, 3:6] = 2
    else:
        g[1:3, 1:3, 1:3] = 1
    return g


def _pred(case, fold):
    p = np.zeros(SHAPE, np.uint8)
    if case == "0001":
        p[0:2, 0:2, {1: slice(0, 2), 2: slice(1, 3), 3: slice(0, 3)}[fold]] = 1
        if fold > 1:
            p[2:4, 2:4, 3:6] = 2
    else:
        p[1:3, 1:3, 1:3] = 1
        if fold == 3:
            p[3, 3, 5] = 2
    return p


def _write_nifti(path, array, spacing=(1.0, 1.0, 1.0)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def _upsample(label):  # raw label whose in-plane halving ([:, ::2, ::2]) is `label`
    return np.repeat(np.repeat(label, 2, axis=1), 2, axis=2)


def _write_exp(root, exp, pred_fn=_pred):
    for fold in (1, 2, 3):
        for case in ("0001", "0002"):
            path = root / "logs" / exp / f"fold{fold}" / "predictions_AB" / f"{case}.nii.gz"
            _write_nifti(str(path), pred_fn(case, fold).astype(np.float32), SPACING_XYZ)  # float, as the original


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("DHC_LOG_ROOT", str(tmp_path / "logs"))
    raw, data = tmp_path / "raw", tmp_path / "data"
    task = dataclasses.replace(get_task("phantom"), raw_dir=str(raw), data_dir=str(data), class_names=NAMES)
    os.makedirs(data / "splits")
    (data / "splits" / "test.txt").write_text("0002\n0001\n")
    os.makedirs(data / "npy")
    for case in ("0001", "0002"):
        _write_nifti(str(raw / "labelsTr" / f"label{case}.nii.gz"), _upsample(_gt(case)).astype(np.int16))
        np.save(data / "npy" / f"{case}_label.npy", _upsample(_gt(case)).astype(np.int8))
    _write_exp(tmp_path, "Task_t/dhc")
    return task, tmp_path


def test_values_and_reduction_hand_computed(setup):
    task, _ = setup
    res = ev.evaluate(task, "Task_t/dhc", folds=3, cps="AB", progress=False)
    np.testing.assert_allclose(res["values"], EXPECTED, rtol=0, atol=1e-12)
    red = res["paper"]
    fold_avg_dice = [(100 + 0.5 + 1) / 3, (75 + 50.5 + 1) / 3, (90 + 50 + 1) / 3]  # per-class means, then mean
    fold_avg_asd = [(0 + 64 + 0) / 3, (0.25 + 0 + 0) / 3, (1 / 6 + 64 + 0) / 3]
    np.testing.assert_allclose(red["fold_avg"][:, 0], fold_avg_dice)
    np.testing.assert_allclose(red["fold_avg"][:, 1], fold_avg_asd)
    np.testing.assert_allclose(red["final_class"][:, 0], [265 / 3, 101 / 3, 1])
    np.testing.assert_allclose(red["final_class"][:, 1], [(0.25 + 1 / 6) / 3, 128 / 3, 0])
    np.testing.assert_allclose(red["final_avg"], [41.0, np.mean(fold_avg_asd)])
    # ± = population std of the fold means [203/6, 253/6, 47] around 41: deviations -43/6, 7/6, 6 (Q52)
    np.testing.assert_allclose(red["final_std"], [np.sqrt(((43 / 6) ** 2 + (7 / 6) ** 2 + 6 ** 2) / 3),
                                                  np.std(fold_avg_asd)])
    # standard: both-empty pairs excluded (NaN, skipped by every mean, in the original's order of means:
    # c2 R = [(0 + 100 + 100) / 3, 0] over cases -> 100 / 3); ASSD in mm (W spacing 2): f2 (8 + 8) / 16, f3 8 / 20
    std = res["standard"]
    np.testing.assert_allclose(std["final_class"][:, 0][:2], [265 / 3, 100 / 3])
    assert np.isnan(std["final_class"][2, 0])
    np.testing.assert_allclose(std["case_class"][:, 0, 1], [(0 + 1.0 + 0.4) / 3, 0])  # ids sorted: 0001, 0002


def test_cli_writes_original_format(setup, capsys):
    task, root = setup
    assert ev.main(["--task", "phantom", "--exp", "Task_t/dhc", "--folds", "3", "--cps", "AB",
                    "--no-progress"], task=task) == 0
    text = (root / "logs" / "Task_t" / "dhc" / "evaluation_res.txt").read_text()
    lines = text.split("\n")
    assert lines[:8] == ["Fold1", "------ Dice ------", "[100.    0.5   1. ]", "------ ASD ------",
                         "[ 0. 64.  0.]", f"Average Dice:{101.5 / 3}", f"Average  ASD:{64 / 3}",
                         "================================="]
    assert lines[8] == "Fold2"  # Q51: newline after the separator
    assert lines[16] == "Fold3" and lines[23] == "=================================" and lines[24:27] == [
        "", "", "All folds"]
    assert lines[27:32] == ["===== Case-0001", "\tDice:[76.67, 66.67, 1.0]", "\t ASD:[0.28, 42.67, 0.0]",
                            f"\tAverage Dice:{(230 / 3 + 200 / 3 + 1) / 3}",  # R over folds, mean over classes
                            f"\tAverage  ASD:{((0.5 + 1 / 3) / 3 + 128 / 3) / 3}"]
    assert lines[-8:] == ["=================================", "Final Dice of each class", "[88.3, 33.7, 1.0]",
                          "Final ASD of each class", "[0.1, 42.7, 0.0]",
                          "Final Avg Dice: 41.0±5.44",  # std of fold means [33.83, 42.17, 47]
                          "Final Avg  ASD: 14.27±10.03",  # mean/std of fold means [21.33, 0.083, 21.39]
                          ""]
    out = capsys.readouterr().out.split("\n")
    assert out[:4] == ["", " Evaluating...", "Fold 1", "------ Dice ------"]
    assert f"{101.5 / 3} {64 / 3}" in out and "Final Avg Dice: 41.0±5.44" in out
    assert text == _original_text(EXPECTED, ["0001", "0002"]).replace("=" * 33 + "Fold", "=" * 33 + "\nFold")


def _original_text(values, ids):
    """evaluation_res.txt exactly as the original writes it (docs/pipeline.md#evaluation), from values[f, n, c, 2]."""
    out = ""
    for fold, v in enumerate(values, 1):
        m = np.mean(v, axis=0)
        out += (f"Fold{fold}\n------ Dice ------\n{np.round(m[:, 0], 1)}\n------ ASD ------\n{np.round(m[:, 1], 1)}\n"
                f"Average Dice:{np.mean(m, axis=0)[0]}\nAverage  ASD:{np.mean(m, axis=0)[1]}\n" + "=" * 33)
    out += "\n\n\nAll folds\n"
    r = values.mean(0)
    for i, case in enumerate(ids):
        out += (f"===== Case-{case}\n\tDice:{np.round(r[i][:, 0], 2).tolist()}\n"
                f"\t ASD:{np.round(r[i][:, 1], 2).tolist()}\n\tAverage Dice:{np.mean(r[i], axis=0)[0]}\n"
                f"\tAverage  ASD:{np.mean(r[i], axis=0)[1]}\n")
    std = np.std(values.mean(1).mean(1), axis=0)
    out += ("=" * 33 + "\nFinal Dice of each class\n" + str([round(x, 1) for x in r.mean(0)[:, 0].tolist()])
            + "\nFinal ASD of each class\n" + str([round(x, 1) for x in r.mean(0)[:, 1].tolist()]) + "\n")
    out += f"Final Avg Dice: {round(r.mean(0).mean(0)[0], 2)}±{round(std[0], 2)}\n"
    out += f"Final Avg  ASD: {round(r.mean(0).mean(0)[1], 2)}±{round(std[1], 2)}\n"
    return out


def test_results_csv_and_json(setup):
    task, root = setup
    assert ev.main(["--exp", "Task_t/dhc", "--cps", "AB", "--no-progress"], task=task) == 0
    folder = root / "logs" / "Task_t" / "dhc"
    rows = [line.split(",") for line in (folder / "results.csv").read_text().splitlines()]
    assert rows[0] == ["fold", "case", "class_id", "class_name", "dice", "asd", "assd_mm", "pred_voxels",
                       "gt_voxels"]
    assert len(rows) == 1 + 3 * 2 * 3
    assert rows[1 + 3 * 2 + 0] == ["2", "0001", "1", "c1", "50.0", "0.5", "1.0", "8", "8"]  # f2 (8 + 8) / 16 mm
    assert rows[1 + 6 * 2 + 0][4:7] == ["80.0", repr(1 / 3), "0.4"]                      # f3 8 / 20 mm
    assert rows[1 + 0 + 1][4:] == ["0.0", "128.0", "nan", "0", "12"]                      # f1 c2 GT only
    res = json.loads((folder / "results.json").read_text())
    assert res["ids"] == ["0001", "0002"] and res["class_names"] == list(NAMES) and res["both_empty"] == "paper"
    assert res["paper"]["dice"]["mean"] == pytest.approx(41.0)
    assert res["paper"]["dice"]["fold_mean"] == pytest.approx([101.5 / 3, 126.5 / 3, 47.0])
    assert res["paper"]["dice"]["class_mean"] == pytest.approx([265 / 3, 101 / 3, 1.0])
    assert res["standard"]["dice"]["class_mean"][2] is None  # c3 always both empty -> excluded
    md = (folder / "evaluation_res.md").read_text()
    assert "| c1 | 88.33 ± 10.27 |" in md and "| **Average** | **41.00 ± 5.44** |" in md


@pytest.mark.parametrize("mode,dice_c3", [("100", 100.0), ("exclude", None)])
def test_both_empty_modes(setup, mode, dice_c3):
    task, root = setup
    assert ev.main(["--exp", "Task_t/dhc", "--cps", "AB", "--both-empty", mode, "--no-progress"], task=task) == 0
    res = json.loads((root / "logs" / "Task_t" / "dhc" / "results.json").read_text())
    assert res["paper"]["dice"]["class_mean"][2] == dice_c3 and res["both_empty"] == mode
    if mode == "exclude":  # c2, case 0002: both empty in f1, f2 -> only f3's (0, 128) remains
        assert res["paper"]["dice"]["class_mean"][1] == pytest.approx((200 / 3 + 0) / 2)
    text = (root / "logs" / "Task_t" / "dhc" / "evaluation_res.txt").read_text()
    assert text.splitlines()[-1].startswith("Both-empty convention: ")


def test_gt_from_npy_and_auto_fallback(setup):
    task, root = setup
    res = ev.evaluate(task, "Task_t/dhc", 3, "AB", gt="npy", progress=False)
    np.testing.assert_allclose(res["values"], EXPECTED, rtol=0, atol=1e-12)
    os.remove(root / "raw" / "labelsTr" / "label0002.nii.gz")
    res = ev.evaluate(task, "Task_t/dhc", 3, "AB", gt="auto", progress=False)
    assert res["meta"]["gt_sources"]["0002"].endswith("0002_label.npy")
    assert res["meta"]["gt_sources"]["0001"].endswith("label0001.nii.gz")
    np.testing.assert_allclose(res["values"], EXPECTED, rtol=0, atol=1e-12)
    with pytest.raises(ev.DataError, match="raw label of test case 0002 not found"):
        ev.evaluate(task, "Task_t/dhc", 3, "AB", gt="raw", progress=False)


def test_btcv_layout(setup):
    task, root = setup
    os.makedirs(root / "raw" / "Training")
    os.rename(root / "raw" / "labelsTr", root / "raw" / "Training" / "label")
    res = ev.evaluate(task, "Task_t/dhc", 3, "AB", gt="raw", progress=False)
    np.testing.assert_allclose(res["values"], EXPECTED, rtol=0, atol=1e-12)


def _no_outputs(folder):
    return not any((folder / n).exists() for n in ("evaluation_res.txt", "results.csv", "results.json",
                                                    "evaluation_res.md"))


def test_missing_prediction_and_shape_mismatch(setup, capsys):
    task, root = setup
    folder = root / "logs" / "Task_t" / "dhc"
    pred = folder / "fold2" / "predictions_AB" / "0002.nii.gz"
    os.remove(pred)
    assert ev.main(["--exp", "Task_t/dhc", "--cps", "AB", "--no-progress"], task=task) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(pred) in err and "not found" in err and _no_outputs(folder)
    _write_nifti(str(pred), np.zeros((4, 8, 12), np.uint8))  # un-halved grid
    assert ev.main(["--exp", "Task_t/dhc", "--cps", "AB", "--no-progress"], task=task) == 2
    err = capsys.readouterr().err
    assert str(pred) in err and "label0002.nii.gz" in err and "(4, 8, 12)" in err and "(4, 4, 6)" in err
    assert _no_outputs(folder)
    _write_nifti(str(pred), np.full(SHAPE, 7, np.uint8))
    assert ev.main(["--exp", "Task_t/dhc", "--cps", "AB", "--no-progress"], task=task) == 2
    assert "label values 7..7 outside 0..3" in capsys.readouterr().err


def test_amos_layout_and_fixed_grid(tmp_path):
    """AMOS: labelsVa first, labelsTr as fallback; nearest resize to task.fixed_grid (Q48)."""
    task = dataclasses.replace(get_task("amos"), raw_dir=str(tmp_path), data_dir=str(tmp_path / "d"),
                               fixed_grid=(2, 3, 4))
    label = np.arange(4 * 6 * 8).reshape(4, 6, 8) % 16
    _write_nifti(str(tmp_path / "labelsTr" / "amos_0001.nii.gz"), label.astype(np.uint8))
    gt, src = ev.load_gt(task, "amos_0001", "raw")
    assert src.endswith(os.path.join("labelsTr", "amos_0001.nii.gz"))
    np.testing.assert_array_equal(gt, label[::2, ::2, ::2])  # nearest, scale 2: source index 2i
    _write_nifti(str(tmp_path / "labelsVa" / "amos_0001.nii.gz"), (15 - label).astype(np.uint8))
    gt, src = ev.load_gt(task, "amos_0001", "raw")
    assert "labelsVa" in src and np.array_equal(gt, 15 - label[::2, ::2, ::2])


def test_make_table_two_methods(setup, capsys):
    task, root = setup

    def worse(case, fold):  # c1 missed entirely in case 0002 -> (0, 128) there
        p = _pred(case, fold)
        if case == "0002":
            p[p == 1] = 0
        return p

    _write_exp(root, "Task_t/cps", worse)
    for exp in ("Task_t/dhc", "Task_t/cps"):
        assert ev.main(["--exp", exp, "--cps", "AB", "--no-progress"], task=task) == 0
    capsys.readouterr()
    out = str(root / "table")
    assert mt.main(["--exps", "Task_t/*", "--out", out]) == 0
    md = capsys.readouterr().out
    lines = md.splitlines()
    assert lines[0] == "| Method | c1 | c2 | c3 | Avg Dice | Avg ASD (vox) |"
    # glob order: cps, dhc. cps c1 = dhc's case-0001 values with case 0002 at 0: mean (100+50+80)/6
    assert lines[2].startswith(f"| cps | {230 / 6:.2f} ± ")
    assert lines[3] == "| dhc | 88.33 ± 10.27 | 33.67 ± 23.45 | 1.00 ± 0.00 | 41.00 ± 5.44 | 14.27 ± 10.03 |"
    assert open(out + ".md").read() == md
    tex = open(out + ".tex").read()
    assert r"\textbf{88.33$\pm$10.27}" in tex and tex.startswith(r"\begin{tabular}{lccccc}")
    csv_rows = open(out + ".csv").read().splitlines()
    assert csv_rows[0].split(",")[:4] == ["method", "folds", "c1_dice", "c1_dice_std"]
    assert csv_rows[2].split(",")[:2] == ["dhc", "3"] and float(csv_rows[2].split(",")[2]) == pytest.approx(265 / 3)
    assert open(out + ".png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert mt.main(["--exps", "Task_t/nothing*", "--out", out]) == 2
