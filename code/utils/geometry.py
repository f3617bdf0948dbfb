"""Do a label and its image lie on the same voxel grid? (docs/pipeline.md#preprocessing, #evaluation)

A NIfTI header places the array in space (size, spacing, origin, direction); an image and a label that are compared
voxel by voxel must have the same grid, or training pairs and evaluation masks do not overlay. Tolerance: spacing
within 0.01 %, direction cosines within 1e-4, origin within 1 % of the smallest voxel side, so two grids that pass
lie within 0.1 voxel of each other across 1000 voxels (header values are float32: rounding is far below this).

A label stored in another orientation (the same physical voxels, its array flipped or its axes permuted by its
direction matrix and origin) is re-indexed onto the image grid, voxel for voxel (no interpolation); anything else
that differs is a DataError naming both files.
"""
import dataclasses

import numpy as np

from utils.io import DataError

SPACING_RTOL = 1e-4    # relative
DIRECTION_ATOL = 1e-4  # per direction-matrix entry (cosines)
ORIGIN_VOXELS = 1e-2   # fraction of the smallest voxel side
TOLERANCE = "spacing 0.01 %, direction 1e-4, origin 0.01 voxel"


@dataclasses.dataclass(frozen=True)
class Grid:
    """SimpleITK order: size and spacing (x, y, z), origin in mm, direction row-major 3x3 (columns = axes)."""
    size: tuple
    spacing: tuple
    origin: tuple
    direction: tuple

    @classmethod
    def of_image(cls, itk):
        return cls(tuple(int(v) for v in itk.GetSize()), tuple(map(float, itk.GetSpacing())),
                   tuple(map(float, itk.GetOrigin())), tuple(map(float, itk.GetDirection())))

    @classmethod
    def of_meta(cls, meta):
        """From a ``<id>_meta.json`` (the source image's geometry; ``source_shape`` is (D, H, W))."""
        shape = meta.get("source_shape") or meta["shape"]
        grid = cls(tuple(int(v) for v in reversed(shape)), tuple(map(float, meta["spacing"])),
                   tuple(map(float, meta["origin"])), tuple(map(float, meta["direction"])))
        if tuple(map(len, (grid.size, grid.spacing, grid.origin, grid.direction))) != (3, 3, 3, 9):
            raise ValueError("expected 3 sizes, 3 spacings, 3 origin and 9 direction values")
        return grid

    def matrix(self):
        """index (x, y, z) -> physical point: ``origin + matrix @ index``."""
        return np.asarray(self.direction, float).reshape(3, 3) * np.asarray(self.spacing, float)


def _fmt(values):
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def grid_difference(label, image):
    """None if the grids agree within the tolerance, else the first field that differs, in words."""
    if label.size != image.size:
        return f"size {_fmt(label.size)} vs {_fmt(image.size)}"
    s_l, s_i = np.asarray(label.spacing), np.asarray(image.spacing)
    if (np.abs(s_l - s_i) > SPACING_RTOL * s_i).any():
        return f"spacing {_fmt(label.spacing)} vs {_fmt(image.spacing)} mm"
    if (np.abs(np.subtract(label.direction, image.direction)) > DIRECTION_ATOL).any():
        return f"direction {_fmt(label.direction)} vs {_fmt(image.direction)}"
    if (np.abs(np.subtract(label.origin, image.origin)) > ORIGIN_VOXELS * s_i.min()).any():
        return f"origin {_fmt(label.origin)} vs {_fmt(image.origin)} mm"
    return None


def reindexing(label, image):
    """How the label grid re-indexes the image grid, or None if it does not cover the same voxels.

    Image index i maps to label index j = M i + b (M = label.matrix()^-1 image.matrix()); the grids hold the same
    voxels when M is a signed permutation, b integer and each image axis runs over the whole label axis it maps
    to. Returns (axes, flips): label axis ``axes[k]`` runs along image axis k, reversed where ``flips[k]``."""
    inv = np.linalg.inv(label.matrix())
    m = inv @ image.matrix()
    b = inv @ (np.asarray(image.origin) - np.asarray(label.origin))
    perm = np.rint(m)
    if (np.abs(m - perm) > SPACING_RTOL + DIRECTION_ATOL).any() or (np.abs(b - np.rint(b)) > ORIGIN_VOXELS).any():
        return None
    if not ((np.abs(perm).sum(0) == 1).all() and (np.abs(perm).sum(1) == 1).all()):
        return None
    axes, flips = [], []
    for k in range(3):  # image axis k
        j = int(np.flatnonzero(perm[:, k])[0])  # the label axis it runs along
        n = image.size[k]
        flip = perm[j, k] < 0
        if label.size[j] != n or int(np.rint(b[j])) != (n - 1 if flip else 0):
            return None
        axes.append(j)
        flips.append(bool(flip))
    return tuple(axes), tuple(flips)


def align_label(label, label_grid, image_grid, label_path, image_path):
    """(label array (D, H, W) on the image grid, note or None). A label on the image grid is returned as it is; one
    stored in another orientation over the same voxels is re-indexed (the note says so); otherwise DataError."""
    difference = grid_difference(label_grid, image_grid)
    if difference is None:
        return label, None
    how = reindexing(label_grid, image_grid)
    if how is None:
        raise DataError(f"{label_path}: label grid differs from the image's ({image_path}): {difference}; image "
                        f"and label do not overlay (tolerance: {TOLERANCE})")
    axes, flips = how
    xyz = np.transpose(label, (2, 1, 0)).transpose(axes)  # (D, H, W) -> label (x, y, z) -> image axis order
    xyz = xyz[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    return np.ascontiguousarray(np.transpose(xyz, (2, 1, 0))), (
        f"{label_path}: stored in another orientation than the image ({image_path}; same voxels, {difference}); "
        "re-indexed onto the image grid")
