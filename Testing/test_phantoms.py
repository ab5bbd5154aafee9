"""Synthetic phantoms: deterministic per seed, grid-independent anatomy, sensible labels."""

from __future__ import annotations

import numpy as np
import pytest

from medautolabel.image import make_ijk_to_ras
from medautolabel.synthetic import phantoms


def _small_grid(size: int = 48, spacing: float = 1.2):
    return phantoms.training_grid(size, spacing)


def test_same_seed_same_phantom_and_other_seed_differs():
    shape, m = _small_grid()
    a = phantoms.render(11, shape, m)
    b = phantoms.render(11, shape, m)
    c = phantoms.render(12, shape, m)
    assert np.array_equal(a.image.array, b.image.array)
    assert np.array_equal(a.labels.array, b.labels.array)
    assert not np.array_equal(a.image.array, c.image.array)


def test_labels_and_intensities_are_ct_like():
    shape, m = _small_grid()
    ph = phantoms.render(3, shape, m, with_aneurysm=True)
    assert ph.image.array.dtype == np.int16 and ph.labels.array.dtype == np.uint8
    assert set(np.unique(ph.labels.array)) <= {0, 1, 2}
    assert ph.aneurysm and ph.aneurysm_mask.any()
    assert (ph.labels.array[ph.aneurysm_mask] == phantoms.VESSEL).all()
    # contrast-filled lumen is brighter than the tissue around it on average
    vessel = ph.image.array[ph.labels.array == phantoms.VESSEL].mean()
    tissue = ph.image.array[ph.labels.array == 0]
    assert vessel > np.median(tissue) + 100
    assert ph.image.meta["modality"] == "CT"


def test_aneurysm_flag_can_be_forced_off():
    shape, m = _small_grid()
    ph = phantoms.render(3, shape, m, with_aneurysm=False)
    assert not ph.aneurysm and not ph.aneurysm_mask.any()


@pytest.mark.parametrize("flip", [(1, 1, 1), (-1, 1, -1)])
def test_anatomy_lands_at_the_same_physical_place_on_an_oblique_anisotropic_grid(flip):
    shape, m = phantoms.training_grid(64, 1.0)
    reference = phantoms.render(5, shape, m, centre=[0, 0, 0], half_fov=32.0)
    angle = np.deg2rad(25)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    direction = rot[:, [2, 0, 1]] * np.array(flip)  # permuted, oblique, optionally flipped axes
    spacing = np.array([0.8, 1.1, 1.4])
    n = np.round(80 / spacing).astype(int)
    m2 = make_ijk_to_ras(spacing, direction, -direction @ (spacing * (n - 1) / 2))
    other = phantoms.render(5, (n[2], n[1], n[0]), m2, centre=[0, 0, 0], half_fov=32.0)

    def centroid_and_volume(ph, value):
        ijk = np.argwhere(ph.labels.array == value)[:, ::-1]
        ras = ph.labels.ijk_to_ras_points(ijk)
        inside = np.all(np.abs(ras) < 28, axis=1)  # a box inside both grids
        return ras[inside].mean(axis=0), inside.sum() * ph.labels.voxel_volume_ml

    for value in (phantoms.VESSEL, phantoms.NERVE):
        c1, v1 = centroid_and_volume(reference, value)
        c2, v2 = centroid_and_volume(other, value)
        assert np.linalg.norm(c1 - c2) < 1.0, value
        assert abs(v1 - v2) / v1 < 0.12, value


def test_random_grid_is_oblique_anisotropic_and_deterministic():
    shape_a, m_a = phantoms.random_grid(np.random.default_rng([5, 7]))
    shape_b, m_b = phantoms.random_grid(np.random.default_rng([5, 7]))
    assert shape_a == shape_b and np.array_equal(m_a, m_b)
    spacings = set()
    for s in range(20):
        _, m = phantoms.random_grid(np.random.default_rng([s, 7]))
        sp = np.linalg.norm(m[:3, :3], axis=0)
        spacings.add(bool(np.ptp(sp) > 0.05))
        direction = m[:3, :3] / sp
        assert np.allclose(direction.T @ direction, np.eye(3), atol=1e-9)
    assert True in spacings


def test_seed_ranges_do_not_overlap():
    assert phantoms.DEMO_SEED not in phantoms.TRAINING_SEEDS
    assert phantoms.DEMO_SEED not in phantoms.HELD_OUT_SEEDS
    assert phantoms.HELD_OUT_SEEDS.start >= phantoms.TRAINING_SEEDS.stop


def test_blood_pool_is_not_vessel_and_hides_what_the_trees_route_through_it():
    """The demo phantom has a contrast pool that its vessel tree crosses: inside it, no vessel or nerve, one level."""
    ph = phantoms.make_phantom(phantoms.DEMO_SEED)
    pool = ph.blood_pool_mask
    assert pool is not None and pool.sum() > 10_000
    from scipy import ndimage

    core = ndimage.binary_erosion(pool, iterations=3)  # away from the pool's partial-volume rim
    assert not np.isin(ph.labels.array[pool], (phantoms.VESSEL, phantoms.NERVE)).any()
    hu = ph.image.array[core].astype(np.float64)
    assert hu.mean() > 250  # contrast-filled, as bright as the vessels next to it
    assert hu.std() < 40  # a uniform pool (noise only): no vessel drawn inside it
    vessel_hu = ph.image.array[ndimage.binary_erosion(ph.labels.array == phantoms.VESSEL, iterations=1)]
    assert abs(np.median(vessel_hu) - hu.mean()) < 120  # as bright as the vessels: a true look-alike
    assert not ph.aneurysm or (ph.aneurysm_mask & pool).sum() == 0
