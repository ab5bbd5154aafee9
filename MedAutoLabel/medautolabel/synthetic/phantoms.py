"""Synthetic CT-angiography phantoms: branching contrast vessels, nerves in fat sheaths, bone, organs.

A phantom is defined in physical space (RAS millimetres) and rendered onto any voxel grid, so the
same anatomy can be drawn on an oblique, flipped, anisotropic grid (tests, demo) or on a model's
own training grid. Every look is randomised per seed (contrast levels, noise, blur, tissue mix,
which distractors appear) so that a model trained on them does not learn one fixed appearance.

Label values: 0 background, 1 vessel (every contrast-filled vessel lumen: arteries, veins, lung
vessels, and an aneurysm sac), 2 nerve. Contrast-filled heart chambers, enhancing organs, bone and
calcium are *not* vessel: they are the hard negatives.

Seeds: training uses seeds below 1,000,000; held-out evaluation uses 1,000,000-1,999,999;
the demo uses 2,000,001. Same seed, same phantom (on the same grid).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from medautolabel.image import Image, make_ijk_to_ras

VESSEL, NERVE = 1, 2
LABEL_NAMES = {0: "background", 1: "vessel", 2: "nerve"}
MIN_VISIBLE_SAC_MM3 = 5.0  # a phantom "has an aneurysm" when at least this much sac is in the image
TRAINING_SEEDS = range(0, 1_000_000)
HELD_OUT_SEEDS = range(1_000_000, 2_000_000)
DEMO_SEED = 2_000_001


@dataclass
class Phantom:
    image: Image  # HU, int16
    labels: Image  # uint8: 0 background, 1 vessel, 2 nerve
    aneurysm: bool
    aneurysm_mask: np.ndarray  # bool, (k, j, i): the aneurysm sac outside its parent vessel
    seed: int
    blood_pool_mask: Optional[np.ndarray] = None  # bool, (k, j, i): a heart-chamber-like pool (not vessel), if any


@dataclass
class Tube:
    """A polyline centreline with a radius per point (mm)."""

    points: np.ndarray  # (N, 3) RAS
    radii: np.ndarray  # (N,)


# ----------------------------------------------------------------------------- grid

class Grid:
    """Voxel-centre RAS coordinates of an image grid, computed lazily per bounding box."""

    def __init__(self, shape_kji: Sequence[int], ijk_to_ras: np.ndarray) -> None:
        self.shape = tuple(int(s) for s in shape_kji)
        self.m = np.asarray(ijk_to_ras, dtype=np.float64)
        self.inv = np.linalg.inv(self.m)
        self.spacing = np.linalg.norm(self.m[:3, :3], axis=0)

    def box(self, lo_ras: np.ndarray, hi_ras: np.ndarray) -> Optional[Tuple[slice, slice, slice]]:
        """The (k, j, i) slices covering an axis-aligned RAS box, or None when outside the grid."""
        corners = np.array([[x, y, z] for x in (lo_ras[0], hi_ras[0]) for y in (lo_ras[1], hi_ras[1])
                            for z in (lo_ras[2], hi_ras[2])])
        ijk = corners @ self.inv[:3, :3].T + self.inv[:3, 3]
        lo = np.floor(ijk.min(axis=0)).astype(int)
        hi = np.ceil(ijk.max(axis=0)).astype(int) + 1
        size_ijk = self.shape[::-1]
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, size_ijk)
        if np.any(hi <= lo):
            return None
        return (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))

    def coords(self, sl: Tuple[slice, slice, slice]) -> np.ndarray:
        """RAS coordinates (kk, jj, ii, 3) of the voxels in a (k, j, i) box."""
        k = np.arange(sl[0].start, sl[0].stop, dtype=np.float32)
        j = np.arange(sl[1].start, sl[1].stop, dtype=np.float32)
        i = np.arange(sl[2].start, sl[2].stop, dtype=np.float32)
        m = self.m.astype(np.float32)
        out = (m[:3, 3][None, None, None, :]
               + k[:, None, None, None] * m[:3, 2]
               + j[None, :, None, None] * m[:3, 1]
               + i[None, None, :, None] * m[:3, 0])
        return out

    def full(self) -> Tuple[slice, slice, slice]:
        return (slice(0, self.shape[0]), slice(0, self.shape[1]), slice(0, self.shape[2]))


def _soft(signed_distance: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume fraction from a signed distance (negative inside): a ramp one voxel wide."""
    return np.clip(0.5 - signed_distance / width, 0.0, 1.0)


class Canvas:
    """Accumulates occupancy fractions of one kind of structure (union = maximum)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.frac = np.zeros(grid.shape, dtype=np.float32)
        self.width = float(grid.spacing.mean())

    def add_tube(self, tube: Tube, extra: float = 0.0) -> None:
        """Draw a tube (radius + ``extra`` mm) segment by segment, each within its own bounding box."""
        p, r = tube.points, tube.radii + extra
        for a in range(len(p) - 1):
            p0, p1, r0, r1 = p[a], p[a + 1], r[a], r[a + 1]
            pad = max(r0, r1) + 2 * self.width
            sl = self.grid.box(np.minimum(p0, p1) - pad, np.maximum(p0, p1) + pad)
            if sl is None:
                continue
            x = self.grid.coords(sl)
            d = (p1 - p0).astype(np.float32)
            length2 = float(d @ d) or 1e-6
            t = np.clip(((x - p0.astype(np.float32)) @ d) / length2, 0.0, 1.0)
            closest = p0.astype(np.float32) + t[..., None] * d
            dist = np.linalg.norm(x - closest, axis=-1)
            radius = r0 + t * (r1 - r0)
            np.maximum(self.frac[sl], _soft(dist - radius, self.width), out=self.frac[sl])

    def add_ellipsoid(self, centre: np.ndarray, radii: np.ndarray, rotation: np.ndarray,
                      extra: float = 0.0) -> None:
        radii = np.asarray(radii, dtype=np.float64) + extra
        pad = radii.max() + 2 * self.width
        sl = self.grid.box(centre - pad, centre + pad)
        if sl is None:
            return
        x = self.grid.coords(sl) - centre.astype(np.float32)
        local = x @ rotation.astype(np.float32)  # rotation columns = ellipsoid axes
        norm = np.linalg.norm(local / radii.astype(np.float32), axis=-1)
        # distance approximation: scale the normalised radius by the smallest semi-axis
        np.maximum(self.frac[sl], _soft((norm - 1.0) * float(radii.min()), self.width), out=self.frac[sl])


@dataclass
class BloodPool:
    """A heart-chamber-like contrast pool: its canvas, level (HU) and ellipsoid (as ``Canvas.add_ellipsoid`` takes it)."""

    canvas: Canvas
    level: float
    centre: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray

    def near(self, point: np.ndarray, margin: float = 3.0) -> bool:
        """Whether ``point`` lies within ``margin`` mm of the pool."""
        local = (np.asarray(point, dtype=np.float64) - self.centre) @ self.rotation
        return bool(np.linalg.norm(local / (np.asarray(self.radii) + margin)) < 1.0)


def _paint(hu: np.ndarray, frac: np.ndarray, value) -> None:
    """Composite a structure of intensity ``value`` (scalar or array) over ``hu`` by its fraction."""
    hu *= 1.0 - frac
    hu += frac * value


# ----------------------------------------------------------------------------- anatomy

def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v) + 1e-12)


def _perpendicular(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    w = rng.normal(size=3)
    return _unit(w - (w @ v) * v)


def _walk(rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, radius: float,
          half_fov: float, step: float = 1.5, curviness: float = 0.12, taper: float = 0.15,
          max_length: float = 400.0) -> Tube:
    """A smooth random walk from ``start`` until it leaves the field of view (plus a margin)."""
    pts, rads = [start.copy()], [radius]
    d = _unit(direction)
    bend = np.zeros(3)
    n_steps = int(max_length / step)
    end_radius = radius * (1.0 - rng.uniform(0, taper))
    margin = half_fov + 2 * radius + 5
    entered = bool(np.all(np.abs(start) <= half_fov))
    for s in range(1, n_steps):
        bend = 0.8 * bend + rng.normal(scale=curviness, size=3)
        d = _unit(d + bend * step / max(radius, 2.0) ** 0.5)
        pts.append(pts[-1] + d * step)
        rads.append(radius + (end_radius - radius) * min(1.0, s * step / 150.0))
        entered = entered or bool(np.all(np.abs(pts[-1]) <= half_fov))
        # A walk that starts outside (a tree entering from a face) may wander before it comes in:
        # it ends only once it has been inside and left again (or at max_length).
        if entered and np.any(np.abs(pts[-1]) > margin):
            break
    return Tube(np.array(pts), np.array(rads))


def _vessel_tree(rng: np.random.Generator, half_fov: float, root_radius: float,
                 max_depth: int = 3) -> List[Tube]:
    """A branching tree entering the field of view from one side; children follow Murray-like radii."""
    face = rng.integers(3)
    start = rng.uniform(-0.6, 0.6, size=3) * half_fov
    sign = rng.choice([-1.0, 1.0])
    start[face] = sign * (half_fov + root_radius + 4)
    # Aimed at a point well inside the field of view, so that the tree crosses the image whatever
    # the grid's direction (an oblique grid covers little more than the inscribed sphere).
    target = _unit(rng.normal(size=3)) * half_fov * rng.uniform(0.0, 0.5)
    direction = _unit(target - start) + rng.normal(scale=0.1, size=3)
    tubes: List[Tube] = []
    queue = [(_walk(rng, start, direction, root_radius, half_fov), 0)]
    while queue:
        tube, depth = queue.pop()
        tubes.append(tube)
        if depth >= max_depth:
            continue
        n_children = rng.integers(1, 4)
        for _ in range(n_children):
            if len(tube.points) < 8:
                break
            a = rng.integers(3, len(tube.points) - 3)
            parent_r = tube.radii[a]
            child_r = parent_r * rng.uniform(0.35, 0.8)
            if child_r < 0.9:
                continue
            tangent = _unit(tube.points[a + 1] - tube.points[a - 1])
            angle = np.deg2rad(rng.uniform(25, 85))
            child_d = np.cos(angle) * tangent + np.sin(angle) * _perpendicular(tangent, rng)
            child = _walk(rng, tube.points[a], child_d, child_r, half_fov, curviness=0.15)
            queue.append((child, depth + 1))
    return tubes


def _beside(rng: np.random.Generator, tube: Tube, nerve_radius: float, sheath: float) -> Tube:
    """A nerve running alongside a vessel, just outside its wall."""
    offset_dir = _perpendicular(_unit(tube.points[-1] - tube.points[0] + 1e-6), rng)
    pts = []
    for a in range(len(tube.points)):
        gap = tube.radii[a] + sheath + nerve_radius + rng.uniform(0.8, 1.6)
        pts.append(tube.points[a] + offset_dir * gap)
    radii = np.full(len(pts), nerve_radius) * np.linspace(1.0, rng.uniform(0.8, 1.0), len(pts))
    return Tube(np.array(pts), radii)


def _ribs(rng: np.random.Generator, half_fov: float) -> List[Tube]:
    """Parallel curved ribs: arcs of a large circle, repeated along one axis."""
    tubes = []
    rotation = _random_rotation(rng)
    bend_radius = rng.uniform(40, 120)
    rib_r = rng.uniform(2.5, 5.5)
    pitch = rng.uniform(14, 26)
    centre = rng.uniform(-0.3, 0.3, size=3) * half_fov
    for n in range(-4, 5):
        theta = np.linspace(-1.2, 1.2, 60) * (half_fov * 1.6 / bend_radius)
        local = np.stack([bend_radius * np.sin(theta), bend_radius * (np.cos(theta) - 1) + half_fov * 0.3,
                          np.full_like(theta, n * pitch)], axis=1)
        pts = centre + local @ rotation.T
        tubes.append(Tube(pts, np.full(len(pts), rib_r)))
    return tubes


@dataclass
class Look:
    """The randomised appearance of one phantom (HU levels, noise, blur)."""

    air: float
    fat: float
    muscle: float
    lung: float
    contrast: float
    cortical: float
    trabecular: float
    nerve: float
    noise: float
    blur_mm: np.ndarray


def _random_look(rng: np.random.Generator) -> Look:
    return Look(
        air=rng.uniform(-1010, -980),
        fat=rng.uniform(-130, -70),
        muscle=rng.uniform(25, 65),
        lung=rng.uniform(-900, -720),
        contrast=rng.uniform(180, 650),
        cortical=rng.uniform(650, 1600),
        trabecular=rng.uniform(150, 420),
        nerve=rng.uniform(15, 60),
        noise=rng.uniform(4, 35),
        blur_mm=rng.uniform(0.25, 0.9, size=3) * (rng.uniform(1.0, 2.0, size=3) if rng.random() < 0.3 else 1),
    )


def render(seed: int, shape_kji: Sequence[int], ijk_to_ras: np.ndarray,
           with_aneurysm: Optional[bool] = None, centre: Optional[Sequence[float]] = None,
           half_fov: Optional[float] = None) -> Phantom:
    """Render the phantom of ``seed`` onto a grid.

    The anatomy depends only on the seed, ``centre`` and ``half_fov`` (RAS mm; by default the grid's
    centre and half extent), never on the grid itself: the same arguments on two grids draw the
    same structures at the same physical places. Texture and noise are drawn per grid.
    """
    rng = np.random.default_rng(seed)  # anatomy and look
    tex = np.random.default_rng([seed, 1])  # grid-sized random fields
    grid = Grid(shape_kji, ijk_to_ras)
    corners = np.array([[i, j, k] for i in (0, shape_kji[2] - 1) for j in (0, shape_kji[1] - 1)
                        for k in (0, shape_kji[0] - 1)], dtype=np.float64)
    ras_corners = corners @ grid.m[:3, :3].T + grid.m[:3, 3]
    if centre is None:
        centre = ras_corners.mean(axis=0)
    centre = np.asarray(centre, dtype=np.float64)
    if half_fov is None:
        # The radius of the sphere inscribed in the grid's box: on an oblique grid the corners reach
        # further than its faces, and anatomy placed out there would miss the image.
        half_fov = float(np.min(grid.spacing * (np.array(shape_kji[::-1]) - 1)) / 2.0)
    # Anatomy is drawn around the origin, then shifted to the grid's centre.
    shift = centre
    look = _random_look(rng)
    aneurysm = bool(rng.random() < 0.5) if with_aneurysm is None else with_aneurysm

    def canvas() -> Canvas:
        return Canvas(grid)

    def shifted(t: Tube) -> Tube:
        return Tube(t.points + shift, t.radii)

    # Soft-tissue background: a smooth random mix of muscle and fat with texture.
    field = ndimage.gaussian_filter(tex.normal(size=grid.shape).astype(np.float32),
                                    sigma=rng.uniform(4, 10) / grid.spacing[::-1])
    field /= field.std() + 1e-6
    fat_frac = np.clip((field - rng.uniform(0.2, 1.2)) * 1.5 + 0.5, 0, 1).astype(np.float32)
    hu = np.full(grid.shape, look.muscle, dtype=np.float32)
    _paint(hu, fat_frac, look.fat)
    hu += ndimage.gaussian_filter(tex.normal(size=grid.shape).astype(np.float32), 1.5) * rng.uniform(3, 15)

    # Body outline with subcutaneous fat and air outside (half of the cases).
    if rng.random() < 0.5:
        rot = _random_rotation(rng)
        radii = np.array([rng.uniform(0.9, 1.6), rng.uniform(0.9, 1.6), 50.0]) * half_fov
        body_centre = shift + rot[:, 0] * half_fov * rng.uniform(0.5, 1.2)
        outside = canvas()
        outside.add_ellipsoid(body_centre, radii, rot)
        inner = canvas()
        inner.add_ellipsoid(body_centre, radii - rng.uniform(4, 18), rot)
        _paint(hu, (outside.frac - inner.frac).clip(0, 1), look.fat)
        _paint(hu, 1.0 - outside.frac, look.air)

    # Lung region with its own (labelled) vessels (a third of the cases).
    lung_tubes: List[Tube] = []
    if rng.random() < 0.33:
        lung = canvas()
        rot = _random_rotation(rng)
        lung.add_ellipsoid(shift + rot[:, 0] * half_fov * rng.uniform(0.4, 1.0),
                           np.array([rng.uniform(0.6, 1.0), 1.5, 1.5]) * half_fov, rot)
        _paint(hu, lung.frac, look.lung)
        for _ in range(rng.integers(1, 3)):
            lung_tubes += [shifted(t) for t in _vessel_tree(rng, half_fov, rng.uniform(1.5, 5.0))]

    # Organs, some enhancing (kidney-like cortex), none of them vessel.
    for _ in range(rng.integers(0, 4)):
        organ = canvas()
        organ.add_ellipsoid(shift + rng.uniform(-0.8, 0.8, 3) * half_fov,
                            rng.uniform(8, 35, 3), _random_rotation(rng))
        # Enhancing parenchyma stays darker than the arterial contrast, as in an arterial phase.
        enhancing = rng.random() < 0.4 and look.contrast > 230
        level = rng.uniform(100, 0.6 * look.contrast) if enhancing else rng.uniform(30, 90)
        _paint(hu, organ.frac, level)

    # Bone: blobs with a cortical shell, long bones, ribs; calcified specks.
    bone_outer, bone_inner = canvas(), canvas()
    for _ in range(rng.integers(0, 4)):
        c, rot = shift + rng.uniform(-0.9, 0.9, 3) * half_fov, _random_rotation(rng)
        radii = rng.uniform(8, 25, 3)
        shell = rng.uniform(1.0, 3.0)
        bone_outer.add_ellipsoid(c, radii, rot)
        bone_inner.add_ellipsoid(c, radii - shell, rot)
    for _ in range(rng.integers(0, 3)):
        d = _unit(rng.normal(size=3))
        c = shift + rng.uniform(-0.7, 0.7, 3) * half_fov
        pts = c + np.linspace(-2, 2, 9)[:, None] * half_fov * d
        r = rng.uniform(5, 13)
        shell = rng.uniform(1.5, 3.5)
        bone_outer.add_tube(Tube(pts, np.full(9, r)))
        bone_inner.add_tube(Tube(pts, np.full(9, r - shell)))
    if rng.random() < 0.4:
        for rib in _ribs(rng, half_fov):
            bone_outer.add_tube(shifted(rib))
            bone_inner.add_tube(shifted(rib), extra=-rng.uniform(0.8, 1.5))
    marrow = look.trabecular if rng.random() < 0.7 else rng.uniform(-60, 60)
    _paint(hu, bone_outer.frac, look.cortical)
    _paint(hu, bone_inner.frac, marrow + tex.normal(0, 40, size=grid.shape).astype(np.float32) * 0.5)

    # Heart-chamber-like contrast pool with a muscular wall (not vessel) in some cases. The pool is
    # blood, not vessel: vessels and nerves that the trees below route through it end at its
    # surface (it is painted again over them), as great vessels do at the heart.
    chamber: Optional[BloodPool] = None
    if rng.random() < 0.15:
        c, rot = shift + rng.uniform(-0.7, 0.7, 3) * half_fov, _random_rotation(rng)
        radii = rng.uniform(18, 35, 3)
        wall, pool = canvas(), canvas()
        wall.add_ellipsoid(c, radii + rng.uniform(5, 10), rot)
        pool.add_ellipsoid(c, radii, rot)
        _paint(hu, wall.frac, rng.uniform(40, 110))
        chamber = BloodPool(pool, look.contrast + rng.uniform(-60, 60), c, radii, rot)
        _paint(hu, pool.frac, chamber.level)

    # Vessel trees: a main tree (radius 1.5-16 mm) and 0-2 others, some less enhanced (veins).
    root = float(rng.choice([rng.uniform(1.5, 5), rng.uniform(5, 10), rng.uniform(10, 16)], p=[0.5, 0.3, 0.2]))
    trees = [(shifted(t), look.contrast) for t in _vessel_tree(rng, half_fov, root)]
    for _ in range(rng.integers(0, 3)):
        level = look.contrast if rng.random() < 0.5 else max(150.0, look.contrast * rng.uniform(0.6, 1.0))
        trees += [(shifted(t), level) for t in _vessel_tree(rng, half_fov, rng.uniform(1.2, 6), max_depth=2)]
    trees += [(t, look.contrast) for t in lung_tubes]

    # Nerves (radius 1-3 mm) in a fat sheath: half beside a vessel, half on their own.
    nerve, sheath_canvas = canvas(), canvas()
    for n_nerve in range(rng.integers(1, 4)):
        nr = rng.uniform(1.0, 3.0)
        sheath = rng.uniform(0.6, 2.0)
        candidates = [t for t, _ in trees if t.radii.max() < 8]
        if candidates and rng.random() < 0.5 and n_nerve > 0:  # the first one always crosses the centre
            tube = _beside(rng, candidates[rng.integers(len(candidates))], nr, sheath)
        else:
            start = _unit(rng.normal(size=3)) * half_fov * rng.uniform(0.0, 0.8)  # inside any grid
            tube = shifted(_walk(rng, start, rng.normal(size=3), nr, half_fov, curviness=0.06, taper=0.1))
            back = shifted(_walk(rng, start, -(tube.points[1] - tube.points[0] + 1e-6), nr, half_fov,
                                 curviness=0.06, taper=0.1))
            tube = Tube(np.concatenate([back.points[::-1], tube.points[1:]]),
                        np.concatenate([back.radii[::-1], tube.radii[1:]]))
        nerve.add_tube(tube)
        sheath_canvas.add_tube(tube, extra=sheath)
    _paint(hu, sheath_canvas.frac, look.fat)
    _paint(hu, nerve.frac, look.nerve + tex.normal(0, 4, size=grid.shape).astype(np.float32))

    vessel = canvas()
    by_level = {}
    for t, level in trees:
        by_level.setdefault(level, []).append(t)
    for level, tubes in by_level.items():
        layer = canvas()
        for t in tubes:
            layer.add_tube(t)
        _paint(hu, layer.frac, level)
        np.maximum(vessel.frac, layer.frac, out=vessel.frac)
    if chamber is not None:
        _paint(hu, chamber.canvas.frac, chamber.level)
        outside_pool = 1.0 - chamber.canvas.frac
        vessel.frac *= outside_pool
        nerve.frac *= outside_pool

    # Saccular aneurysm: a sac wider than its parent artery (radius 1.2-5 mm), as bright as it.
    sac = canvas()
    if aneurysm:
        candidates = [(t, lv) for t, lv in trees[: max(1, len(trees))] if 1.2 <= np.median(t.radii) <= 5.0]
        pool = candidates or trees
        # Any point near the grid's centre (whatever its direction), or the nearest ones if none is.
        dist = [np.linalg.norm(t.points - shift, axis=1) for t, _ in pool]
        reach = max(half_fov * 0.6, min(float(d[1:-1].min()) if len(d) > 2 else np.inf for d in dist) + 5.0)
        spots = [(n, a) for n, d in enumerate(dist) for a in np.flatnonzero(d[1:-1] < reach) + 1
                 if chamber is None or not chamber.near(pool[n][0].points[a])] or [
            (int(np.argmax([len(d) for d in dist])), 1)]
        n, a = spots[rng.integers(len(spots))]
        t, level = pool[n]
        a = int(np.clip(a, 1, len(t.points) - 2))
        tangent = _unit(t.points[a + 1] - t.points[a - 1])
        r_v = float(t.radii[a])
        sac_r = float(np.clip(r_v * rng.uniform(1.4, 2.6), 1.5, 10.0))  # diameters from 3 mm
        centre = t.points[a] + _perpendicular(tangent, rng) * (r_v + 0.5 * sac_r)
        sac.add_ellipsoid(centre, sac_r * rng.uniform(0.8, 1.0, 3), _random_rotation(rng))
        _paint(hu, sac.frac, level)
        np.maximum(vessel.frac, sac.frac, out=vessel.frac)

    # Calcified specks in some vessel walls (bright, not lumen): a classic distractor.
    if rng.random() < 0.3:
        specks = canvas()
        for t, _ in trees[:3]:
            for a in rng.integers(0, len(t.points), size=rng.integers(1, 5)):
                off = _perpendicular(_unit(rng.normal(size=3)), rng) * t.radii[a]
                specks.add_ellipsoid(t.points[a] + off, rng.uniform(0.7, 1.8, 3), _random_rotation(rng))
        _paint(hu, specks.frac, rng.uniform(700, 1300))

    # Scanner: blur (point spread, anisotropic), then noise (slightly correlated).
    sigma_vox = look.blur_mm[::-1] / grid.spacing[::-1]
    hu = ndimage.gaussian_filter(hu, sigma=sigma_vox)
    noise = tex.normal(size=grid.shape).astype(np.float32)
    noise = ndimage.gaussian_filter(noise, 0.6) * 1.8
    hu += noise * look.noise

    labels = np.zeros(grid.shape, dtype=np.uint8)
    labels[nerve.frac >= 0.5] = NERVE
    labels[vessel.frac >= 0.5] = VESSEL
    sac_mask = (sac.frac >= 0.5) & (labels == VESSEL)
    # a sac drawn outside the field of view (or hidden in its vessel) is no aneurysm in this image
    aneurysm = aneurysm and float(sac_mask.sum()) * float(np.prod(grid.spacing)) >= MIN_VISIBLE_SAC_MM3
    hu_img = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    meta = {"modality": "CT", "source_name": f"phantom-{seed}"}
    return Phantom(Image(hu_img, grid.m.copy(), meta), Image(labels, grid.m.copy(), dict(meta)),
                   aneurysm, sac_mask, seed, None if chamber is None else chamber.canvas.frac >= 0.5)


def random_grid(rng: np.random.Generator, fov_mm: Tuple[float, float] = (80.0, 110.0),
                max_voxels_per_side: int = 144) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """An oblique, possibly flipped and permuted, anisotropic grid around the origin."""
    spacing = np.array([rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.6)])
    spacing = spacing[rng.permutation(3)]
    direction = _random_rotation(rng) if rng.random() < 0.6 else np.eye(3)[:, rng.permutation(3)]
    direction = direction * rng.choice([-1.0, 1.0], size=3)[None, :]
    fov = rng.uniform(*fov_mm)
    size_ijk = np.minimum(np.round(fov / spacing).astype(int), max_voxels_per_side)
    origin = -direction @ (spacing * (size_ijk - 1) / 2.0) + rng.uniform(-20, 20, 3)
    return (int(size_ijk[2]), int(size_ijk[1]), int(size_ijk[0])), make_ijk_to_ras(spacing, direction, origin)


def make_phantom(seed: int, shape_kji: Optional[Sequence[int]] = None,
                 ijk_to_ras: Optional[np.ndarray] = None, aneurysm: Optional[bool] = None) -> Phantom:
    """The phantom of ``seed``; on a random oblique anisotropic grid unless a grid is given."""
    if shape_kji is None or ijk_to_ras is None:
        shape_kji, ijk_to_ras = random_grid(np.random.default_rng([seed, 7]))
    return render(seed, shape_kji, ijk_to_ras, with_aneurysm=aneurysm)


def training_grid(size: int = 96, spacing: float = 0.8) -> Tuple[Tuple[int, int, int], np.ndarray]:
    """The axis-aligned RAS grid that the built-in model is trained on."""
    origin = -np.full(3, spacing * (size - 1) / 2.0)
    return (size, size, size), make_ijk_to_ras([spacing] * 3, np.eye(3), origin)


def write_dataset(out_dir, n: int, seed: int = 0,
                  progress: Optional[Callable[[float, str], None]] = None, overwrite: bool = False) -> Path:
    """Write ``n`` phantoms as an MSD-style dataset (imagesTr/, labelsTr/, dataset.json), all files or none.

    ``out_dir`` must be absent or empty; with ``overwrite`` a folder holding a phantom dataset is
    accepted, and only the files medautolabel wrote there are replaced (ownership.py).
    """
    from medautolabel.io.atomic import atomic_outputs, make_folder
    from medautolabel.io.images import write_image  # late import: io pulls SimpleITK
    from medautolabel.io.ownership import PHANTOMS_REFERENCE, check_new_folder

    out = Path(out_dir)
    names = [f"phantom_{seed + c:07d}.nii.gz" for c in range(n)]
    targets = [out / sub / name for name in names for sub in ("imagesTr", "labelsTr")] + [out / "dataset.json"]
    check_new_folder(out, targets, overwrite=overwrite)
    make_folder(out / "imagesTr")
    make_folder(out / "labelsTr")
    training = []
    with atomic_outputs(targets) as temps:
        for c, name in enumerate(names):
            ph = make_phantom(seed + c)
            write_image(ph.image, temps[2 * c], atomic=False)
            write_image(ph.labels, temps[2 * c + 1], atomic=False)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}",
                             "seed": seed + c, "classes": {"aneurysm": "present" if ph.aneurysm else "absent"}})
            if progress:
                progress((c + 1) / n, f"phantom {c + 1}/{n}")
        dataset = {
            "name": "MedAutoLabel CTA phantoms",
            "description": "Synthetic CT-angiography-like volumes (HU) with vessel and nerve labels",
            "reference": PHANTOMS_REFERENCE,
            "licence": "CC0-1.0",
            "tensorImageSize": "3D",
            "modality": {"0": "CT"},
            "labels": {str(k): v for k, v in LABEL_NAMES.items()},
            "classes": {"aneurysm": ["absent", "present"]},
            "numTraining": n,
            "numTest": 0,
            "training": training,
            "test": [],
        }
        temps[-1].write_text(json.dumps(dataset, indent=2), encoding="utf-8")
    return out
