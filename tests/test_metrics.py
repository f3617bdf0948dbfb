"""utils.metrics against medpy 0.5.2 (Q7) and the paper's empty-class conventions (Q45, Q46;
docs/original-quirks.md)."""
import numpy as np
import pytest
from medpy.metric import binary as medpy
from scipy import ndimage

from utils import metrics


def _blob(rng, shape, fill):
    """Smooth random blob(s) covering about `fill` of the array (often touching the border)."""
    field = ndimage.gaussian_filter(rng.random(shape), rng.uniform(0.5, 2.5))
    return field > np.quantile(field, 1 - fill)


def _pairs(seed, n):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        shape = tuple(int(s) for s in rng.integers(2, 24, size=rng.choice([2, 3])))
        yield rng, shape, _blob(rng, shape, rng.uniform(0.01, 0.6)), _blob(rng, shape, rng.uniform(0.01, 0.6))


def _original_case(pred, gt, num_cls):
    """evaluate_Ntimes.py's per-class loop with medpy (docs/pipeline.md#evaluation)."""
    out = np.zeros((num_cls - 1, 2))
    for i in range(1, num_cls):
        p, g = pred == i, gt == i
        if p.sum() > 0 and g.sum() > 0:
            out[i - 1] = medpy.dc(p, g) * 100, medpy.asd(p, g)
        elif p.sum() > 0 or g.sum() > 0:
            out[i - 1] = 0, 128
        else:
            out[i - 1] = 1, 0
    return out


def test_dice_asd_equal_medpy_on_random_blobs():
    for rng, shape, p, g in _pairs(0, 120):
        if not (p.any() and g.any()):
            continue
        spacing = tuple(rng.uniform(0.3, 4.0, len(shape)))
        assert metrics.dice(p, g) == medpy.dc(p, g)
        assert metrics.asd(p, g) == medpy.asd(p, g)
        assert metrics.asd(p, g, voxelspacing=spacing) == medpy.asd(p, g, voxelspacing=spacing)
        assert metrics.assd(p, g, voxelspacing=spacing) == medpy.assd(p, g, voxelspacing=spacing)


@pytest.mark.parametrize("case", ["interior", "border", "single_voxels", "corner_vs_far", "scalar_spacing",
                                  "connectivity2", "int_labels"])
def test_edge_cases_equal_medpy(case):
    p, g = np.zeros((9, 10, 11), bool), np.zeros((9, 10, 11), bool)
    kw = {}
    if case == "interior":       # crop strictly inside the volume
        p[3:6, 3:7, 4:8], g[4:7, 2:6, 4:9] = True, True
    elif case == "border":       # erosion at the volume border (medpy: outside = background)
        p[:, :, :5], g[:, 2:, :] = True, True
    elif case == "single_voxels":
        p[4, 5, 6], g[4, 5, 9] = True, True
    elif case == "corner_vs_far":
        p[0, 0, 0], g[8, 9, 5:] = True, True
    elif case == "scalar_spacing":
        p[1:8, 2:4, 3:9], g[2:5, 1:9, 3:4] = True, True
        kw = {"voxelspacing": 2.5}
    elif case == "connectivity2":
        p[1:8, 2:6, 3:9], g[2:5, 1:9, 3:7] = True, True
        kw = {"connectivity": 2}
    else:                        # any dtype, nonzero = object
        p, g = np.zeros((9, 10, 11), np.int16), np.zeros((9, 10, 11), np.float32)
        p[1:4, 1:4, 1:4], g[2:6, 2:5, 1:3] = 3, 1.0
    assert metrics.asd(p, g, **kw) == medpy.asd(p, g, **kw)
    assert metrics.assd(p, g, **kw) == medpy.assd(p, g, **kw)
    assert metrics.dice(p, g) == medpy.dc(p, g)


def test_hand_values():
    # 1-D: pred {0,1}, gt {3}: pred surface {0,1}, distances 3 and 2 -> ASD 2.5; with spacing 2 -> 5
    p, g = np.array([1, 1, 0, 0, 0], bool), np.array([0, 0, 0, 1, 0], bool)
    assert metrics.asd(p, g) == 2.5 and metrics.asd(p, g, voxelspacing=2) == 5.0
    assert metrics.assd(p, g) == (3 + 2 + 2) / 3  # gt's one voxel is 2 from pred's nearest
    assert metrics.assd_mm(p, g, (2.0,)) == 2 * (3 + 2 + 2) / 3
    assert metrics.dice(p, g) == 0.0


def test_empty_inputs():
    z, one = np.zeros((3, 3), bool), np.eye(3, dtype=bool)
    # medpy's intent is 1.0 (its ZeroDivisionError guard); on numpy 2 it returns NaN with a warning instead.
    assert metrics.dice(z, z) == 1.0
    assert metrics.dice(z, z, both_empty=np.nan) != metrics.dice(z, z, both_empty=np.nan)
    assert metrics.dice(one, z) == 0.0
    with pytest.raises(ValueError, match="pred mask is empty"):
        metrics.asd(z, one)
    with pytest.raises(ValueError, match="gt mask is empty"):
        metrics.asd(one, z)


def test_case_metrics_conventions():
    pred, gt = np.zeros((6, 6, 6), np.uint8), np.zeros((6, 6, 6), np.uint8)
    pred[0:2, 0:2, 0:2] = gt[0:2, 0:2, 0:2] = 1   # class 1 identical -> (100, 0)
    pred[4:6, 4:6, 4:6] = 2                       # class 2 predicted only -> (0, 128)   (Q46)
    gt[3, 3, 0:3] = 3                             # class 3 in GT only   -> (0, 128)
    # class 4 absent from both -> (1, 0) (Q45: 1, not 100)
    expected = [[100, 0], [0, 128], [0, 128], [1, 0]]
    np.testing.assert_array_equal(metrics.case_metrics(pred, gt, 5), expected)
    np.testing.assert_array_equal(metrics.case_metrics(pred, gt, 5, both_empty="100")[3], [100, 0])
    assert np.isnan(metrics.case_metrics(pred, gt, 5, both_empty="exclude")[3]).all()
    np.testing.assert_array_equal(metrics.case_metrics(pred, gt, 5), _original_case(pred, gt, 5))
    with pytest.raises(ValueError, match="both_empty"):
        metrics.case_metrics(pred, gt, 5, both_empty="nan")


def test_case_metrics_equal_original_loop_on_random_label_maps():
    rng = np.random.default_rng(1)
    for _ in range(6):
        shape = (12, 20, 18)
        gt = np.zeros(shape, np.uint8)
        for c in range(1, 6):
            gt[_blob(rng, shape, rng.uniform(0.01, 0.15))] = c
        noisy = ndimage.gaussian_filter(rng.random(shape), 1.0) > 0.52
        pred = np.where(noisy, np.roll(gt, 1, axis=2), gt).astype(np.uint8)
        pred[pred == rng.integers(1, 6)] = 0     # drop one class from the prediction
        np.testing.assert_array_equal(metrics.case_metrics(pred, gt, 7), _original_case(pred, gt, 7))
        spacing = (3.0, 0.8, 0.7)
        stats = metrics.class_stats(pred, gt, 7, spacing_mm=spacing)
        for c in range(1, 7):
            p, g = pred == c, gt == c
            assert stats[c - 1, metrics.N_PRED] == p.sum() and stats[c - 1, metrics.N_GT] == g.sum()
            if p.any() and g.any():
                assert stats[c - 1, metrics.ASSD_MM] == medpy.assd(p, g, voxelspacing=spacing)
            else:
                assert np.isnan(stats[c - 1, metrics.ASSD_MM])


def test_standard_values():
    stats = np.array([[8, 8, 0.5, 1.0, 2.0],            # both present
                      [0, 5, 0.0, np.nan, np.nan],      # one-sided: Dice 0, ASSD undefined
                      [0, 0, np.nan, np.nan, np.nan]])  # both empty: excluded
    out = metrics.standard_values(stats)
    np.testing.assert_array_equal(out[0], [50, 2.0])
    assert out[1, 0] == 0 and np.isnan(out[1, 1]) and np.isnan(out[2]).all()


def test_class_stats_rejects_float_labels():
    with pytest.raises(TypeError):
        metrics.class_stats(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32), 3)
