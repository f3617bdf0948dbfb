"""Per-class Dice and surface distances, computed on the bounding box of pred ∪ gt.

See docs/pipeline.md#evaluation; quirks (docs/original-quirks.md) Q7 (medpy-free re-implementation with identical
values), Q45-Q47.

``dice`` and ``asd`` return the values of ``medpy.metric.binary.dc`` / ``.asd``. medpy's surface of a mask is
the mask minus its binary erosion (connectivity-1 cross, voxels outside the array count as background), and
``asd(pred, gt)`` is the mean, over pred's surface voxels, of the Euclidean distance to the nearest surface
voxel of gt (directed pred -> gt). medpy computes erosions and a distance transform on the whole volume; here
they run on the bounding box of pred ∪ gt padded by one background voxel, which is exact: every voxel outside
the box is background, so the padding reproduces the erosion at the box (and volume) border, and every gt
surface voxel lies inside the box, so no nearest surface voxel is lost.

``case_metrics`` evaluates all classes of a label map with the paper's conventions (Q45, Q46):

| pred / gt         | Dice            | ASD (voxels) |
|-------------------|-----------------|--------------|
| both non-empty    | dc * 100        | asd          |
| exactly one empty | 0               | 128          |
| both empty        | 1 (not 100!)    | 0            |

``both_empty`` selects the corrected conventions: ``"100"`` (Dice 100, ASD 0) or ``"exclude"`` (NaN, left
out of every mean).
"""
import numpy as np
from scipy import ndimage

EMPTY_PENALTY_ASD = 128.0                  # Q46: ASD of a class present in only one of pred and gt
BOTH_EMPTY_MODES = ("paper", "100", "exclude")

# Columns of class_stats(): voxel counts, raw Dice in [0, 1], directed ASD (voxels), symmetric ASSD (mm).
N_PRED, N_GT, DICE, ASD_VOX, ASSD_MM = range(5)


def dice(pred, gt, both_empty=1.0):
    """Dice 2|P∩G| / (|P|+|G|) of two masks (any dtype, nonzero = object), in [0, 1].

    Both empty -> ``both_empty``: 1.0 as medpy's ``dc`` intends (Q45); medpy 0.5.2 under numpy 2 returns NaN
    there, because numpy integer counts divide by 0.0 without raising its ZeroDivisionError."""
    pred, gt = _as_bool(pred), _as_bool(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"dice: shapes differ, pred {pred.shape} vs gt {gt.shape}")
    n_p, n_g = np.count_nonzero(pred), np.count_nonzero(gt)
    if n_p + n_g == 0:
        return float(both_empty)
    return _dice_from_counts(np.count_nonzero(pred & gt), n_p, n_g)


def asd(pred, gt, voxelspacing=None, connectivity=1):
    """Directed average surface distance pred -> gt, as ``medpy.metric.binary.asd`` (Q47).

    Distances in voxels, or in the units of ``voxelspacing`` (a number or one value per axis, array order).
    medpy raises RuntimeError when a mask is empty; we raise ValueError naming the empty one."""
    p_surf, g_surf = _cropped_surfaces(pred, gt, connectivity, "asd")
    return float(_distances_to(g_surf, p_surf, _sampling(voxelspacing, p_surf.ndim)).mean())


def assd(pred, gt, voxelspacing=None, connectivity=1):
    """Symmetric average surface distance: mean over both surfaces' distances to the other surface.

    Same value as ``medpy.metric.binary.assd`` 0.5 (concatenated, not the mean of the two directed ASDs)."""
    p_surf, g_surf = _cropped_surfaces(pred, gt, connectivity, "assd")
    return _symmetric(p_surf, g_surf, _sampling(voxelspacing, p_surf.ndim))


def assd_mm(pred, gt, spacing):
    """Symmetric ASSD in mm; ``spacing`` in array (D, H, W) order, e.g. ``sitk_image.GetSpacing()[::-1]``."""
    return assd(pred, gt, voxelspacing=spacing)


def class_stats(pred_labels, gt_labels, num_cls, spacing_mm=None):
    """Raw per-class statistics of two integer label maps, classes 1..num_cls-1 -> float64 [C-1, 5].

    Columns (see N_PRED..ASSD_MM): pred voxels, gt voxels, Dice in [0, 1] (NaN if both empty), directed ASD
    pred -> gt in voxels and symmetric ASSD in mm (NaN unless both non-empty; ASSD also NaN without
    ``spacing_mm``, given in array order). Bounding boxes of all classes come from one pass per map."""
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"class_stats: shapes differ, pred {pred_labels.shape} vs gt {gt_labels.shape}")
    boxes_p = ndimage.find_objects(_as_labels(pred_labels), max_label=num_cls - 1)
    boxes_g = ndimage.find_objects(_as_labels(gt_labels), max_label=num_cls - 1)
    sampling = _sampling(spacing_mm, pred_labels.ndim)
    out = np.full((num_cls - 1, 5), np.nan)
    for c in range(1, num_cls):
        box = _union(boxes_p[c - 1], boxes_g[c - 1])
        if box is None:
            out[c - 1, :2] = 0
            continue
        p, g = pred_labels[box] == c, gt_labels[box] == c
        out[c - 1] = _pair_stats(p, g, sampling)
    return out


def paper_values(stats, both_empty="paper"):
    """[..., 5] class statistics -> [..., 2] (Dice x100, ASD voxels) with the paper's conventions (Q45, Q46)."""
    if both_empty not in BOTH_EMPTY_MODES:
        raise ValueError(f"both_empty must be one of {BOTH_EMPTY_MODES}, got {both_empty!r}")
    n_p, n_g = stats[..., N_PRED], stats[..., N_GT]
    out = np.stack([stats[..., DICE] * 100, stats[..., ASD_VOX]], axis=-1)
    one_sided = (n_p > 0) != (n_g > 0)
    out[one_sided] = (0.0, EMPTY_PENALTY_ASD)
    both = (n_p == 0) & (n_g == 0)
    out[both] = {"paper": (1.0, 0.0), "100": (100.0, 0.0), "exclude": (np.nan, np.nan)}[both_empty]
    return out


def standard_values(stats):
    """[..., 5] -> [..., 2] (Dice x100, symmetric ASSD mm), the usual conventions: both-empty pairs excluded
    (NaN), one-sided empty -> Dice 0 and ASSD NaN (undefined, left out of the ASSD mean)."""
    out = np.stack([stats[..., DICE] * 100, stats[..., ASSD_MM]], axis=-1)
    one_sided = (stats[..., N_PRED] > 0) != (stats[..., N_GT] > 0)
    out[one_sided, 0] = 0.0
    return out


def case_metrics(pred_labels, gt_labels, num_cls, both_empty="paper"):
    """All classes of one case -> [C-1, 2] (Dice x100, ASD voxels) exactly as evaluate_Ntimes.py
    (docs/pipeline.md#evaluation)."""
    return paper_values(class_stats(pred_labels, gt_labels, num_cls), both_empty)


# ---------------------------------------------------------------------------------------------- internals

def _pair_stats(p, g, sampling):
    """One class cropped to its box: [n_pred, n_gt, dice, asd_vox, assd_mm]."""
    n_p, n_g = np.count_nonzero(p), np.count_nonzero(g)
    row = [n_p, n_g, _dice_from_counts(np.count_nonzero(p & g), n_p, n_g), np.nan, np.nan]
    if n_p and n_g:
        p_surf, g_surf = _surface(_pad(p)), _surface(_pad(g))
        row[ASD_VOX] = _distances_to(g_surf, p_surf, None).mean()
        if sampling is not None:
            row[ASSD_MM] = _symmetric(p_surf, g_surf, sampling)
    return row


def _cropped_surfaces(pred, gt, connectivity, name):
    """Surfaces of both masks on the bounding box of pred ∪ gt padded by one background voxel."""
    pred, gt = _as_bool(pred), _as_bool(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"{name}: shapes differ, pred {pred.shape} vs gt {gt.shape}")
    for which, mask in (("pred", pred), ("gt", gt)):
        if not mask.any():
            raise ValueError(f"{name}: {which} mask is empty (surface distance undefined)")
    box = _bbox(pred | gt)
    return _surface(_pad(pred[box]), connectivity), _surface(_pad(gt[box]), connectivity)


def _dice_from_counts(inter, n_p, n_g):
    # Same float expression as medpy's dc (2.0 * intersection / float(size_i1 + size_i2)).
    return 2.0 * int(inter) / float(int(n_p) + int(n_g)) if n_p + n_g else np.nan


def _surface(mask, connectivity=1):
    """Border voxels of a mask padded with background: mask minus its erosion (medpy's definition)."""
    if connectivity == 1:
        inner = (slice(1, -1),) * mask.ndim
        eroded = mask[inner].copy()
        for axis in range(mask.ndim):  # a voxel survives if both face neighbours along every axis are set
            for shift in (slice(None, -2), slice(2, None)):
                eroded &= mask[inner[:axis] + (shift,) + inner[axis + 1:]]
        surface = np.zeros_like(mask)
        surface[inner] = mask[inner] & ~eroded
        return surface
    footprint = ndimage.generate_binary_structure(mask.ndim, connectivity)
    return mask ^ ndimage.binary_erosion(mask, structure=footprint, iterations=1)


def _distances_to(target_surf, source_surf, sampling):
    """Distance from each source surface voxel (C order) to the nearest target surface voxel."""
    return ndimage.distance_transform_edt(~target_surf, sampling=sampling)[source_surf]


def _symmetric(p_surf, g_surf, sampling):
    both = np.concatenate([_distances_to(g_surf, p_surf, sampling), _distances_to(p_surf, g_surf, sampling)])
    return float(both.mean())


def _as_bool(mask):
    return np.atleast_1d(np.asarray(mask).astype(bool, copy=False))


def _as_labels(labels):
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"label maps must be integer arrays, got {labels.dtype}")
    return labels


def _sampling(spacing, ndim):
    if spacing is None:
        return None
    spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (ndim,))
    return np.ascontiguousarray(spacing)


def _pad(mask):
    return np.pad(mask, 1, mode="constant", constant_values=False)


def _bbox(mask):
    """Slices of the bounding box of a boolean mask, or None if it is empty (one pass, in C)."""
    boxes = ndimage.find_objects(mask.view(np.uint8) if mask.dtype == bool else mask.astype(np.uint8))
    return boxes[0] if boxes else None


def _union(a, b):
    if a is None or b is None:
        return a if b is None else b
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))
