"""utils.inference: window geometry, sliding-window averaging, padding (Q41), geometry (Q40), prepare_case.
docs/pipeline.md#sliding-window-inference; Qn: docs/original-quirks.md."""
import json
import logging
import math
from itertools import product

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn as nn

from utils.inference import (STRIDES, Geometry, grid_geometry, prepare_case, sliding_window_predict,
                             window_starts)
from utils.io import DataError
from utils.task import get_task


# ---------------------------------------------------------------------------------------------- geometry
def test_window_starts_synapse_175_windows():
    # Synapse halved (147, 256, 256), patch (64, 128, 128), speed 0: z ceil(83/16)+1 = 7, xy ceil(128/32)+1 = 5
    z, y, x = window_starts(147, 64, 16), window_starts(256, 128, 32), window_starts(256, 128, 32)
    assert z == [0, 16, 32, 48, 64, 80, 83]  # last window flush with the border: 147 - 64
    assert y == x == [0, 32, 64, 96, 128]
    assert len(z) * len(y) * len(x) == 175


def test_window_starts_amos_8_windows():
    z, y = window_starts(80, 64, 16), window_starts(160, 128, 32)
    assert z == [0, 16] and y == [0, 32]
    assert len(z) * len(y) * len(y) == 8


@pytest.mark.parametrize("size,patch,stride,expected", [
    (64, 64, 16, [0]),              # exact fit: one window
    (65, 64, 16, [0, 1]),           # ceil(1/16)+1 = 2, second flush right
    (100, 30, 40, [0, 40, 70]),     # ceil(70/40)+1 = 3
    (10, 4, 3, [0, 3, 6]),          # ceil(6/3)+1 = 3, 6 = 10 - 4 exactly
    (11, 4, 3, [0, 3, 6, 7]),       # ceil(7/3)+1 = 4, last clipped to 7
])
def test_window_starts_positions(size, patch, stride, expected):
    assert window_starts(size, patch, stride) == expected


def test_window_starts_rejects_small_axis():
    with pytest.raises(ValueError, match="smaller than the patch"):
        window_starts(50, 64, 16)


def test_strides_table():
    assert STRIDES == {0: (32, 16), 1: (64, 16), 2: (128, 32)}


# ---------------------------------------------------------------------------------------------- predictors
class Pointwise(nn.Module):
    """'+1'-style predictor: logits_c = -8 (x + 1 - 1 - c/2)^2, a function of each voxel only, so the averaged
    probability must equal the whole-volume softmax exactly, whatever the window layout."""

    def forward(self, x):
        centres = torch.tensor([0.0, 0.5, 1.0], device=x.device).view(1, 3, 1, 1, 1)
        return -8.0 * ((x + 1.0) - 1.0 - centres) ** 2


class Recorder(nn.Module):
    """Counts calls and records each window's first voxel; its output per window is a constant chosen from
    ``table[first voxel]`` as class-1 probability (2 classes: logits [0, logit(p)])."""

    def __init__(self, table=None, num_classes=2):
        super().__init__()
        self.calls, self.firsts, self.table, self.num_classes = 0, [], table, num_classes

    def forward(self, x):
        self.calls += 1
        first = x[:, 0, 0, 0, 0].tolist()
        self.firsts += first
        out = torch.zeros((x.shape[0], self.num_classes) + x.shape[2:])
        if self.table is not None:
            for i, v in enumerate(first):
                p = self.table[int(v)]
                out[i, 1] = math.log(p / (1 - p))
        return out


class Tiny(nn.Module):
    """VNet-like in miniature: conv 3^3 -> BN (random running stats) -> ReLU -> 1x1 conv to C classes."""

    def __init__(self, num_classes=3, seed=0, bias=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.block_one = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU())
        self.out_conv = nn.Conv3d(4, num_classes, 1)
        with torch.no_grad():
            for prm in self.parameters():
                prm.copy_(torch.randn(prm.shape, generator=g))
            self.block_one[1].running_mean.copy_(torch.randn(4, generator=g) * 0.1)
            self.block_one[1].running_var.copy_(torch.rand(4, generator=g) + 0.5)
            if bias is not None:
                self.out_conv.bias.copy_(torch.tensor(bias, dtype=torch.float32))
        self.eval()

    def forward(self, x):
        return self.out_conv(self.block_one(x))


def reference_loop(nets, image, patch, stride_xy, stride_z, num_classes):
    """Plain per-window loop (batch 1, numpy accumulation), padding done with np.pad, to compare with."""
    shape = image.shape
    pads = [((max(p - s, 0)) // 2, max(p - s, 0) - (max(p - s, 0)) // 2) for s, p in zip(shape, patch)]
    img = np.pad(image, pads)
    score = np.zeros((num_classes,) + img.shape, np.float64)
    count = np.zeros(img.shape, np.float64)
    strides = (stride_z, stride_xy, stride_xy)
    n = [math.ceil((s - p) / st) + 1 for s, p, st in zip(img.shape, patch, strides)]
    for kz, ky, kx in product(*map(range, n)):
        z, y, x = (min(st * k, s - p) for st, k, s, p in zip(strides, (kz, ky, kx), img.shape, patch))
        window = torch.from_numpy(img[z:z + patch[0], y:y + patch[1], x:x + patch[2]].copy())[None, None]
        with torch.no_grad():
            logits = sum(net(window) for net in nets) / len(nets)
        score[:, z:z + patch[0], y:y + patch[1], x:x + patch[2]] += torch.softmax(logits, 1)[0].numpy()
        count[z:z + patch[0], y:y + patch[1], x:x + patch[2]] += 1
    prob = score / count
    crop = tuple(slice(b, b + s) for (b, _), s in zip(pads, shape))
    prob = prob[(slice(None),) + crop]
    return prob.argmax(0), prob


# ---------------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("shape,patch,sxy,sz", [
    ((20, 40, 36), (8, 16, 16), 5, 3),     # many overlapping windows, uneven counts
    ((8, 16, 16), (8, 16, 16), 4, 4),      # one window, exact fit
    ((5, 11, 30), (8, 16, 16), 16, 8),     # D and H smaller than the patch: padding path (Q41)
])
def test_pointwise_predictor_exact_any_layout(shape, patch, sxy, sz):
    rng = np.random.default_rng(0)
    image = rng.random(shape, dtype=np.float32)
    labels, prob = sliding_window_predict([Pointwise()], image, patch, sxy, sz, 3, sw_batch_size=3)
    expected = torch.softmax(Pointwise()(torch.from_numpy(image)[None, None]), 1)[0].numpy()
    assert prob.shape == (3,) + shape and prob.dtype == np.float32
    assert labels.shape == shape and labels.dtype == np.int64
    np.testing.assert_allclose(prob, expected, rtol=0, atol=1e-6)
    # nearest of the centres 0, 0.5, 1
    np.testing.assert_array_equal(labels, np.rint(image * 2).astype(np.int64))


def test_window_positions_and_calls_recorded():
    # voxel values encode their own coordinates, so each window's first voxel gives its start
    shape, patch = (20, 40, 36), (8, 16, 16)
    zz, yy, xx = np.meshgrid(*map(np.arange, shape), indexing="ij")
    image = (zz * 10000 + yy * 100 + xx).astype(np.float32)
    rec = Recorder(num_classes=1)
    sliding_window_predict([rec], image, patch, 7, 5, 1, sw_batch_size=4)
    starts = sorted(tuple(int(v) // d % 100 for d in (10000, 100, 1)) for v in rec.firsts)
    expected = sorted(product(window_starts(20, 8, 5), window_starts(40, 16, 7), window_starts(36, 16, 7)))
    assert starts == expected and len(expected) == 4 * 5 * 4
    assert rec.calls == math.ceil(80 / 4)


def test_overlap_means_hand_computed():
    # 1D-like: W = 10, patch 4, stride 3 -> windows at x = 0, 3, 6 with class-1 probabilities 0.2, 0.6, 0.9.
    # x 0-2: 0.2 | x 3: (0.2+0.6)/2 = 0.4 | x 4-5: 0.6 | x 6: (0.6+0.9)/2 = 0.75 | x 7-9: 0.9
    image = np.arange(10, dtype=np.float32).reshape(1, 1, 10)
    rec = Recorder(table={0: 0.2, 3: 0.6, 6: 0.9})
    labels, prob = sliding_window_predict([rec], image, (1, 1, 4), 3, 1, 2, sw_batch_size=2)
    expected = np.array([0.2, 0.2, 0.2, 0.4, 0.6, 0.6, 0.75, 0.9, 0.9, 0.9], np.float32)
    np.testing.assert_allclose(prob[1, 0, 0], expected, atol=1e-6)
    np.testing.assert_allclose(prob[0, 0, 0], 1 - expected, atol=1e-6)
    np.testing.assert_array_equal(labels[0, 0], [0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    assert rec.calls == 2 and sorted(rec.firsts) == [0, 3, 6]


@pytest.mark.parametrize("shape,count", [((147, 256, 256), 175), ((80, 160, 160), 8)])
def test_reference_window_counts_full_size(shape, count):
    rec = Recorder(num_classes=1)
    labels, prob = sliding_window_predict([rec], np.zeros(shape, np.float32), (64, 128, 128), 32, 16, 1,
                                          sw_batch_size=25, return_probs=False)
    assert len(rec.firsts) == count and rec.calls == math.ceil(count / 25)
    assert prob is None and labels.shape == shape and not labels.any()


def test_logits_averaged_before_softmax():
    class Const(nn.Module):
        def __init__(self, logit):
            super().__init__()
            self.logit = logit

        def forward(self, x):
            return torch.cat([torch.zeros_like(x), torch.full_like(x, self.logit)], 1)

    image = np.zeros((4, 8, 8), np.float32)
    _, prob = sliding_window_predict([Const(2.0), Const(-1.0)], image, (4, 8, 8), 8, 4, 2)
    # softmax((A + B) / 2): sigmoid(0.5) = 0.622459, not (sigmoid(2) + sigmoid(-1)) / 2 = 0.574443
    np.testing.assert_allclose(prob[1], 1 / (1 + math.exp(-0.5)), atol=1e-6)


@pytest.mark.parametrize("speed", sorted(STRIDES))
def test_equals_per_window_loop_each_speed(speed):
    sxy, sz = STRIDES[speed]
    rng = np.random.default_rng(speed)
    image = rng.random((34, 130, 140), dtype=np.float32)  # 2 x 2 x 2 windows at every speed
    nets = [Tiny(seed=1), Tiny(seed=2)] if speed == 0 else [Tiny(seed=speed)]
    labels, prob = sliding_window_predict(nets, image, (32, 128, 128), sxy, sz, 3, sw_batch_size=3)
    ref_labels, ref_prob = reference_loop(nets, image, (32, 128, 128), sxy, sz, 3)
    np.testing.assert_allclose(prob, ref_prob, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(labels, ref_labels)


def test_equals_per_window_loop_padding_path():
    image = np.random.default_rng(7).random((10, 20, 70), dtype=np.float32)  # D, H < patch (16, 32, 32)
    nets = [Tiny(seed=3)]
    labels, prob = sliding_window_predict(nets, image, (16, 32, 32), 16, 8, 3, sw_batch_size=2)
    ref_labels, ref_prob = reference_loop(nets, image, (16, 32, 32), 16, 8, 3)
    assert prob.shape == (3, 10, 20, 70)
    np.testing.assert_allclose(prob, ref_prob, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(labels, ref_labels)


@pytest.mark.parametrize("kwargs,match", [
    (dict(image=np.zeros((8, 8)), patch_size=(4, 4, 4)), "image must be a"),
    (dict(image=np.zeros((8, 8, 8)), patch_size=(4, 4)), "patch_size must be 3"),
    (dict(image=np.zeros((8, 9, 8)), patch_size=(4, 4, 4), stride_xy=5), "leave gaps"),
    (dict(image=np.zeros((8, 8, 8)), patch_size=(4, 4, 4), num_classes=5), r"expected \(5, 4, 4, 4\)"),
    (dict(image=np.zeros((8, 8, 8)), patch_size=(4, 4, 4), nets=[]), "nets is empty"),
])
def test_input_validation(kwargs, match):
    args = dict(nets=[Tiny()], stride_xy=2, stride_z=2, num_classes=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sliding_window_predict(**args)


# ---------------------------------------------------------------------------------------------- geometry (Q40)
def test_grid_geometry_synapse_halving_and_amos_grid():
    g = grid_geometry((0.8, 0.7, 3.0), (-10, 20, 30), (1, 0, 0, 0, 1, 0, 0, 0, 1), (100, 512, 512), (100, 256, 256))
    assert g.spacing == pytest.approx((1.6, 1.4, 3.0)) and g.origin == (-10.0, 20.0, 30.0)
    # AMOS: source (D, H, W) = (120, 400, 300) -> (80, 160, 160); x: 300/160, y: 400/160, z: 120/80
    g = grid_geometry((1.0, 1.0, 2.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (120, 400, 300), (80, 160, 160))
    assert g.spacing == pytest.approx((1.875, 2.5, 3.0))


@pytest.fixture
def phantom(tmp_path, monkeypatch):
    monkeypatch.setenv("DHC_PHANTOM_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("DHC_PHANTOM_RAW", str(tmp_path / "raw"))
    (tmp_path / "data" / "npy").mkdir(parents=True)
    image = np.random.default_rng(0).uniform(-200, 400, (6, 10, 12)).astype(np.float32)
    np.save(tmp_path / "data" / "npy" / "0001_image.npy", image)
    return get_task("phantom"), image, tmp_path


def test_prepare_case_meta_json(phantom):
    task, image, root = phantom
    meta = {"spacing": [0.7, 0.8, 2.5], "origin": [1, 2, 3], "direction": [-1, 0, 0, 0, -1, 0, 0, 0, 1],
            "shape": [6, 10, 12], "source_shape": [6, 10, 12], "source": "x"}
    (root / "data" / "npy" / "0001_meta.json").write_text(json.dumps(meta))
    prepared, geom = prepare_case(task, "0001")
    # clip (-75, 275), min-max, then 2x2 in-plane mean (phantom = Synapse pipeline)
    clipped = np.clip(image, -75, 275)
    norm = (clipped - clipped.min()) / (clipped.max() - clipped.min())
    np.testing.assert_allclose(prepared, norm.reshape(6, 5, 2, 6, 2).mean((2, 4)), atol=1e-6)
    assert geom.spacing == pytest.approx((1.4, 1.6, 2.5))
    assert geom.origin == (1.0, 2.0, 3.0) and geom.direction == (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)


def test_prepare_case_raw_nifti_then_identity(phantom, caplog):
    task, image, root = phantom
    raw = sitk.GetImageFromArray(image)
    raw.SetSpacing((0.6, 0.9, 4.0))
    raw.SetOrigin((5.0, 6.0, 7.0))
    (root / "raw" / "imagesTr").mkdir(parents=True)
    sitk.WriteImage(raw, str(root / "raw" / "imagesTr" / "img0001.nii.gz"))
    _, geom = prepare_case(task, "0001")
    assert geom.spacing == pytest.approx((1.2, 1.8, 4.0)) and geom.origin == (5.0, 6.0, 7.0)
    (root / "raw" / "imagesTr" / "img0001.nii.gz").unlink()
    with caplog.at_level(logging.WARNING):
        _, geom = prepare_case(task, "0001")
    assert geom == Geometry() and "no meta.json or raw NIfTI" in caplog.text


def test_prepare_case_bad_inputs(phantom):
    task, image, root = phantom
    with pytest.raises(DataError, match="0002_image.npy: image not found"):
        prepare_case(task, "0002")
    bad = image.copy()
    bad[0, 0, 0] = np.nan
    np.save(root / "data" / "npy" / "0001_image.npy", bad)
    with pytest.raises(DataError, match="NaN"):
        prepare_case(task, "0001")
    np.save(root / "data" / "npy" / "0001_image.npy", image)
    (root / "data" / "npy" / "0001_meta.json").write_text(json.dumps(
        {"spacing": [1, 1, 1], "origin": [0, 0, 0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1], "shape": [6, 10, 13]}))
    with pytest.raises(DataError, match=r"shape \[6, 10, 13\] does not match"):
        prepare_case(task, "0001")
