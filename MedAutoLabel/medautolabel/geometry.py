"""The one place where the engine's geometry meets other conventions.

Inside the engine an image is ``Image``: ``array[k, j, i]`` and a 4x4 ``ijk_to_ras``. At the edges:

- SimpleITK / ITK / DICOM / NRRD files: physical space is LPS; ``sitk.GetArrayFromImage`` gives
  (k, j, i) too, so only the matrix changes: ``ijk_to_lps = diag(-1, -1, 1, 1) @ ijk_to_ras``.
- nibabel / MONAI: arrays are (i, j, k) with an (i, j, k) -> RAS affine, so the matrix is the same
  and the array is transposed.

Voxel order is never changed by a conversion: voxel (i, j, k) stays at the same physical point.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from medautolabel.image import Image

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse


def ras_affine_to_lps(affine: np.ndarray) -> np.ndarray:
    """A 4x4 (or 3x3) matrix mapping into RAS -> the same mapping into LPS."""
    m = np.asarray(affine, dtype=np.float64)
    return LPS_FROM_RAS[: m.shape[0], : m.shape[0]] @ m


def lps_affine_to_ras(affine: np.ndarray) -> np.ndarray:
    """A 4x4 (or 3x3) matrix mapping into LPS -> the same mapping into RAS."""
    return ras_affine_to_lps(affine)


def matrix_from_spacing_direction_origin(spacing: Sequence[float], direction: Sequence[float],
                                         origin: Sequence[float]) -> np.ndarray:
    """ITK geometry (spacing, row-major 3x3 direction, origin; all in one space) -> 4x4 ijk matrix."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) * np.asarray(spacing, dtype=np.float64)
    m[:3, 3] = np.asarray(origin, dtype=np.float64)
    return m


def spacing_direction_origin_from_matrix(
        ijk_matrix: np.ndarray) -> Tuple[Tuple[float, ...], Tuple[float, ...], Tuple[float, ...]]:
    """4x4 ijk matrix -> ITK geometry (spacing, row-major 3x3 direction, origin) in the same space."""
    m = np.asarray(ijk_matrix, dtype=np.float64)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(m)) or abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise ValueError("degenerate voxel matrix (zero voxel size, collinear axes or non-finite values)")
    direction = m[:3, :3] / spacing
    return (tuple(float(s) for s in spacing), tuple(float(d) for d in direction.ravel()),
            tuple(float(o) for o in m[:3, 3]))


def ijk_to_lps(image: Image) -> np.ndarray:
    """The image's (i, j, k) -> LPS matrix."""
    return ras_affine_to_lps(image.ijk_to_ras)


# --- SimpleITK -------------------------------------------------------------------------------

_SITK_SAFE_DTYPES = {np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32,
                                           np.uint64, np.int64, np.float32, np.float64)}


def image_from_sitk(sitk_image: Any, meta: Optional[Dict[str, Any]] = None) -> Image:
    """A 3D scalar SimpleITK image (LPS) -> ``Image`` (RAS); the voxel array is copied."""
    import SimpleITK as sitk

    if sitk_image.GetDimension() != 3 or sitk_image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"need a 3D scalar image, got {sitk_image.GetDimension()}D with "
                         f"{sitk_image.GetNumberOfComponentsPerPixel()} component(s) per voxel")
    lps = matrix_from_spacing_direction_origin(sitk_image.GetSpacing(), sitk_image.GetDirection(),
                                               sitk_image.GetOrigin())
    array = sitk.GetArrayFromImage(sitk_image)  # (k, j, i), a copy
    return Image(array, lps_affine_to_ras(lps), dict(meta or {}))


def image_to_sitk(image: Image) -> Any:
    """``Image`` (RAS) -> SimpleITK image (LPS) with the same voxels at the same physical points."""
    import SimpleITK as sitk

    array = np.asarray(image.array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype not in _SITK_SAFE_DTYPES:
        array = array.astype(np.float32)
    out = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
    spacing, direction, origin = spacing_direction_origin_from_matrix(ijk_to_lps(image))
    out.SetSpacing(spacing)
    out.SetDirection(direction)
    out.SetOrigin(origin)
    return out


# --- nibabel / MONAI: array (i, j, k) + RAS affine ------------------------------------------------

def image_from_ijk_array(array_ijk: Any, affine_ras: Any, meta: Optional[Dict[str, Any]] = None) -> Image:
    """nibabel/MONAI style (array (i, j, k), (i, j, k) -> RAS affine) -> ``Image``.

    Accepts numpy arrays or torch tensors (e.g. a MONAI ``MetaTensor`` without its channel axis and
    its ``.affine``). The voxels are copied into a C-contiguous (k, j, i) array.
    """
    array = _to_numpy(array_ijk)
    if array.ndim != 3:
        raise ValueError(f"need a 3D (i, j, k) array, got shape {array.shape}")
    affine = _to_numpy(affine_ras).astype(np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"need a 4x4 affine, got shape {affine.shape}")
    return Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine.copy(), dict(meta or {}))


def image_to_ijk_array(image: Image) -> Tuple[np.ndarray, np.ndarray]:
    """``Image`` -> nibabel/MONAI style ``(array (i, j, k), (i, j, k) -> RAS affine)`` (both copies)."""
    return np.ascontiguousarray(image.array.transpose(2, 1, 0)), image.ijk_to_ras.copy()


def image_from_nibabel(nib_image: Any, meta: Optional[Dict[str, Any]] = None) -> Image:
    """A 3D nibabel image (e.g. ``Nifti1Image``) -> ``Image``; its ``affine`` is RAS already."""
    return image_from_ijk_array(np.asanyarray(nib_image.dataobj), nib_image.affine, meta)


def image_to_nibabel(image: Image) -> Any:
    """``Image`` -> ``nibabel.Nifti1Image`` (sform and qform set from ``ijk_to_ras``)."""
    import nibabel as nib

    array, affine = image_to_ijk_array(image)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    out = nib.Nifti1Image(array, affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor / MONAI MetaTensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def reorient(array: np.ndarray, ijk_to_ras: np.ndarray, codes: str) -> Tuple[np.ndarray, np.ndarray]:
    """Permute/flip the axes (a view, no interpolation) so that i, j, k point along ``codes`` (e.g. "RAS").

    Axis codes follow nibabel/MONAI: "RAS" means i increases towards Right, j towards Anterior,
    k towards Superior. For oblique grids each axis goes to the closest direction.
    """
    from nibabel import orientations as ornt

    shape_ijk = array.shape[::-1]
    current = ornt.io_orientation(ijk_to_ras)
    transform = ornt.ornt_transform(current, ornt.axcodes2ornt(tuple(codes)))
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return array, np.array(ijk_to_ras, dtype=np.float64)
    out_ijk = ornt.apply_orientation(array.T, transform)  # .T views (k, j, i) as (i, j, k)
    matrix = np.asarray(ijk_to_ras, dtype=np.float64) @ ornt.inv_ornt_aff(transform, shape_ijk)
    return out_ijk.T, matrix
