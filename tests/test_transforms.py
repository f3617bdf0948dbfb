"""Per-volume preparation and per-sample transforms (docs/pipeline.md#dataset-and-normalisation, #crops-and-flips;
Q22-Q26 in docs/original-quirks.md)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.transforms import (CenterCrop, RandomCrop, RandomFlip, ToTensor, center_crop_offsets, crop_or_pad,
                             halve_inplane_image, halve_inplane_label, make_eval_transform, make_train_transform,
                             random_crop_offsets)
from utils.task import get_task


def _sample(shape, seed=0):
    """Image with distinct values everywhere; label derived from it so a joint transform keeps label == f(image)."""
    image = np.random.RandomState(seed).permutation(int(np.prod(shape))).reshape(shape).astype(np.float32)
    return {"image": image, "label": (image % 7).astype(np.uint8)}


def _original_train(sample, patch, seed):
    """Reference: the original RandomCrop -> RandomFlip_LR -> RandomFlip_UD on prepared arrays, written out."""
    np.random.seed(seed)
    (d, h, w), (pd, ph, pw) = sample["image"].shape, patch
    d0, h0, w0 = np.random.randint(0, d - pd), np.random.randint(0, h - ph), np.random.randint(0, w - pw)
    out = {k: v[d0:d0 + pd, h0:h0 + ph, w0:w0 + pw] for k, v in sample.items()}
    lr = (np.random.uniform(0, 1), np.random.uniform(0, 1))
    if lr[0] <= 0.5:
        out = {k: np.flip(v, 1) for k, v in out.items()}
    ud = (np.random.uniform(0, 1), np.random.uniform(0, 1))
    if ud[1] <= 0.5:
        out = {k: np.flip(v, 2) for k, v in out.items()}
    return out, (lr[0] <= 0.5, ud[1] <= 0.5)


@pytest.mark.parametrize("shape", [(3, 8, 10), (2, 7, 9), (3, 6, 5)])
def test_halving_equals_interpolate_as_the_original(shape):
    # the original resized to size=(D, H//2, W//2): trilinear (align_corners=False) image, nearest label
    rng = np.random.RandomState(1)
    image = rng.rand(*shape).astype(np.float32)
    label = rng.randint(0, 14, size=shape).astype(np.int8)
    size = (shape[0], shape[1] // 2, shape[2] // 2)
    ref_img = F.interpolate(torch.from_numpy(image)[None, None], size=size, mode="trilinear",
                            align_corners=False)[0, 0].numpy()
    ref_lab = F.interpolate(torch.from_numpy(label.astype(np.float32))[None, None], size=size,
                            mode="nearest")[0, 0].numpy()
    np.testing.assert_allclose(halve_inplane_image(image), ref_img, rtol=0, atol=1e-6)
    out_lab = halve_inplane_label(label)
    assert out_lab.dtype == np.int8 and out_lab.shape == size
    np.testing.assert_array_equal(out_lab, ref_lab.astype(np.int8))


def test_halving_even_is_scale_half_and_block_mean():
    image = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    ref = F.interpolate(torch.from_numpy(image)[None, None], scale_factor=(1, 0.5, 0.5), mode="trilinear",
                        align_corners=False)[0, 0].numpy()
    out = halve_inplane_image(image)
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert out[0, 0, 0] == pytest.approx((0 + 1 + 4 + 5) / 4)  # mean of the first 2x2 block


def test_random_offsets_bounds_cover_exclusive_range_and_rng_pattern():
    shape, patch = (10, 12, 9), (6, 8, 4)
    np.random.seed(0)
    draws = np.array([random_crop_offsets(shape, patch) for _ in range(600)])
    for axis, (s, p) in enumerate(zip(shape, patch)):
        # randint(0, S-P): every offset in 0..S-P-1 occurs, the flush-right S-P never (Q22)
        assert set(draws[:, axis].tolist()) == set(range(s - p))
    np.random.seed(5)
    expected = tuple(np.random.randint(0, s - p) for s, p in zip(shape, patch))
    np.random.seed(5)
    assert random_crop_offsets(shape, patch) == expected


@pytest.mark.parametrize("diff,offset", [(5, 2), (7, 4), (3, 2), (4, 2), (1, 0), (0, 0)])
def test_center_crop_banker_rounding(diff, offset):
    # int(round((S-P)/2)): round(2.5)=2, round(3.5)=4, round(1.5)=2, round(0.5)=0 (Q23)
    patch = (4, 4, 4)
    shape = (4 + diff, 4 + diff, 4 + diff)
    assert center_crop_offsets(shape, patch) == (offset,) * 3
    sample = _sample(shape)
    out = CenterCrop(patch)(sample)
    o = offset
    np.testing.assert_array_equal(out["image"], sample["image"][o:o + 4, o:o + 4, o:o + 4])
    np.testing.assert_array_equal(out["label"], sample["label"][o:o + 4, o:o + 4, o:o + 4])


def test_random_crop_same_window_for_image_and_label():
    sample = _sample((9, 11, 13))
    np.random.seed(3)
    d0, h0, w0 = np.random.randint(0, 5), np.random.randint(0, 5), np.random.randint(0, 5)
    np.random.seed(3)
    out = RandomCrop((4, 6, 8))(sample)
    np.testing.assert_array_equal(out["image"], sample["image"][d0:d0 + 4, h0:h0 + 6, w0:w0 + 8])
    np.testing.assert_array_equal(out["label"], sample["label"][d0:d0 + 4, h0:h0 + 6, w0:w0 + 8])


def test_flips_act_on_axes_1_and_2_with_the_original_draw_pattern():
    sample = _sample((2, 3, 4))
    seen = set()
    for seed in range(40):
        np.random.seed(seed)
        lr, ud = (np.random.uniform(0, 1), np.random.uniform(0, 1)), (np.random.uniform(0, 1),
                                                                       np.random.uniform(0, 1))
        expected = sample["image"]
        if lr[0] <= 0.5:  # RandomFlip_LR uses the first of its two draws, flips axis 1 (y)
            expected = np.flip(expected, 1)
        if ud[1] <= 0.5:  # RandomFlip_UD uses the second of its two draws, flips axis 2 (x)
            expected = np.flip(expected, 2)
        np.random.seed(seed)
        out = RandomFlip(axis=2, draw=1)(RandomFlip(axis=1, draw=0)(sample))
        np.testing.assert_array_equal(out["image"], expected)
        np.testing.assert_array_equal(out["label"], (out["image"] % 7).astype(np.uint8))  # flipped together
        seen.add((lr[0] <= 0.5, ud[1] <= 0.5))
    assert seen == {(False, False), (False, True), (True, False), (True, True)}


def test_train_transform_matches_original_pipeline_and_returns_tensors():
    sample, patch = _sample((9, 12, 14)), (4, 5, 6)
    transform = make_train_transform(get_task("phantom"), patch)
    flips = set()
    for seed in range(30):
        ref, flipped = _original_train(sample, patch, seed)
        flips.add(flipped)
        np.random.seed(seed)
        out = transform(sample)
        assert out["image"].dtype == torch.float32 and out["image"].shape == (1, *patch)
        assert out["label"].dtype == torch.int64 and out["label"].shape == patch
        np.testing.assert_array_equal(out["image"][0].numpy(), ref["image"])
        np.testing.assert_array_equal(out["label"].numpy(), ref["label"])
        assert np.random.uniform() == _next_after_original(seed, sample, patch)  # same number of draws
    assert len(flips) == 4


def _next_after_original(seed, sample, patch):
    _original_train(sample, patch, seed)
    return np.random.uniform()


def test_flip_false_never_flips_and_draws_only_offsets():
    sample, patch = _sample((8, 9, 10)), (4, 4, 4)
    transform = make_train_transform(get_task("phantom"), patch, flip=False)
    for seed in range(30):
        np.random.seed(seed)
        d0, h0, w0 = np.random.randint(0, 4), np.random.randint(0, 5), np.random.randint(0, 6)
        after = np.random.uniform()
        np.random.seed(seed)
        out = transform(sample)
        np.testing.assert_array_equal(out["image"][0].numpy(), sample["image"][d0:d0 + 4, h0:h0 + 4, w0:w0 + 4])
        assert np.random.uniform() == after


def test_small_volumes_are_padded_to_the_patch_and_keep_all_data():
    # D 5 <= 8 -> pad (1, 2); H 10 > 8 -> random crop; W 16 == 16 -> kept, offset 0; the original crashed here
    sample, patch = _sample((5, 10, 16)), (8, 8, 16)
    np.random.seed(2)
    h0 = np.random.randint(0, 2)  # only the H axis draws
    np.random.seed(2)
    out = RandomCrop(patch)(sample)
    assert out["image"].shape == out["label"].shape == patch
    np.testing.assert_array_equal(out["image"][1:6], sample["image"][:, h0:h0 + 8, :])
    np.testing.assert_array_equal(out["label"][1:6], sample["label"][:, h0:h0 + 8, :])
    assert not out["image"][[0, 6, 7]].any() and not out["label"][[0, 6, 7]].any()

    center = make_eval_transform(get_task("amos"), (8, 8, 20))(sample)  # W 16 -> pad (2, 2)
    img = center["image"][0].numpy()
    assert img.shape == (8, 8, 20)
    np.testing.assert_array_equal(img[1:6, :, 2:18], sample["image"][:, 1:9, :])  # H offset round(1.0) = 1
    assert img[:, :, :2].sum() == 0 and img[:, :, 18:].sum() == 0


def test_crop_or_pad_exact_patch_and_tensor_keys():
    a = np.ones((2, 3, 4), dtype=np.float32)
    out = crop_or_pad(a, (0, 0, 0), (4, 3, 5))
    assert out.shape == (4, 3, 5) and out.sum() == 24  # all 24 voxels kept, 0-padded around
    assert out[1:3, :, 0:4].all()
    with pytest.raises(ValueError, match="unexpected sample key 'weight'"):
        ToTensor()({"image": a, "weight": a})
    with pytest.raises(ValueError, match="patch_size"):
        RandomCrop((4, 4))
