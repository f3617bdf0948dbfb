"""plot_run.py on tiny run folders: the curves read back from train.log and TensorBoard, the per-case Dice and
slice choice, and the three PNGs (valid, expected pixel size = expected number of panels, organ colours drawn)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.colors import to_rgb
from matplotlib.image import imread

import plot_run
from conftest import REPO

CLASSES = ("spleen", "kidney_r", "kidney_l", "gallbladder", "esophagus", "liver", "stomach", "aorta", "ivc",
           "portal_splenic_veins", "pancreas", "adrenal_r", "adrenal_l")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_log(folder, epochs):
    """train.log lines in the engine's format: one per epoch, one per validation (every 2nd epoch)."""
    lines = []
    for e in range(epochs):
        lines.append(f"[10:00:00.000] epoch {e} | lr 0.030000 | cps_w 0.1000 | loss {1.0 / (e + 1):.4f} | "
                     f"loss_sup {0.5 / (e + 1):.4f}")
        if e % 2 == 0:
            organs = " ".join(f"{n} {0.01 * e * (i + 1):.3f}" for i, n in enumerate(CLASSES))
            lines.append(f"[10:00:01.000] validation epoch {e}: mean dice {0.05 * e:.4f} (best 0.1 at epoch 0) | "
                         f"{organs}")
    (folder / "train.log").write_text("\n".join(lines) + "\n")


def write_events(folder, epochs):
    from torch.utils.tensorboard import SummaryWriter
    w = SummaryWriter(str(folder / "tensorboard"))
    for e in range(epochs):
        w.add_scalar("loss/loss", 2.0 / (e + 1), e)
        w.add_scalar("lr", 0.03, e)
        if e % 2 == 0:
            for i, n in enumerate(CLASSES):
                w.add_scalar(f"val_dice/{n}", 0.02 * e * (i + 1), e)
            w.add_scalar("val_dice/mean", 0.1 * e, e)
    w.close()


def tiny_label(shape):
    """(24, 32, 32) label: liver box, spleen box, a 2-voxel adrenal (class 12) in slice 10 only."""
    label = np.zeros(shape, np.uint8)
    label[4:20, 4:16, 4:14] = 6
    label[6:14, 18:28, 20:30] = 1
    label[10, 2, 2:4] = 12
    return label


@pytest.fixture
def tiny_runs(tiny_data):
    """logs/Task_phantom_20p/dhc/{fold1 (train.log, prediction), fold2 (TensorBoard only)} + results.json, on the
    tiny_data npy cases (24 x 64 x 64 stored -> 24 x 32 x 32 inference grid)."""
    method = tiny_data / "logs" / "Task_phantom_20p" / "dhc"
    for fold in ("fold1", "fold2"):
        (method / fold).mkdir(parents=True)
        (method / fold / "run.json").write_text(json.dumps({"method": "dhc", "task": "phantom"}))
    write_log(method / "fold1", 6)
    write_events(method / "fold2", 6)
    gt = np.load(tiny_data / "data" / "npy" / "0007_label.npy")[:, ::2, ::2].astype(np.uint8)  # nearest halving
    pred = gt.copy()
    pred[pred == 1] = 0  # class 1 missed entirely
    (method / "fold1" / "predictions_AB").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(pred), str(method / "fold1" / "predictions_AB" / "0007.nii.gz"))
    res = {"class_names": list(CLASSES), "folds": 2, "exp": "Task_phantom_20p/dhc"}
    block = {"class_mean": [50.0 + i for i in range(13)], "class_std": [1.0] * 13, "mean": 56.0, "std": 1.0}
    res["paper"] = {"dice": block, "asd": dict(block, mean=3.0)}
    res["standard"] = {"dice": block, "assd_mm": dict(block, mean=3.0)}
    (method / "results.json").write_text(json.dumps(res))
    return method


def png_shape(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    return imread(path).shape


def test_curves_read_from_train_log_and_tensorboard(tiny_runs):
    log_curves = plot_run.read_curves(str(tiny_runs / "fold1"))
    x, y = log_curves["val"]["liver"]
    assert x.tolist() == [0, 2, 4] and np.allclose(y, [0.0, 0.12, 0.24])  # 0.01 * epoch * 6
    assert np.allclose(log_curves["val"]["mean"][1], [0.0, 0.1, 0.2])
    assert sorted(log_curves["loss"]) == ["loss", "loss_sup"]  # lr and cps_w are not losses
    assert np.allclose(log_curves["loss"]["loss_sup"][1], [0.5 / (e + 1) for e in range(6)], atol=1e-4)
    tb = plot_run.read_curves(str(tiny_runs / "fold2"))
    assert sorted(tb["loss"]) == ["loss"] and len(tb["val"]) == 14  # 13 organs + mean
    assert np.allclose(tb["val"]["adrenal_l"][1], [0.0, 0.52, 1.04])  # 0.02 * epoch * 13
    assert plot_run.find_runs(str(tiny_runs)) == [str(tiny_runs / "fold1"), str(tiny_runs / "fold2")]


def test_case_dice_and_slice_choice():
    gt = tiny_label((24, 32, 32))
    pred = gt.copy()
    pred[gt == 1] = 0
    pred[0, 0, 0:4] = 3  # 4 false-positive voxels of a class absent from gt
    dice = plot_run.case_dice(gt, pred, 14)
    assert dice[5] == 100.0 and dice[0] == 0.0 and dice[11] == 100.0
    assert dice[2] == 0.0  # 2*0 / (0 + 4)
    assert np.isnan(dice[1])  # kidney_r in neither
    z, y = plot_run.slice_choice(gt)
    assert z == 10  # the only slice with liver, spleen and adrenal
    ys = np.nonzero(gt)[1]
    assert y == int(round(ys.mean()))


def test_all_three_figures(tiny_runs, capsys):
    assert plot_run.main(["--exp", "Task_phantom_20p/dhc"]) in (None, 0)
    out = capsys.readouterr().out
    figures = tiny_runs / "figures"
    for name in ("overlay_0007.png", "curves.png", "dice_bars.png"):
        assert str(figures / name) in out
    h, w, _ = png_shape(figures / "overlay_0007.png")
    assert (w, h) == (1100, 950)  # 2 x 2 panels at 11 x 9.5 in, 100 dpi
    h, w, _ = png_shape(figures / "curves.png")
    assert (w, h) == (int(round((4.6 * 2 + 1.8) * 100)), 700)  # 2 rows x one column per fold (2)
    assert png_shape(figures / "dice_bars.png")[1] > 600
    img = imread(figures / "overlay_0007.png")[..., :3]
    # the liver (class 6) is drawn blended with the CT: some pixel is much closer to its colour than grey is
    liver = np.array(to_rgb(plot_run.ORGAN_COLOURS[5]))
    assert np.abs(img - liver).sum(-1).min() < 0.6


def test_single_fold_folder_and_missing_inputs(tiny_runs, tmp_path):
    fold2 = tiny_runs / "fold2"
    written = plot_run.plot_run(str(fold2), out=str(tmp_path / "f2"))
    assert sorted(written) == ["curves"]  # no predictions, no results.json here
    h, w, _ = png_shape(tmp_path / "f2" / "curves.png")
    assert (w, h) == (int(round((4.6 + 1.8) * 100)), 700)  # one column
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "code"), REPO]))
    r = subprocess.run([sys.executable, os.path.join(REPO, "code", "plot_run.py"), "--exp", "no/such/run"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:")


def test_overlay_of_a_raw_scan_segmented_by_predict(tmp_path, capsys):
    """--scan/--pred (predict.py's labels on the scan's own grid): the overlay is drawn with and without ground
    truth, organs in their colours; a label map on another grid is one error line."""
    from data.phantom_anatomy import make_case
    image, label, spacing = make_case(1, shape=(16, 64, 64))
    paths = {}
    for name, array in (("scan", image), ("label", label), ("pred", np.where(label == 1, 0, label).astype(np.uint8)),
                        ("halved", label[:, ::2, ::2])):
        itk = sitk.GetImageFromArray(array)
        itk.SetSpacing(spacing)
        paths[name] = str(tmp_path / f"{name}.nii.gz")
        sitk.WriteImage(itk, paths[name])
    base = ["--scan", paths["scan"], "--task", "phantom", "--out", str(tmp_path / "fig")]
    assert plot_run.main(base + ["--pred", paths["pred"], "--label", paths["label"]]) in (None, 0)
    path = tmp_path / "fig" / "overlay_scan.png"
    assert f"overlay: {path}" in capsys.readouterr().out
    h, w, _ = png_shape(path)
    assert (w, h) == (1100, 950)
    img = imread(path)[..., :3]
    for organ in (6, 7):  # liver and stomach drawn over the scan
        assert np.abs(img - np.array(to_rgb(plot_run.ORGAN_COLOURS[organ - 1]))).sum(-1).min() < 0.6
    path.unlink()
    assert plot_run.main(base + ["--pred", paths["pred"]]) in (None, 0) and path.is_file()  # no ground truth
    assert plot_run.main(base + ["--pred", paths["halved"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {paths['halved']}: shape [16, 32, 32] is not the scan's")
    with pytest.raises(SystemExit):
        plot_run.parse_args(["--scan", paths["scan"], "--task", "phantom"])  # --pred and --out missing
