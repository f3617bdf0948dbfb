"""code/predict.py: new scans in, labels on each scan's own grid out (docs/pipeline.md#segmenting-new-scans).

Tiny phantom scans (16 x 64 x 64, make_case with a small grid) and 4-filter nets with random BatchNorm statistics.
The expected labels come from the pieces test.py uses (prepare_case / sliding_window_scores), so predict.py is
checked against test.py's path, not against itself."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import engine
import predict
from conftest import REPO
from data.phantom_anatomy import make_case
from models import build_network
from test_methods_common import method_class
from utils.checkpoint import method_names, network_by_name
from utils.inference import prepare_scan, resample_to_scan, sliding_window_scores
from utils.task import get_task

SHAPE = (16, 64, 64)
PATCH = (16, 32, 32)  # = the phantom grid after in-plane halving: one window per scan
EXP = "Task_phantom_20p/dhc/fold1"
LPS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def load_test_cli():
    spec = importlib.util.spec_from_file_location("dhc_test_cli_predict", os.path.join(REPO, "code", "test.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_net(name="VNet", seed=0, n_classes=14, n_filters=4):
    torch.manual_seed(seed)
    net = build_network(name, 1, n_classes, n_filters)
    with torch.no_grad():  # random BN statistics so eval-mode outputs are not trivial
        for key, buf in net.named_buffers():
            if key.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif key.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
        if name == "VNet":
            net.out_conv.weight *= 5  # several classes with boundaries instead of one nearly everywhere
    return net.eval()


def oblique(degrees_z=30.0, degrees_x=10.0):
    """A rotation about z then x, as a row-major 3x3 direction (an oblique acquisition)."""
    a, b = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple(float(v) for v in (rz @ rx).ravel())


def write_scan(path, image, spacing=(1.5, 1.5, 4.0), origin=(-120.5, 80.25, 33.0), direction=LPS):
    itk = sitk.GetImageFromArray(image)
    itk.SetSpacing(spacing)
    itk.SetOrigin(origin)
    itk.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(itk, str(path))
    return path


def phantom_scan(path, index=1, layout="synapse", shape=SHAPE, **geometry):
    image, _, spacing = make_case(index, layout=layout, shape=shape)
    return write_scan(path, image, spacing=geometry.pop("spacing", spacing), **geometry)


def write_run(root, nets, task="phantom", n_classes=14, exp=EXP):
    """logs/<exp>/{run.json, ckpts/best_model.pth} of a trained {A, B} VNet run (4 filters, patch 16x32x32)."""
    folder = root / "logs" / exp
    (folder / "ckpts").mkdir(parents=True)
    torch.save({k: n.state_dict() for k, n in nets.items()}, folder / "ckpts" / "best_model.pth")
    (folder / "run.json").write_text(json.dumps({
        "method": "dhc", "task": task, "network": {"name": "VNet", "n_channels": 1, "n_classes": n_classes,
                                                   "n_filters": 4, "normalization": "batchnorm"},
        "checkpoint_keys": sorted(nets), "patch_size": list(PATCH)}))
    return folder


@pytest.fixture
def root(tmp_path, monkeypatch):
    for var, sub in (("DHC_LOG_ROOT", "logs"), ("DHC_PHANTOM_DATA", "data"), ("DHC_AMOS_DATA", "amos")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path


def read(path):
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def same_geometry(a, b):
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()


def expected_native(nets, scan, task, patch=PATCH, stride=(32, 16)):
    """Labels on the scan's grid from the shared pieces: prepare_scan -> sliding_window_scores -> resample_to_scan."""
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(scan)))
    prob = sliding_window_scores(nets, prepare_scan(raw, task), patch, *stride, task.num_cls, device="cpu")
    return resample_to_scan(prob, raw.shape)[0]


def main(*argv):
    return predict.main([*map(str, argv), "--device", "cpu"])


# ------------------------------------------------------------------------------------------------ geometry + test.py
def test_synapse_layout_native_labels_agree_with_test_py(root):
    """Phantom (Synapse layout, LPS header): the output has the scan's exact grid, and its even in-plane voxels (where
    the inference grid's voxels sit) are test.py's labels for the same case, voxel for voxel."""
    nets = {"A": make_net(seed=1), "B": make_net(seed=2)}
    write_run(root, nets)
    scan = phantom_scan(root / "in" / "img0001.nii.gz", origin=(-120.5, 80.25, 33.0), direction=LPS)
    npy = root / "data" / "npy"  # the same case as test.py sees it after preprocessing
    npy.mkdir(parents=True)
    np.save(npy / "0001_image.npy", sitk.GetArrayFromImage(sitk.ReadImage(str(scan))).astype(np.float32))
    (root / "data" / "splits").mkdir()
    (root / "data" / "splits" / "test.txt").write_text("0001\n")
    assert load_test_cli().main(["--task", "phantom", "--exp", EXP, "--cps", "AB", "--device", "cpu"]) == 0
    grid_labels, _ = read(root / "logs" / EXP / "predictions_AB" / "0001.nii.gz")

    assert main("-i", scan, "-o", root / "out", "--task", "phantom", "--exp", EXP) == 0
    labels, out = read(root / "out" / "img0001.nii.gz")
    same_geometry(out, sitk.ReadImage(str(scan)))
    assert out.GetPixelID() == sitk.sitkUInt8 and labels.shape == SHAPE
    assert len(np.unique(grid_labels)) > 2  # not a trivial agreement
    np.testing.assert_array_equal(labels[:, ::2, ::2], grid_labels)  # = halve_inplane_label(labels)
    assert sorted(os.listdir(root / "out")) == ["img0001.nii.gz"]  # no temporaries


def test_amos_layout_oblique_direction(root):
    """AMOS (the scan resized to 80x160x160 for the nets): output on the scan's grid with an oblique direction kept
    exactly; where a grid voxel falls on a scan voxel (every 5th grid voxel here) the labels are test.py's."""
    task = get_task("amos")
    nets = {"A": make_net(seed=3, n_classes=16), "B": make_net(seed=4, n_classes=16)}
    write_run(root, nets, task="amos", n_classes=16)
    scan = phantom_scan(root / "in" / "amos_0001.nii.gz", layout="amos", origin=(10.0, -20.0, 5.5),
                        direction=oblique())
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(scan)))
    assert main("-i", root / "in", "-o", root / "out", "--task", "amos", "--exp", EXP, "--speed", "2") == 0
    labels, out = read(root / "out" / "amos_0001.nii.gz")
    same_geometry(out, sitk.ReadImage(str(scan)))
    assert out.GetDirection() == pytest.approx(oblique(), abs=1e-6) and labels.shape == SHAPE  # float32 header
    header, scan_header = (predict.nifti1_header(str(p))[0] for p in (root / "out" / "amos_0001.nii.gz", scan))
    for field in predict.GEOMETRY_BYTES:  # SimpleITK alone writes one direction entry differently here
        assert header[field] == scan_header[field]
    grid = prepare_scan(raw, task)  # test.py's input for this case: the stored 80x160x160 volume, normalised
    assert grid.shape == (80, 160, 160)
    stride = (32, 16)  # --speed 2 capped to the 16x32x32 patch: windows side by side
    grid_labels = sliding_window_scores(list(nets.values()), grid, PATCH, *stride, 16, device="cpu").argmax(0)
    np.testing.assert_array_equal(labels[:, ::2, ::2], grid_labels[::5, ::5, ::5].numpy())
    assert len(np.unique(labels)) > 2


# ------------------------------------------------------------------------------------------------ checkpoints
def test_ckpt_with_method_equals_exp(root):
    """--ckpt FILE --method dhc (width read from the weights) gives the --exp run's labels and probabilities."""
    write_run(root, {"A": make_net(seed=5), "B": make_net(seed=6)})
    scan = phantom_scan(root / "in" / "img0002.nii", index=2)  # uncompressed .nii works too
    ckpt = root / "logs" / EXP / "ckpts" / "best_model.pth"
    assert main("-i", scan, "-o", root / "exp", "--task", "phantom", "--exp", EXP, "--save_probabilities") == 0
    assert main("-i", scan, "-o", root / "ckpt", "--task", "phantom", "--ckpt", ckpt, "--method", "dhc",
                "--patch_size", *PATCH, "--save_probabilities") == 0
    a, b = read(root / "exp" / "img0002.nii")[0], read(root / "ckpt" / "img0002.nii")[0]
    np.testing.assert_array_equal(a, b)
    pa, pb = np.load(root / "exp" / "img0002.npz"), np.load(root / "ckpt" / "img0002.npz")
    np.testing.assert_array_equal(pa["probabilities"], pb["probabilities"])
    probs = pa["probabilities"]
    assert probs.dtype == np.float16 and probs.shape == (14,) + SHAPE
    assert list(pa["class_names"][:2]) == ["background", "spleen"]
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=1e-2)  # float16 rounding of C terms
    top2 = np.sort(probs.astype(np.float32), axis=0)[-2:]
    clear = top2[1] - top2[0] > 2e-3  # float16 rounding can only swap near-ties
    assert clear.mean() > 0.5 and (probs.argmax(0)[clear] == a[clear]).all()


@pytest.mark.parametrize("method,layout", [("dhc", "AB"), ("fully", "bare"), ("urpc", "bare"), ("ssnet", "bare"),
                                           ("dst", "AB")])
def test_released_checkpoint_of_each_network_family(root, method, layout):
    """A best_model.pth without run.json: network from the method (test.py's table), width 4 read from the weights
    (unet_3D_ds included, whose run default is 16), labels = the shared pieces' on the scan's grid."""
    name = network_by_name(method)
    nets = [make_net(name, seed=7), make_net(name, seed=8)] if layout == "AB" else [make_net(name, seed=9)]
    ckpt = root / "released" / "best_model.pth"
    ckpt.parent.mkdir()
    torch.save({"A": nets[0].state_dict(), "B": nets[1].state_dict()} if layout == "AB" else nets[0].state_dict(),
               ckpt)
    scan = phantom_scan(root / "in" / "img0003.nii.gz", index=3)
    assert main("-i", scan, "-o", root / "out", "--task", "phantom", "--ckpt", ckpt, "--method", method,
                "--patch_size", *PATCH) == 0
    labels, _ = read(root / "out" / "img0003.nii.gz")
    np.testing.assert_array_equal(labels, expected_native(nets, scan, get_task("phantom")))


def test_network_table_matches_each_method_class():
    """The experiment-name rule --method relies on names the network each train_<m>.py actually trains."""
    assert set(method_names()) >= {"dhc", "fully", "urpc", "ssnet", "dst", "dhc_unetrpp"}
    for method in method_names():
        assert network_by_name(method) == method_class(method).network, method
    assert engine.Method.network == "VNet"


def test_wrong_width_and_unknown_method_are_one_line(root, capsys):
    torch.save(make_net(seed=1).state_dict(), root / "bare.pth")
    scan = phantom_scan(root / "in" / "img0001.nii.gz")
    base = ["-i", scan, "-o", root / "out", "--task", "phantom", "--ckpt", root / "bare.pth"]
    cases = [(["--method", "fully", "--n_filters", "8"], "not a VNet checkpoint for 14 classes"),
             (["--method", "nope"], "--method 'nope': unknown; choose one of acisis, adsh"),
             ([], "--ckpt needs --method"),
             (["--method", "fully", "--cps", "A"], None)]  # a bare checkpoint ignores --cps, as test.py
    for extra, message in cases:
        code = main(*base, *extra)
        err = capsys.readouterr().err.strip().splitlines()
        if message is None:
            assert code == 0 and not [line for line in err if line.startswith("error")]
        else:
            assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    write_run(root, {"A": make_net(seed=1), "B": make_net(seed=2)})
    for extra, message in ((["--method", "dhc"], "--method: only with --ckpt"),
                           (["-o", root / "in"], "is the input folder")):
        code = main("-i", scan, "-o", root / "out2", "--task", "phantom", "--exp", EXP, *extra)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err


# ------------------------------------------------------------------------------------------------ bad inputs, outputs
def bad_scans(folder):
    """{file name: expected problem} of every kind of bad input, written into ``folder``."""
    good = folder / "good.nii.gz"
    data = good.read_bytes()
    (folder / "garbage.nii.gz").write_bytes(b"not a nifti file at all" * 10)
    (folder / "truncated.nii.gz").write_bytes(data[:len(data) // 2])
    write_scan(folder / "flat.nii.gz", np.zeros((64, 64), np.int16), spacing=(1.0, 1.0), origin=(0.0, 0.0),
               direction=(1.0, 0.0, 0.0, 1.0))
    series = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros(SHAPE, np.int16))] * 2)
    sitk.WriteImage(series, str(folder / "series.nii.gz"))
    nan = np.zeros(SHAPE, np.float32)
    nan[3, 4, 5] = np.nan
    write_scan(folder / "nan.nii.gz", nan)
    write_scan(folder / "slice.nii.gz", np.zeros((1, 64, 64), np.int16))
    return {"garbage.nii.gz": "unreadable NIfTI", "truncated.nii.gz": "truncated",
            "flat.nii.gz": "a 2-D image (size 64x64), expected a 3-D scan",
            "series.nii.gz": "a 4-D image (size 64x64x16x2), expected a 3-D scan",
            "nan.nii.gz": "image contains NaN or infinite intensities",
            "slice.nii.gz": "one voxel thick: a 2-D slice"}


def test_bad_scans_are_one_line_each_and_the_others_are_written(root):
    """The real script on a folder (output not a terminal: plain lines, no progress bar): one error line per bad
    scan, the good ones written, exit 2 with the list of failures at the end, no temporaries."""
    write_run(root, {"A": make_net(seed=1), "B": make_net(seed=2)})
    phantom_scan(root / "in" / "good.nii.gz", index=4)
    phantom_scan(root / "in" / "zz_good.nii.gz", index=5)
    problems = bad_scans(root / "in")
    env = dict(os.environ, OMP_NUM_THREADS="1", DHC_LOG_ROOT=str(root / "logs"))
    proc = subprocess.run([sys.executable, "code/predict.py", "-i", str(root / "in"), "-o", str(root / "out"),
                           "--task", "phantom", "--exp", EXP, "--device", "cpu"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(problems) + 1
    for line, (name, problem) in zip(errors, sorted(problems.items())):
        assert line.startswith(f"error: {root / 'in' / name}: ") and problem in line, (line, problem)
    assert errors[-1] == (f"error: 6 scan(s) failed: {', '.join(sorted(problems))}; the others were written to "
                          f"{root / 'out'}")
    assert sorted(os.listdir(root / "out")) == ["good.nii.gz", "zz_good.nii.gz"]
    assert "\r" not in proc.stderr  # no progress bar off a terminal: one plain line per scan, with its seconds
    done = [line for line in proc.stderr.splitlines() if line.startswith(("good.nii.gz: ", "zz_good.nii.gz: "))]
    assert len(done) == 2 and all(" 16x64x64 -> " in line and " s (read " in line for line in done)


def test_existing_output_is_refused_unless_overwrite(root, capsys):
    write_run(root, {"A": make_net(seed=1), "B": make_net(seed=2)})
    scan = phantom_scan(root / "in" / "img0001.nii.gz")
    args = ["-i", scan, "-o", root / "out", "--task", "phantom", "--exp", EXP]
    assert main(*args) == 0
    out = root / "out" / "img0001.nii.gz"
    out.write_bytes(b"old")
    capsys.readouterr()
    assert main(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {out}: exists (1 of the outputs do); pass --overwrite to replace them"]
    assert out.read_bytes() == b"old"
    assert main(*args, "--save_probabilities", "--overwrite") == 0
    assert read(out)[0].shape == SHAPE and (root / "out" / "img0001.npz").is_file()


# ------------------------------------------------------------------------------------------------ resampling, TTA
def test_resample_to_scan_hand_values():
    """Grid voxel i sits on scan voxel 2i: even scan voxels are the grid's values, odd ones the mean of their two
    neighbours, the last one (past the last grid voxel) the last grid value; a same-size axis is the identity.
    Slabs of one slice give the same result as one slab."""
    p1 = torch.tensor([[0.0, 1.0], [0.9, 0.2]]).reshape(2, 1, 1, 2)  # (C=2, d=1, h=1, w=2)
    prob = torch.cat([p1, 1 - p1])  # 4 score maps: [0, 1], [0.9, 0.2], [1, 0], [0.1, 0.8]
    labels, probs = resample_to_scan(prob, (1, 2, 4), keep_probabilities=True)
    # y: 1 -> 2 (both scan rows take grid row 0); x: 2 -> 4 at grid coordinates 0, 0.5, 1, 1.5 (clamped to 1)
    expected = np.array([[0.0, 0.5, 1.0, 1.0], [0.9, 0.55, 0.2, 0.2], [1.0, 0.5, 0.0, 0.0], [0.1, 0.45, 0.8, 0.8]])
    np.testing.assert_allclose(probs[:, 0].astype(np.float32), np.repeat(expected[:, None], 2, 1), atol=1e-3)
    assert probs.dtype == np.float16 and probs.shape == (4, 1, 2, 4)
    assert labels.dtype == np.uint8 and labels[0].tolist() == [[2, 1, 0, 0]] * 2
    grid = torch.rand(3, 5, 6, 7)
    one, _ = resample_to_scan(grid, (5, 12, 14))
    slabs, _ = resample_to_scan(grid, (5, 12, 14), chunk_bytes=1)
    np.testing.assert_array_equal(one, slabs)
    np.testing.assert_array_equal(one[:, ::2, ::2], grid.argmax(0).numpy())
    same, _ = resample_to_scan(grid, (5, 6, 7))
    np.testing.assert_array_equal(same, grid.argmax(0).numpy())


def symmetric(shape, seed=0):
    """A volume equal to its flip along every axis."""
    x = np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32)
    for axis in range(3):
        x = x + np.flip(x, axis)
    return np.ascontiguousarray(x / 8)


def test_tta_mirroring_on_a_symmetric_case():
    """On a volume symmetric along every axis (one window, so the layout is symmetric too) mirroring makes the
    scores symmetric, which one pass of a random net is not; and it is the softmax of the mean of the 8 flipped
    passes' logits, computed by hand."""
    net = make_net(seed=11)
    volume = symmetric(PATCH)
    plain = sliding_window_scores([net], volume, PATCH, 32, 16, 14, device="cpu")
    tta = sliding_window_scores([net], volume, PATCH, 32, 16, 14, device="cpu", mirror_axes=(0, 1, 2))
    for axis in (1, 2, 3):
        torch.testing.assert_close(tta, tta.flip(axis), atol=2e-6, rtol=0)
        assert (plain - plain.flip(axis)).abs().max() > 1e-3
    x = torch.from_numpy(volume)[None, None]
    with torch.no_grad():
        logits = sum(net(x.flip(d)).flip(d) if d else net(x)
                     for d in ([], [2], [3], [4], [2, 3], [2, 4], [3, 4], [2, 3, 4])) / 8
    torch.testing.assert_close(tta, torch.softmax(logits, 1)[0], atol=1e-6, rtol=1e-5)


def test_tta_flag_on_a_symmetric_scan(root):
    """--tta --tta_axes 0 1 2 through the script: on a scan symmetric along every axis the saved probabilities are
    symmetric along z
    (the axis the scan and the grid share) and, in-plane, between the scan voxels where the grid's voxels sit
    (2i and W - 2 - 2i); without --tta they are not, and the labels differ."""
    write_run(root, {"A": make_net(seed=12), "B": make_net(seed=13)})
    write_scan(root / "in" / "sym.nii.gz", (symmetric(SHAPE) * 400 - 100).astype(np.float32))
    for out, extra in (("tta", ["--tta", "--tta_axes", "0", "1", "2"]), ("plain", [])):
        assert main("-i", root / "in", "-o", root / out, "--task", "phantom", "--exp", EXP, "--save_probabilities",
                    *extra) == 0
    tta = np.load(root / "tta" / "sym.npz")["probabilities"].astype(np.float32)
    plain = np.load(root / "plain" / "sym.npz")["probabilities"].astype(np.float32)
    np.testing.assert_allclose(tta, np.flip(tta, 1), atol=2e-3)  # float16 storage
    even = tta[:, :, ::2, ::2]
    np.testing.assert_allclose(even, np.flip(even, (2, 3)), atol=2e-3)
    assert np.abs(plain - np.flip(plain, 1)).max() > 1e-2
    assert (read(root / "tta" / "sym.nii.gz")[0] != read(root / "plain" / "sym.nii.gz")[0]).any()


# ------------------------------------------------------------------------------------------------ torchrun
def test_torchrun_splits_the_scans_over_two_ranks(root):
    """2 gloo ranks: each scan written once, equal to the single-process output; a bad scan on either rank makes
    every rank exit 2 and is listed once."""
    write_run(root, {"A": make_net(seed=1), "B": make_net(seed=2)})
    for i in (1, 2, 3):
        phantom_scan(root / "in" / f"img000{i}.nii.gz", index=i)
    (root / "in" / "img0004.nii.gz").write_bytes(b"broken")
    assert main("-i", root / "in", "-o", root / "single", "--task", "phantom", "--exp", EXP) == 2
    env = dict(os.environ, OMP_NUM_THREADS="1", DHC_LOG_ROOT=str(root / "logs"),
               PYTHONPATH=os.path.join(REPO, "code"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "code/predict.py", "-i", str(root / "in"), "-o", str(root / "ranks"), "--task", "phantom",
                           "--exp", EXP, "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count(f"error: {root / 'in' / 'img0004.nii.gz'}: unreadable NIfTI") == 1, proc.stderr
    assert proc.stderr.count("error: 1 scan(s) failed: img0004.nii.gz") == 1
    names = sorted(os.listdir(root / "single"))
    assert names == sorted(os.listdir(root / "ranks")) == [f"img000{i}.nii.gz" for i in (1, 2, 3)]
    for name in names:
        np.testing.assert_array_equal(read(root / "single" / name)[0], read(root / "ranks" / name)[0])


def test_tta_default_mirrors_the_axes_training_flips():
    """``--tta`` mirrors H and W by default (training flips only those; the slice axis is never flipped, and
    mirroring it cost 7 Dice points on the phantom): scores symmetric in H and W, not in D."""
    import predict
    from utils.inference import TRAINED_MIRRORS
    assert predict.parse_args(["-i", "x", "-o", "y", "--task", "phantom", "--exp", "r", "--tta"]).tta_axes == [1, 2]
    assert TRAINED_MIRRORS == (1, 2)
    net = make_net(seed=11)
    volume = symmetric(PATCH)
    tta = sliding_window_scores([net], volume, PATCH, 32, 16, 14, device="cpu", mirror_axes=TRAINED_MIRRORS)
    for axis in (2, 3):
        torch.testing.assert_close(tta, tta.flip(axis), atol=2e-6, rtol=0)
    assert (tta - tta.flip(1)).abs().max() > 1e-3
