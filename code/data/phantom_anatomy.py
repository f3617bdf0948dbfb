"""Anatomy of the synthetic abdominal CT phantom (described in the README, 'The built-in phantom'): ``make_case``
builds one case.

Each case imitates portal-venous contrast CT of the abdomen. Organs are analytic shapes (ellipsoids, tubes
along polylines, per-slice ellipses) in millimetres of a reference patient, evaluated only inside their
bounding boxes and painted in anatomical order; the image is then smoothed (partial volume), given a slow
inhomogeneity and an offset, noised (sigma 10-25 HU) and rounded to int16 HU. Labels are uint8.

Orientation, the same for every case (NIfTI direction = identity in ITK's LPS frame):
  arrays (D, H, W) = (z, y, x);
  z: slice 0 is the most inferior one (feet -> head with increasing index; the origin is the lowest slice);
  y: row 0 is anterior (anterior -> posterior);
  x: column 0 is the patient's right (radiological view: patient right on the image's left).
Geometry: 192 x 192 pixels over a 370-420 mm field of view (1.9-2.2 mm: a 512^2 scan at 0.7-0.8 mm seen at
192^2), 48-64 slices of about 4-6.5 mm (AMOS cases reaching the pelvis: 60-72 slices of 7-11 mm), so organs
are anisotropic in voxels as on real scans.
Labels: Synapse order (13 organs, ``config.SYNAPSE_ORGANS``); with ``layout="amos"`` the 15 AMOS classes
(``config.AMOS_ORGANS``): cases whose number is a multiple of 3 stop above the pelvis (no bladder, no
prostate/uterus) and about one in five has no gallbladder.
Determinism: one numpy Generator seeded with (seed, case number, layout) draws everything, so a case is
byte-identical across runs and differs between cases, seeds and layouts.
"""
import numpy as np
from scipy import ndimage

from utils.io import ConfigError
from utils.task import get_task

LAYOUTS = ("synapse", "amos")
_VERSION = 3               # bump when the anatomy changes, so old folders are not taken as current
_ADRENAL_HALF_MM = 3.75    # half-thickness of an adrenal limb (7.5 mm limbs; version 2: 2.75)
_ADRENAL_FAT_MM = 5.0      # periadrenal fat all round each limb (version 2: only where nothing else lay)
_ESOPHAGUS_FAT_MM = 6.0    # periesophageal fat sleeve (version 2: 4 mm)
_A, _B = 170.0, 120.0      # reference body semi-axes (mm, left-right / antero-posterior)


# ----------------------------------------------------------------------------------------------- geometry
class _Canvas:
    """HU and label volumes of one case plus the voxel <-> reference-patient mapping.

    Reference coordinates (mm): x right -> left, y anterior -> posterior (body centre 0, 0), t head -> feet
    below the right diaphragm dome. The case's body size, rotation and position map them to voxels."""

    def __init__(self, geo, ids):
        d, h, w = geo["shape"]
        sx, sy, sz = geo["spacing"]
        self.geo, self.ids = geo, ids
        self.hu = np.full((d, h, w), -1000.0, np.float32)
        self.label = np.zeros((d, h, w), np.uint8)
        self.t = (geo["t_top"] + (d - 1 - np.arange(d)) * sz / geo["gz"]).astype(np.float32)
        xs = (np.arange(w) - (w - 1) / 2) * sx - geo["bx"]
        ys = (np.arange(h) - (h - 1) / 2) * sy - geo["by"]
        c, s = np.cos(geo["theta"]), np.sin(geo["theta"])
        self.x = ((c * xs[None, :] + s * ys[:, None]) / geo["gx"]).astype(np.float32)
        self.y = ((-s * xs[None, :] + c * ys[:, None]) / geo["gy"]).astype(np.float32)
        self.cavity = _superellipse(self.x, self.y, _A - geo["fat"] - 10, _B - geo["fat"] - 10)

    def box(self, xr, yr, tr):
        """Voxel slices covering the reference box xr x yr x tr (each (lo, hi)), or None if outside."""
        zi = np.nonzero((self.t >= tr[0]) & (self.t <= tr[1]))[0]
        g = self.geo
        c, s = np.cos(g["theta"]), np.sin(g["theta"])
        px = np.array([xr[0], xr[1], xr[0], xr[1]]) * g["gx"]
        py = np.array([yr[0], yr[0], yr[1], yr[1]]) * g["gy"]
        d, h, w = g["shape"]
        col = (c * px - s * py + g["bx"]) / g["spacing"][0] + (w - 1) / 2
        row = (s * px + c * py + g["by"]) / g["spacing"][1] + (h - 1) / 2
        i0, i1 = max(int(col.min()) - 1, 0), min(int(col.max()) + 2, w)
        j0, j1 = max(int(row.min()) - 1, 0), min(int(row.max()) + 2, h)
        if not zi.size or i0 >= i1 or j0 >= j1:
            return None
        return slice(zi[0], zi[-1] + 1), slice(j0, j1), slice(i0, i1)

    def coords(self, box):
        """(t (n,1,1), x (1,h,w), y (1,h,w), cavity (1,h,w)) of a box, broadcastable."""
        return (self.t[box[0]][:, None, None], self.x[box[1:]][None], self.y[box[1:]][None],
                self.cavity[box[1:]][None])

    def paint(self, box, mask, hu, name=None):
        """Set HU (scalar or array) where mask; also the label of organ ``name`` (0 if not a class here)."""
        region = self.hu[box]
        mask = np.broadcast_to(mask, region.shape)
        region[mask] = hu if np.isscalar(hu) else np.broadcast_to(hu, region.shape)[mask]
        if name is not None:
            self.label[box][mask] = self.ids.get(name, 0)


def _superellipse(x, y, a, b):
    """Inside of the body outline: an ellipse whose posterior half is flattened (patient lying supine)."""
    p = np.where(y > 0, 3.0, 2.0)
    return np.abs(x / a) ** p + np.abs(y / b) ** p <= 1.0


def _ellipsoid(t, x, y, c, semi, angle=0.0):
    """Squared normalised radius (<= 1 inside) of an ellipsoid turned by ``angle`` degrees in-plane."""
    ca, sa = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    dx, dy = x - c[0], y - c[1]
    u, v, w = (ca * dx + sa * dy) / semi[0], (-sa * dx + ca * dy) / semi[1], (t - c[2]) / semi[2]
    return u * u + v * v + w * w


def _ztube(t, x, y, tk, cx, cy, rx, ry):
    """Squared normalised radius of a tube along t: per slice an ellipse interpolated between knots tk."""
    f = [np.interp(t, tk, v).astype(np.float32) for v in (cx, cy)]
    r = [np.maximum(np.interp(t, tk, v, left=0.0, right=0.0), 1e-3).astype(np.float32) for v in (rx, ry)]
    return ((x - f[0]) / r[0]) ** 2 + ((y - f[1]) / r[1]) ** 2


def _capsules(t, x, y, pts, radii):
    """Squared (distance / radius) to a polyline of (x, y, t) points; the radius varies along each segment."""
    best = None
    for p0, p1, r0, r1 in zip(pts[:-1], pts[1:], radii[:-1], radii[1:]):
        d = p1 - p0
        s = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (t - p0[2]) * d[2]) / (d @ d), 0.0, 1.0)
        dist2 = (x - p0[0] - s * d[0]) ** 2 + (y - p0[1] - s * d[1]) ** 2 + (t - p0[2] - s * d[2]) ** 2
        q = dist2 / (r0 + s * (r1 - r0)) ** 2
        best = q if best is None else np.minimum(best, q)
    return best


def _capsule_box(cv, pts, radii):
    r = max(radii)
    lo, hi = pts.min(0) - r, pts.max(0) + r
    return cv.box((lo[0], hi[0]), (lo[1], hi[1]), (lo[2], hi[2]))


def _wobble(rng, amp, wavelength=(40.0, 90.0)):
    """Smooth random shape perturbation: sum of three plane waves, about +-amp."""
    k = rng.normal(size=(3, 3))
    k *= (2 * np.pi / rng.uniform(*wavelength, size=3) / np.linalg.norm(k, axis=1))[:, None]
    phase = rng.uniform(0, 2 * np.pi, 3)
    return lambda t, x, y: sum(amp / 2 * np.sin(k[i, 0] * x + k[i, 1] * y + k[i, 2] * t + phase[i])
                               for i in range(3))


def _t_diaphragm(x, y):
    """Reference t of the diaphragm: two domes (the left 15 mm lower), deepest in the posterior recesses."""
    k = np.where(y > 10, 1 / 120.0, 1 / 300.0)
    yy = (y - 10) ** 2
    return np.minimum(((x + 60) ** 2 + yy) * k, 15.0 + ((x - 60) ** 2 + yy) * k)


def _jit(rng, xy=4.0, t=6.0):
    """Per-organ position jitter (x, y, t) in mm."""
    return np.array([rng.normal(0, xy), rng.normal(0, xy), rng.normal(0, t)])


# ------------------------------------------------------------------------------------------------ anatomy
def _paint_body(cv, rng, hu):
    """Air, subcutaneous fat, muscle wall, then the cavity: bowel/soft tissue mixed with fat, gas pockets."""
    g = cv.geo
    body = _superellipse(cv.x, cv.y, _A, _B)
    wall = _superellipse(cv.x, cv.y, _A - g["fat"], _B - g["fat"])
    cv.hu[:, body] = hu["fat"]
    cv.hu[:, wall] = hu["muscle"]
    field = _smooth_field(rng, g["shape"], g["spacing"][::-1], 22.0)
    soft = field > g["fat_level"]
    tex = np.where(soft, np.float32(hu["soft"]), np.float32(hu["fat"]))
    tex[field > 1.9] = -900.0  # gas in the middle of bowel loops
    cv.hu[:, cv.cavity] = tex[:, cv.cavity]
    thorax = cv.cavity[None] & (cv.t[:, None, None] < _t_diaphragm(cv.x, cv.y)[None])
    cv.hu[thorax] = hu["lung"]
    heart = ((cv.x - 20) / 80) ** 2 + ((cv.y + 45) / 55) ** 2 <= 1
    mediastinum = (cv.x / 45) ** 2 + ((cv.y - 15) / 45) ** 2 <= 1
    cv.hu[thorax & mediastinum[None]] = hu["fat"]
    cv.hu[thorax & heart[None]] = hu["heart"]


def _smooth_field(rng, shape, spacing_zyx, cell_mm):
    """Unit-variance random field with correlation length ~cell_mm.

    White noise on a coarse lattice, spread to the grid by separable Gaussian weights (three small matrix
    products: ~10x faster than ndimage.zoom and without its piecewise-linear contours)."""
    coarse = [max(2, int(np.ceil(n * s / cell_mm)) + 1) for n, s in zip(shape, spacing_zyx)]
    field = rng.standard_normal(coarse).astype(np.float32)
    weights = []
    for n, c in zip(shape, coarse):
        w = np.exp(-0.5 * ((np.linspace(0, c - 1, n)[:, None] - np.arange(c)[None]) / 0.6) ** 2)
        weights.append((w / w.sum(1, keepdims=True)).astype(np.float32))
    field = np.tensordot(weights[0], weights[1] @ (field @ weights[2].T), axes=(1, 0))
    sub = field[::2, ::4, ::4]  # statistics from a subsample: a full-volume std costs more than the field
    return (field - sub.mean()) / max(float(sub.std()), 1e-6)


def _paint_spine(cv, rng, hu):
    """Paraspinal and psoas muscles, vertebral bodies with discs, canal, posterior arches; ribs."""
    box = cv.box((-175, 175), (-10, 125), (-200, 700))
    t, x, y, cav = cv.coords(box)
    vy = np.interp(t, [-100, 0, 250, 400, 600], [44, 42, 32, 40, 60]).astype(np.float32)  # lordosis, sacrum
    for side in (-1, 1):
        cv.paint(box, ((x - side * 38) / 26) ** 2 + ((y - vy - 46) / 20) ** 2 <= 1, hu["muscle"])
        r_psoas = np.interp(t, [110, 300, 420], [0, 24, 26], left=0, right=0) + 1e-3
        cv.paint(box, ((x - side * (25 + r_psoas / 2)) ** 2 + (y - vy + 2) ** 2) <= r_psoas ** 2, hu["muscle"])
    vertebra = ((t + cv.geo["disc_phase"]) % 32.0) >= 7.0
    r = np.interp(t, [-100, 250], [17, 22]).astype(np.float32)
    q = (x ** 2 + (y - vy) ** 2) / r ** 2
    cv.paint(box, q <= 1, np.where(vertebra & (q > 0.7), hu["cortex"], np.where(vertebra, hu["bone"], 90.0)))
    cy = vy + r + 10
    ring = x ** 2 + (y - cy) ** 2
    arch = (ring <= 14 ** 2) & (y > cy - 3)
    arch |= (np.abs(x) < 4) & (y > cy) & (y < cy + 32)
    arch |= (np.abs(x) < 40) & (np.abs(y - cy + 4) < 4) & (t < 300)
    cv.paint(box, arch & vertebra, hu["cortex"])
    cv.paint(box, ring <= 9 ** 2, hu["csf"])
    phi = np.arctan2(y, x)
    band = ~_superellipse(x, y, _A - cv.geo["fat"] - 12, _B - cv.geo["fat"] - 12) & cav
    rib = band & (((t + 25 * phi + cv.geo["rib_phase"]) % 26.0) < 8.0) & (t < 170) & (y > -70)
    cv.paint(box, rib, hu["cortex"])


def _paint_liver(cv, rng, hu):
    j, s = _jit(rng), rng.uniform(0.93, 1.07)
    box = cv.box((-175, 110), (-125, 110), (-20, 190))
    t, x, y, cav = cv.coords(box)
    wob = _wobble(rng, 0.15)(t, x, y)
    q = np.minimum(_ellipsoid(t, x, y, np.array([-62, 5, 78]) + j, np.array([82, 78, 82]) * s),
                   _ellipsoid(t, x, y, np.array([18, -58, 52]) + j, np.array([68, 34, 42]) * s))
    keep = cav & (t > _t_diaphragm(x, y) + 4) & (((x - 15) / 55) ** 2 + ((y - 50) / 55) ** 2 > 1)
    cv.paint(box, (q <= 1 + wob) & keep, hu["liver"], "liver")


def _paint_spleen(cv, rng, hu):
    c, s = np.array([108, 42, 68]) + _jit(rng), rng.uniform(0.88, 1.12)
    normal = np.radians(38.0)  # outward normal of the body wall there
    cut = c - 30 * np.array([np.cos(normal), np.sin(normal), 0.0])
    box = cv.box((40, 175), (-30, 120), (0, 140))
    t, x, y, cav = cv.coords(box)
    q = _ellipsoid(t, x, y, c, np.array([28, 55, 55]) * s, 38.0) - _wobble(rng, 0.15)(t, x, y)
    crescent = (q <= 1) & (_ellipsoid(t, x, y, cut, np.array([22, 48, 50]) * s, 38.0) > 1)
    cv.paint(box, crescent & cav & (t > _t_diaphragm(x, y) + 4), hu["spleen"], "spleen")


def _paint_kidneys(cv, rng, hu):
    """Beans in perirenal fat: enhancing cortex, darker medulla, fatty sinus at the anteromedial hilum."""
    for side, name, ct in ((-1, "kidney_r", 158.0), (1, "kidney_l", 140.0)):
        c, s = np.array([side * 68, 56, ct]) + _jit(rng), rng.uniform(0.9, 1.1)
        semi, angle = np.array([30, 22, 55]) * s, side * 50.0  # wide axis towards the hilum
        box = cv.box((c[0] - 60, c[0] + 60), (c[1] - 60, c[1] + 60), (c[2] - 80, c[2] + 80))
        if box is None:
            continue
        t, x, y, cav = cv.coords(box)
        hilum = c + 20 * s * np.array([-side * np.sin(np.radians(50)), -np.cos(np.radians(50)), 0])
        halo = (_ellipsoid(t, x, y, c, semi * 1.35, angle) <= 1) & (cv.label[box] == 0)  # liver stays
        cv.paint(box, halo, hu["fat"], name="bg")
        q = _ellipsoid(t, x, y, c, semi, angle) - _wobble(rng, 0.1)(t, x, y)
        sinus = _ellipsoid(t, x, y, hilum, np.array([12, 12, 25]) * s) <= 1
        cv.paint(box, (q <= 1) & ~sinus, np.where(q > 0.45, hu["kidney"], hu["medulla"]), name)
        cv.paint(box, (q <= 1) & sinus, hu["fat"] + 40.0, name="bg")


def _paint_stomach(cv, rng, hu):
    """J-shaped bag: wall, water, and gas anteriorly (patient supine)."""
    j, s = _jit(rng), rng.uniform(0.8, 1.15)
    tk = np.array([15, 30, 60, 90, 115, 128, 135]) + j[2]
    cx = np.array([55, 60, 55, 40, 15, -5, -15]) + j[0]
    cy = np.array([10, 0, -20, -40, -55, -58, -58]) + j[1]
    r = np.array([0, 35, 42, 38, 28, 18, 0]) * s
    box = cv.box((cx.min() - 50, cx.max() + 50), (cy.min() - 50, cy.max() + 50), (tk[0], tk[-1]))
    t, x, y, cav = cv.coords(box)
    q = _ztube(t, x, y, tk, cx, cy, r, 0.8 * r) - _wobble(rng, 0.12)(t, x, y)
    inside = (q <= 1) & cav & (t > _t_diaphragm(x, y) + 4)
    wall_at = (1 - 5.0 / np.maximum(np.interp(t, tk, r), 6)) ** 2
    gas = (y - np.interp(t, tk, cy)) / np.maximum(np.interp(t, tk, 0.8 * r), 1) < cv.geo["gas_level"]
    lumen = np.where(gas, -1000.0, hu["water"])
    cv.paint(box, inside, np.where(q > wall_at, hu["wall"], lumen), "stomach")


def _paint_gallbladder(cv, rng, hu):
    """Pear under the liver, fundus anterior-inferior; fluid-dark."""
    j, s = _jit(rng), rng.uniform(0.85, 1.15)
    tk = np.array([95, 105, 125, 148, 160]) + j[2]
    cx = np.array([-46, -48, -50, -53, -54]) + j[0]
    cy = np.array([-38, -44, -50, -58, -60]) + j[1]
    r = np.array([0, 11, 18, 20, 0]) * s
    box = cv.box((-80, -20), (-90, -15), (tk[0], tk[-1]))
    t, x, y, cav = cv.coords(box)
    q = _ztube(t, x, y, tk, cx, cy, r, r) - _wobble(rng, 0.1)(t, x, y)
    cv.paint(box, (q <= 1) & cav, hu["bile"], "gallbladder")


def _paint_pancreas(cv, rng, hu):
    """Lobulated tube from the splenic hilum (tail) across the aorta to the head inside the duodenal C."""
    pts = np.array([[88, 22, 90], [55, 5, 98], [25, -22, 105], [-2, -42, 114], [-28, -28, 135],
                    [-18, -12, 150]], float) + _jit(rng)
    radii = np.array([10, 12, 12, 10, 18, 12]) * rng.uniform(0.9, 1.1)
    box = _capsule_box(cv, pts, radii)
    t, x, y, cav = cv.coords(box)
    q = _capsules(t, x, y, pts, radii) - _wobble(rng, 0.35, (15.0, 30.0))(t, x, y)
    cv.paint(box, (q <= 1) & cav, hu["pancreas"], "pancreas")


def _paint_duodenum(cv, rng, hu):
    """C-loop from the pylorus around the pancreatic head (a class in AMOS only)."""
    pts = np.array([[-20, -58, 128], [-48, -45, 128], [-58, -25, 140], [-58, -20, 175], [-35, -25, 190],
                    [10, -30, 192], [32, -20, 178], [35, -25, 160]], float) + _jit(rng)
    radii = np.full(len(pts), 12.0) * rng.uniform(0.85, 1.15)
    box = _capsule_box(cv, pts, radii)
    t, x, y, cav = cv.coords(box)
    q = _capsules(t, x, y, pts, radii) - _wobble(rng, 0.15)(t, x, y)
    cv.paint(box, (q <= 1) & cav, np.where(q > 0.45, hu["soft"], hu["water"] + 10), "duodenum")


def _paint_portal_veins(cv, rng, hu):
    """Splenic vein behind the pancreas, confluence, SMV, portal vein and its two hepatic branches."""
    j, s = _jit(rng), rng.uniform(0.9, 1.1)
    conf, hil = [-6, -24, 114], [-45, -14, 82]
    for pts, radii in (([[88, 34, 88], [55, 20, 98], [22, -6, 106], conf], [5, 6, 6, 7]),
                       ([conf, [-28, -20, 100], hil, [-75, -2, 72]], [7, 8, 8, 5]),
                       ([hil, [-20, -40, 65]], [6, 4]),
                       ([conf, [-8, -32, 140], [-5, -35, 175]], [7, 6, 5])):
        pts, radii = np.array(pts, float) + j, np.array(radii, float) * s
        box = _capsule_box(cv, pts, radii)
        if box is not None:
            t, x, y, _ = cv.coords(box)
            cv.paint(box, _capsules(t, x, y, pts, radii) <= 1, hu["portal"], "portal_splenic_veins")


def _paint_great_vessels(cv, rng, hu):
    """IVC (oval, right), aorta (round, left) with iliac arteries below the bifurcation, crura."""
    j, s = _jit(rng, 2.0), rng.uniform(0.9, 1.1)
    box = cv.box((-60, 80), (-40, 50), (-200, 700))
    t, x, y, cav = cv.coords(box)
    tk, r = [-10, 60, 320], np.array([13, 13, 12]) * s
    cv.paint(box, _ztube(t, x, y, tk, np.array([-18, -24, -20]) + j[0], np.array([-8, 0, -2]) + j[1],
                         r, r * 0.75) <= 1, hu["ivc"], "ivc")
    tk, ax, ay, r = [-300, 0, 300], np.array([20, 12, 4]) + j[0], np.array([16, 6, -6]) + j[1], [12, 12, 9]
    r = np.array(r) * s
    for side in (-1, 1):  # crura of the diaphragm beside the aorta: muscle next to the adrenals
        crus = _ztube(t, x, y, [20, 30, 130, 140], ax[1] + side * 17 + np.zeros(4), ay[1] + 8 + np.zeros(4),
                      [0, 5, 5, 0], [0, 9, 9, 0])
        cv.paint(box, crus <= 1, hu["muscle"], "bg")
    cv.paint(box, _ztube(t, x, y, tk, ax, ay, r, r) <= 1, hu["aorta"], "aorta")
    for side in (-1, 1):
        iliac = _ztube(t, x, y, [300, 440, 700], ax[2] + side * np.array([0, 56, 70]),
                       ay[2] + np.array([0, 6, 10]), [6, 6, 6], [6, 6, 6])
        cv.paint(box, iliac <= 1, hu["aorta"], "bg")


def _paint_esophagus(cv, rng, hu):
    """A muscular tube from the posterior mediastinum through the hiatus to the cardia, in a sleeve of fat.

    The sleeve (periesophageal fat, ~4 mm) is what sets it off from the heart behind which it runs: its own HU
    (40-60) is the heart's and the crus's, so without it the tube is invisible on the halved training grid."""
    j, s = _jit(rng, 2.0), rng.uniform(0.9, 1.1)
    tk, r = [-300, 0, 25, 42], np.array([9, 9, 9, 7]) * s
    box = cv.box((-30, 70), (-40, 20), (-300, 45))
    if box is not None:
        t, x, y, _ = cv.coords(box)
        cx, cy = np.array([0, 6, 22, 38]) + j[0], np.array([-4, -12, -16, -12]) + j[1]
        sleeve = _ztube(t, x, y, tk, cx, cy, r + _ESOPHAGUS_FAT_MM, r + _ESOPHAGUS_FAT_MM) <= 1
        cv.paint(box, sleeve & (cv.label[box] == 0), hu["fat"], "bg")
        cv.paint(box, _ztube(t, x, y, tk, cx, cy, r, r) <= 1, hu["esophagus"], "esophagus")


def _paint_adrenals(cv, rng, hu):
    """Thin inverted-Y plates: two limbs (``_ADRENAL_HALF_MM`` half-thickness) from an anterior apex, tapering in t.

    As on real CT they lie in periadrenal fat (inside the renal fascia) beside the crus of the diaphragm (muscle of
    nearly their own HU), so a thin soft-tissue streak against fat is all that shows them. Version 3 gives each
    limb a 5 mm fat plane all round, against the liver and the crus too, and 7.5 mm limbs (5.5 mm in version 2):
    version 2's right adrenal touched the liver on most of its outline and both were thinner than a voxel of the
    halved grid, so no unweighted VNet learned them, even one trained on every case
    (docs/benchmark/first_pass/phantom_20p.md). Version 1 set them in soft tissue of their own HU."""
    for name, apex, ends, ct in (("adrenal_r", [-36, 16], [[-30, 40], [-50, 36]], 92.0),
                                 ("adrenal_l", [40, 12], [[34, 36], [54, 32]], 102.0)):
        j, s = _jit(rng, 2.5, 4.0), rng.uniform(0.9, 1.2)
        apex, ends, ct = np.array(apex) + j[:2], np.array(ends) + j[:2], ct + j[2]
        box = cv.box((apex[0] - 30, apex[0] + 30), (apex[1] - 10, apex[1] + 40), (ct - 28, ct + 28))
        if box is None:
            continue
        t, x, y, _ = cv.coords(box)
        patch = ((x - apex[0] + np.sign(apex[0]) * 8) ** 2 + (y - apex[1] - 10) ** 2) / 16.0 ** 2
        free = (cv.label[box] == 0) & (cv.hu[box] != np.float32(hu["muscle"]))  # keep the crus (painted muscle)
        cv.paint(box, (patch + ((t - ct) / 26.0) ** 2 <= 1) & free, hu["fat"], "bg")
        taper = np.sqrt(np.clip(1 - ((t - ct) / (20 * s)) ** 2, 0, 1))
        mask = np.zeros(np.broadcast_shapes(t.shape, x.shape), bool)
        envelope = mask.copy()
        for end in ends:
            tip = apex + (end - apex) * s * taper[..., None]  # limbs shorten towards the top and bottom
            dist2 = _segment_dist2(x, y, apex, tip)
            mask |= (dist2 <= (_ADRENAL_HALF_MM * taper) ** 2) & (taper > 0.2)
            envelope |= (dist2 <= (_ADRENAL_HALF_MM * taper + _ADRENAL_FAT_MM) ** 2) & (taper > 0.1)
        # a fat plane all round, against the liver and the crus too (the patch above leaves those alone)
        cv.paint(box, envelope & np.isin(cv.label[box], (0, cv.ids["liver"])), hu["fat"], "bg")
        cv.paint(box, mask, hu["adrenal"], name)


def _segment_dist2(x, y, p0, p1):
    """Squared in-plane distance to per-slice segments p0 -> p1 (each (n,1,1,2) or (2,))."""
    d = p1 - p0
    dx, dy = d[..., 0], d[..., 1]
    s = np.clip(((x - p0[..., 0]) * dx + (y - p0[..., 1]) * dy) / np.maximum(dx * dx + dy * dy, 1e-6), 0, 1)
    return (x - p0[..., 0] - s * dx) ** 2 + (y - p0[..., 1] - s * dy) ** 2


def _paint_pelvis(cv, rng, hu, sex):
    """Iliac wings and femoral heads, bladder, and prostate (male) or uterus (female)."""
    box = cv.box((-170, 170), (-120, 120), (280, 700))
    if box is None:
        return
    t, x, y, cav = cv.coords(box)
    for side in (-1, 1):
        wing = _ellipsoid(t, x, y, [side * 85, 20, 360], [50, 9, 65], -side * 41.0)  # sacroiliac -> anterolateral
        cv.paint(box, (wing <= 1) & cav, hu["cortex"], "bg")
        head = (x - side * 88) ** 2 + y ** 2 + ((t - 490) * 0.8) ** 2 <= 24 ** 2
        cv.paint(box, head & cav, hu["bone"], "bg")
    fill = rng.uniform(0.6, 1.6) ** (1 / 3)
    c = np.array([0, -45, 440]) + _jit(rng)
    q = _ellipsoid(t, x, y, c, np.array([48, 38, 36]) * fill) - _wobble(rng, 0.08)(t, x, y)
    cv.paint(box, (q <= 1) & cav, hu["water"], "bladder")
    c, semi = ((np.array([0, -2, 478]), [22, 17, 18]) if sex == "m" else (np.array([0, 22, 412]), [28, 22, 40]))
    q = _ellipsoid(t, x, y, c + _jit(rng, 3.0), np.array(semi) * rng.uniform(0.85, 1.15))
    cv.paint(box, (q <= 1) & cav, hu["prostate"], "prostate_uterus")


# ------------------------------------------------------------------------------------------------- a case
def _draw_geometry(rng, layout, case_index, shape):
    """Per-case field of view, spacing, origin, body size/pose and scan coverage."""
    pelvis = layout == "amos" and case_index % 3 != 0  # every third AMOS case stops above the pelvis
    d = int(rng.integers(60, 73) if pelvis else rng.integers(48, 65))
    shape = (d, 192, 192) if shape is None else tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ConfigError(f"shape {shape}: expected three sizes (D, H, W) >= 8")
    gz, t_top = rng.uniform(0.92, 1.08), rng.uniform(-40.0, -15.0)
    t_end = rng.uniform(505.0, 545.0) if pelvis else rng.uniform(235.0, 290.0)
    fov = rng.uniform(370.0, 420.0)
    spacing = (round(fov / shape[2], 4), round(fov / shape[1], 4),
               round((t_end - t_top) * gz / (shape[0] - 1), 4))
    origin = (round(-(shape[2] - 1) / 2 * spacing[0] + rng.uniform(-10, 10), 2),
              round(-(shape[1] - 1) / 2 * spacing[1] + rng.uniform(-40, 10), 2), round(rng.uniform(-700, -400), 2))
    return {"shape": shape, "spacing": spacing, "origin": origin, "pelvis": pelvis, "gz": gz, "t_top": t_top,
            "gx": rng.uniform(155.0, 175.0) / _A, "gy": rng.uniform(105.0, 128.0) / _B,
            "theta": np.radians(rng.uniform(-5.0, 5.0)), "bx": rng.uniform(-8.0, 8.0), "by": rng.uniform(-5.0, 20.0),
            "fat": rng.uniform(10.0, 30.0), "fat_level": rng.uniform(-0.6, 0.2), "gas_level": rng.uniform(-0.9, -0.4),
            "disc_phase": rng.uniform(0, 32), "rib_phase": rng.uniform(0, 26),
            "noise": rng.uniform(10.0, 25.0), "blur_xy": rng.uniform(0.5, 0.9), "blur_z": rng.uniform(0.3, 0.6),
            "offset": rng.uniform(-8.0, 8.0), "bias": rng.uniform(0.0, 8.0)}


def _draw_hu(rng):
    """Tissue intensities (HU, portal venous phase)."""
    u = rng.uniform
    hu = {"lung": u(-880, -820), "heart": u(60, 110), "fat": u(-120, -85), "soft": u(30, 55), "muscle": u(40, 60),
          "bone": u(400, 550), "cortex": u(700, 1000), "csf": u(5, 20), "liver": u(100, 120), "spleen": u(110, 130),
          "kidney": u(150, 200), "water": u(0, 20), "wall": u(80, 100), "bile": u(0, 20), "portal": u(150, 180),
          "ivc": u(120, 150), "aorta": u(150, 200), "esophagus": u(40, 60), "adrenal": u(30, 60),
          "prostate": u(30, 60)}
    hu["medulla"] = hu["kidney"] - u(40, 70)
    hu["pancreas"] = hu["liver"] - u(5, 20)  # 90-110 HU, a little below the liver
    return hu


def _acquire(cv, rng):
    """Partial-volume blur, slow inhomogeneity + offset on tissue, Gaussian noise; int16 HU."""
    g = cv.geo
    tissue = cv.hu > -500
    image = ndimage.gaussian_filter(cv.hu, (g["blur_z"], g["blur_xy"], g["blur_xy"]), truncate=3.0)
    axes = [np.cos(2 * np.pi * rng.uniform(0.3, 1.0) * np.linspace(0, 1, n) + rng.uniform(0, 2 * np.pi))
            for n in image.shape]
    bias = g["offset"] + g["bias"] * (axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None]) / 3
    image += np.where(tissue, bias.astype(np.float32), np.float32(0))
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(g["noise"])
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16)


def _build_case(case_index, seed, layout, shape):
    """(image int16, label uint8, geometry dict) of one case; see make_case."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if int(case_index) < 0 or int(seed) < 0:
        raise ConfigError(f"case {case_index}, seed {seed}: both must be >= 0")
    ids = {name: i + 1 for i, name in enumerate(get_task(layout).class_names)}
    rng = np.random.default_rng([int(seed), int(case_index), LAYOUTS.index(layout)])
    geo = _draw_geometry(rng, layout, int(case_index), shape)
    hu = _draw_hu(rng)
    has_gallbladder = layout == "synapse" or rng.uniform() >= 0.2  # AMOS: some after cholecystectomy
    sex = "m" if rng.uniform() < 0.5 else "f"
    cv = _Canvas(geo, ids)
    for paint in (_paint_body, _paint_spine, _paint_liver, _paint_spleen, _paint_kidneys, _paint_stomach):
        paint(cv, rng, hu)
    if has_gallbladder:
        _paint_gallbladder(cv, rng, hu)
    for paint in (_paint_pancreas, _paint_duodenum, _paint_portal_veins, _paint_great_vessels,
                  _paint_esophagus, _paint_adrenals):
        paint(cv, rng, hu)
    if geo["pelvis"]:
        _paint_pelvis(cv, rng, hu, sex)
    return _acquire(cv, rng), cv.label, geo


def make_case(case_index, seed=0, layout="synapse", shape=None):
    """One phantom case: (image int16 HU (D, H, W), label uint8 (D, H, W), spacing (sx, sy, sz) mm).

    ``case_index`` is the case number of its id (1 -> "0001"); ``shape`` (D, H, W) overrides the drawn size
    (48-64 x 192 x 192) with the same anatomy and field of view, e.g. a small grid for tests. Labels follow
    the task's class order (Synapse 13 organs, AMOS 15 classes). Same arguments -> identical arrays."""
    image, label, geo = _build_case(case_index, seed, layout, shape)
    return image, label, geo["spacing"]
