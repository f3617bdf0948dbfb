"""code/test.py end to end on a tiny fake experiment (docs/pipeline.md#sliding-window-inference;
Q40, Q42-Q44 in docs/original-quirks.md)."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from models import build_network
from utils.inference import prepare_case, sliding_window_predict
from utils.task import REPO_ROOT, get_task

SCRIPT = os.path.join(REPO_ROOT, "code", "test.py")
PATCH = (16, 32, 32)  # run.json's patch: small so the tests stay fast (speed 0 strides fit it)


def load_cli():
    # code/test.py would shadow the standard library's `test` package: load it under its own name
    spec = importlib.util.spec_from_file_location("dhc_test_cli", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = load_cli()


def make_net(seed, n_classes=14, n_filters=4, class_bias=None):
    torch.manual_seed(seed)
    net = build_network("VNet", 1, n_classes, n_filters)
    with torch.no_grad():  # random BN statistics so eval-mode outputs are not trivial
        for name, buf in net.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
        if class_bias is not None:
            net.out_conv.bias[class_bias] += 50.0
    return net.eval()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Phantom task in tmp_path: case 0001 with meta.json, case 0002 (smaller than the patch after halving)
    with only a raw NIfTI for its geometry."""
    for var, sub in (("DHC_LOG_ROOT", "logs"), ("DHC_PHANTOM_DATA", "data"), ("DHC_PHANTOM_RAW", "raw")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    rng = np.random.default_rng(0)
    npy = tmp_path / "data" / "npy"
    npy.mkdir(parents=True)
    np.save(npy / "0001_image.npy", rng.uniform(-200, 400, (24, 80, 80)).astype(np.float32))
    (npy / "0001_meta.json").write_text(json.dumps({
        "spacing": [0.7, 0.75, 2.5], "origin": [-120.5, 80.0, 33.0], "direction": [-1, 0, 0, 0, -1, 0, 0, 0, 1],
        "shape": [24, 80, 80], "source_shape": [24, 80, 80], "source": "raw/imagesTr/img0001.nii.gz"}))
    image2 = rng.uniform(-200, 400, (20, 50, 60)).astype(np.float32)
    np.save(npy / "0002_image.npy", image2)
    raw = sitk.GetImageFromArray(image2)
    raw.SetSpacing((0.9, 0.8, 3.0))
    raw.SetOrigin((1.0, 2.0, 3.0))
    (tmp_path / "raw" / "imagesTr").mkdir(parents=True)
    sitk.WriteImage(raw, str(tmp_path / "raw" / "imagesTr" / "img0002.nii.gz"))
    (tmp_path / "data" / "splits").mkdir()
    (tmp_path / "data" / "splits" / "test.txt").write_text("0002\n0001\n")
    return get_task("phantom"), tmp_path


def make_exp(root, exp, ckpt, network=None, keys=("A", "B")):
    folder = root / "logs" / exp
    (folder / "ckpts").mkdir(parents=True)
    torch.save(ckpt, folder / "ckpts" / "best_model.pth")
    if network is not None:
        (folder / "run.json").write_text(json.dumps({
            "method": "dhc", "task": "phantom", "exp": exp, "seed": 0, "network": network,
            "checkpoint_keys": None if keys is None else list(keys), "patch_size": list(PATCH)}))
    return folder


NETWORK = {"name": "VNet", "n_channels": 1, "n_classes": 14, "n_filters": 4, "normalization": "batchnorm"}


def read_pred(path):
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def expected_labels(task, case_id, nets, patch):
    image, _ = prepare_case(task, case_id)
    return sliding_window_predict(nets, image, patch, 32, 16, 14, return_probs=False)[0]


def test_cps_ab_and_a_predictions_with_geometry(env):
    task, root = env
    net_a, net_b = make_net(1), make_net(2, class_bias=5)  # B pushes class 5 by +50 (+25 in the logit mean)
    exp = "Task_phantom_20p/dhc/fold1"
    folder = make_exp(root, exp, {"A": net_a.state_dict(), "B": net_b.state_dict()}, NETWORK)
    for cps in ("AB", "A"):
        assert cli.main(["--task", "phantom", "--exp", exp, "--cps", cps, "--device", "cpu"]) == 0
    pred_ab, img = read_pred(folder / "predictions_AB" / "0001.nii.gz")
    pred_a, _ = read_pred(folder / "predictions_A" / "0001.nii.gz")
    # Q40: uint8 labels, inference grid (24, 40, 40), spacing x/y doubled by the halving, source origin/direction
    assert img.GetPixelID() == sitk.sitkUInt8 and pred_ab.shape == (24, 40, 40)
    assert img.GetSpacing() == pytest.approx((1.4, 1.5, 2.5))
    assert img.GetOrigin() == pytest.approx((-120.5, 80.0, 33.0))
    assert img.GetDirection() == pytest.approx((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    assert (pred_ab == 5).all()  # the logit mean is dominated by B's +25
    np.testing.assert_array_equal(pred_a, expected_labels(task, "0001", [net_a], PATCH))
    assert (pred_a != 5).any()
    # case 0002: (20, 25, 30) after halving, padded to the patch and cropped back; geometry from the raw NIfTI
    pred2, img2 = read_pred(folder / "predictions_A" / "0002.nii.gz")
    assert pred2.shape == (20, 25, 30) and img2.GetPixelID() == sitk.sitkUInt8
    assert img2.GetSpacing() == pytest.approx((1.8, 1.6, 3.0)) and img2.GetOrigin() == pytest.approx((1, 2, 3))
    np.testing.assert_array_equal(pred2, expected_labels(task, "0002", [net_a], PATCH))
    assert sorted(os.listdir(folder / "predictions_AB")) == ["0001.nii.gz", "0002.nii.gz"]  # no temp files


def test_exp_name_fallback_without_run_json(env):
    task, root = env
    net = make_net(3, n_filters=task.n_filters)  # released checkpoints: n_filters from the task config
    exp = "Task_phantom_20p/fully/fold1"
    folder = make_exp(root, exp, net.state_dict())
    assert cli.main(["--task", "phantom", "--exp", exp, "--device", "cpu", "--cps", "AB"]) == 0
    for case_id in ("0001", "0002"):  # folder named from the CLI value although a bare checkpoint ignores it
        pred, _ = read_pred(folder / "predictions_AB" / f"{case_id}.nii.gz")
        np.testing.assert_array_equal(pred, expected_labels(task, case_id, [net], task.patch_size))


@pytest.mark.parametrize("cps,layout,sub", [
    (None, [None], "predictions_None"), ("AB", [None], "predictions_AB"), ("A", [None], "predictions_A"),
    (None, ["A", "B"], "predictions_AB"), ("B", ["A", "B"], "predictions_B")])
def test_prediction_dir_names(tmp_path, monkeypatch, cps, layout, sub):
    monkeypatch.setenv("DHC_LOG_ROOT", str(tmp_path))
    assert cli.prediction_dir("e/fold1", cps, dict.fromkeys(layout)) == os.path.join(str(tmp_path), "e/fold1", sub)


@pytest.mark.parametrize("cps,keys", [(None, ["A", "B"]), ("AB", ["A", "B"]), ("A", ["A"]), ("B", ["B"])])
def test_select_nets(cps, keys):
    assert cli.select_nets({"A": {}, "B": {}}, cps, "ckpt") == keys
    assert cli.select_nets({None: {}}, cps, "ckpt") == [None]  # bare state dict: --cps ignored (original)


@pytest.mark.parametrize("exp,name", [
    ("Task_synapse_20p/fully/fold1", "VNet"), ("Task_synapse_20p/dst/fold1", "VNet_Decoupled"),
    ("Task_synapse_20p/urpc/fold1", "unet_3D_ds"), ("Task_synapse_20p/uamt/fold1", "VNet"),
    ("Task_synapse_20p/acisis/fold1", "VNet"), ("Task_synapse_20p/ssnet/fold1", "VNet4SSNet"),
    ("Task_synapse_20p/dhc/fold1", "VNet"), ("Task_synapse_20p/fully_dst/fold1", "VNet"),  # 'fully' tested first
])
def test_exp_name_rules(tmp_path, monkeypatch, exp, name):
    monkeypatch.setenv("DHC_LOG_ROOT", str(tmp_path))
    spec, keys, patch = cli.read_run_config(get_task("synapse"), exp)
    width = 16 if name == "unet_3D_ds" else 32  # the original builds URPC's U-Net at 16 filters on every task
    assert spec == {"name": name, "n_channels": 1, "n_classes": 14, "n_filters": width, "normalization": "batchnorm"}
    assert keys is None and patch == (64, 128, 128)


def run_error(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_wrong_class_count_is_one_line_error(env, capsys):
    _, root = env
    exp = "Task_phantom_20p/dhc/fold1"
    folder = make_exp(root, exp, {"A": make_net(1, n_classes=5).state_dict(), "B": make_net(2).state_dict()},
                      NETWORK)
    err = run_error(["--task", "phantom", "--exp", exp, "--cps", "AB", "--device", "cpu"], capsys)
    assert err == (f"error: {folder / 'ckpts' / 'best_model.pth'}['A']: not a VNet checkpoint for 14 classes "
                   "(out_conv.weight has shape [5, 4, 1, 1, 1], expected [14, 4, 1, 1, 1])")
    assert not (folder / "predictions_AB").exists()


def test_checkpoint_errors(env, capsys):
    _, root = env
    exp = "Task_phantom_20p/dhc/fold1"
    err = run_error(["--task", "phantom", "--exp", exp, "--device", "cpu"], capsys)
    assert err.endswith(os.path.join(exp, "ckpts", "best_model.pth") + ": checkpoint not found (train the run first)")
    make_exp(root, exp, make_net(1).state_dict(), NETWORK)  # run.json says {A, B}, the file is bare
    err = run_error(["--task", "phantom", "--exp", exp, "--device", "cpu"], capsys)
    assert err.endswith("run.json expects nets A, B, the file has a bare state dict")
    err = run_error(["--task", "phantom", "--exp", exp, "--device", "cpu", "--amp"], capsys)
    assert "--amp needs a CUDA device" in err


def test_runs_as_script_from_repo_root(tmp_path):
    env = dict(os.environ, DHC_LOG_ROOT=str(tmp_path / "logs"), DHC_PHANTOM_DATA=str(tmp_path / "data"))
    (tmp_path / "data" / "splits").mkdir(parents=True)
    (tmp_path / "data" / "splits" / "test.txt").write_text("0001\n")
    proc = subprocess.run([sys.executable, "code/test.py", "--task", "phantom", "--exp", "x", "--device", "cpu"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'data' / 'npy' / '0001_image.npy'}: image not found " \
                                  "(1 of 1 cases of split 'test' missing)"


@pytest.mark.parametrize("speed,patch,expected", [
    (0, (64, 128, 128), (32, 16)), (1, (64, 128, 128), (64, 16)), (2, (64, 128, 128), (128, 32)),
    (2, (32, 64, 64), (64, 32)),  # a CPU-sized patch: xy 128 would leave gaps, capped to 64
    (1, (16, 32, 32), (32, 16)),
])
def test_strides_for_speed(speed, patch, expected):
    assert cli.strides_for(speed, patch) == expected
