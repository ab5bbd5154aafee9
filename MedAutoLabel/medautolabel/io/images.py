"""Read and write image files: NIfTI, NRRD, MetaImage files and DICOM series folders (SimpleITK).

Every problem with an input becomes one ``InputError`` line naming the file; library tracebacks and
messages are never passed on (DICOM messages could carry patient data). What no library would
refuse is checked first: pipes, devices and link loops, headers claiming more voxels than the
machine's memory or the file, zero/negative/NaN voxel sizes, singular or NaN axis directions. ``Image.meta`` gets
non-identifying facts only: ``source_name`` (file or folder name), ``format``, ``modality`` (DICOM
0008|0060, else None) and, for DICOM stacks that needed it, a note on the geometry correction.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from medautolabel.errors import InputError, MedAutoLabelError
from medautolabel.geometry import image_from_sitk, image_to_sitk, lps_affine_to_ras
from medautolabel.image import Image
from medautolabel.io.atomic import atomic_output
from medautolabel.io.ownership import labelmap_tags
from medautolabel.limits import exceeds_memory, human_bytes, memory_problem, voxel_count
from medautolabel.text import escaped, printable

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

# extension -> (ITK ImageIO, format name); longest extensions are matched first
READ_FORMATS = {
    ".nii.gz": ("NiftiImageIO", "NIfTI"), ".nii": ("NiftiImageIO", "NIfTI"),
    ".nrrd": ("NrrdImageIO", "NRRD"), ".nhdr": ("NrrdImageIO", "NRRD"),
    ".mha": ("MetaImageIO", "MetaImage"), ".mhd": ("MetaImageIO", "MetaImage"),
}
WRITE_FORMATS = (".nrrd", ".nii.gz", ".nii", ".mha")  # single-file formats only (atomic rename)
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")

_SUPPORTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series folder"


def extension(path: PathLike) -> str:
    """The lower-case format extension of ``path`` (``.nii.gz`` counts as one), or ``""``."""
    name = Path(path).name.lower()
    for ext in sorted(list(READ_FORMATS) + list(DICOM_EXTENSIONS), key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return Path(name).suffix


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """Keep ITK/GDCM warnings off the console while reading (they may quote header values)."""
    import SimpleITK as sitk

    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


# --- reading -----------------------------------------------------------------------------------

def read_image(path: PathLike) -> Image:
    """Read a 3D scalar image from a file or a DICOM series folder; raise ``InputError`` if impossible.

    ``meta`` also gets ``source_path`` (for messages only, never written), ``labelmap_evidence`` when the file is a
    segmentation or labelmap (``pipeline.label_image`` refuses those as images; training and
    evaluation read labelmaps with this same function) and ``input_repairs`` when the voxels had
    to be corrected (DICOM slices interpolated).
    """
    p = Path(path)
    _check_path(p)
    if p.is_dir():
        if extension(p) in READ_FORMATS:
            raise InputError("is a folder, not an image file", p)
        return read_dicom_series(p)
    ext = extension(p)
    if ext in DICOM_EXTENSIONS:
        return read_dicom_series(p.parent, series_of=p)
    if ext not in READ_FORMATS:
        raise InputError(f"unsupported file type '{ext or p.name}': expected {_SUPPORTED}", p)
    if p.stat().st_size == 0:
        raise InputError("the file is empty", p)
    if ext in (".nhdr", ".mhd"):
        _check_detached_data(p)
    return _read_file(p, *READ_FORMATS[ext])


def _check_detached_data(p: Path) -> None:
    """Refuse a detached header (.nhdr, .mhd) whose data file is no regular file (/dev/zero, a pipe, a folder).

    ITK would read a device or a pipe as voxel data: endless zeros, or a read that never ends.
    """
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 16).decode("latin-1")
    except OSError:
        return
    for line in head.splitlines():
        key, sep, value = line.partition("=" if p.suffix.lower() == ".mhd" else ":")
        if not sep or key.strip().lower() not in ("data file", "datafile", "elementdatafile"):
            continue
        name = value.strip()
        if not name or name.upper() in ("LOCAL", "LIST") or name.upper().startswith("LIST ") or " " in name:
            return  # data in the header file, or a list/pattern of files: ITK checks those
        data = Path(name) if Path(name).is_absolute() else p.parent / name
        if data.exists() and not data.is_file():
            raise InputError(f"its data file {name!r} is not a regular file (a device, pipe or folder)", p)
        return


def _check_path(p: Path) -> None:
    """Refuse what is no readable file or folder before any library touches it (a FIFO would block).

    A name with control characters (a newline, an escape sequence) is refused too: it would end up in
    output names, CSV rows and terminal lines; the message shows it with those characters escaped.
    """
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in p.name):
        raise InputError("the file name holds control characters (shown escaped): rename it", escaped(p))
    if p.is_symlink() and not p.exists():  # exists() is False for a dangling link and for a loop of links
        raise InputError("a symbolic link that leads nowhere (dangling, or a loop of links)", p)
    if not p.exists():
        raise InputError("no such file or folder", p)
    if not p.is_dir() and not p.is_file():
        raise InputError("not a regular file (a pipe, socket or device), which cannot be read as an image", p)
    try:
        if p.is_dir():
            with os.scandir(p) as entries:
                next(entries, None)
        else:
            with open(p, "rb"):
                pass
    except OSError as e:
        raise InputError(f"cannot be read ({os.strerror(e.errno) if e.errno else type(e).__name__})", p) from None


def _read_file(p: Path, image_io: str, fmt: str) -> Image:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO(image_io)
    reader.SetFileName(str(p))
    meta: Dict[str, Any] = {"source_name": p.name, "source_path": str(p), "format": fmt, "modality": None}
    if fmt == "NIfTI":
        _check_nifti_header(p)  # before ITK: it replaces a zero or NaN voxel size by 1 mm, and prints
    with _quiet_itk():
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            raise InputError(_header_problem(str(e), fmt), p) from None
        evidence = _labelmap_evidence(reader, p)
        try:
            _check_3d_scalar(reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(),
                             reader.GetPixelID(), p)
        except InputError:
            if evidence:
                raise InputError(f"is a segmentation/labelmap, not an image ({evidence})", p) from None
            raise
        if evidence:
            meta["labelmap_evidence"] = evidence
        _check_header_geometry(reader, p)
        _check_claimed_size(reader, p, fmt)
        # ITK pads a short NIfTI with zeros and turns NaN into 0 instead of failing: the file is also
        # decompressed on a second thread to count its bytes and find non-finite voxels while ITK
        # reads it, so the check adds little to the reading time
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="medautolabel-check") as pool:
            scan = pool.submit(_scan_nifti_voxels, p) if fmt == "NIfTI" else None
            try:
                img = reader.Execute()
            except RuntimeError:
                raise InputError(f"the {fmt} file is truncated or corrupt: its voxel data cannot be read",
                                 p) from None
            finally:
                non_finite = scan.result() if scan is not None else None  # InputError if the file is short
    if img.GetDimension() == 4:  # (x, y, z, 1): a 3D volume stored as 4D
        img = sitk.Extract(img, list(img.GetSize()[:3]) + [0], [0, 0, 0, 0])
    image = _to_image(img, p, meta)
    if non_finite is not None and image.array.dtype.kind == "f" and non_finite.size == image.array.size:
        image.array.reshape(-1)[non_finite] = np.nan  # as stored: pipeline.label_image repairs or refuses
    return image


# NIFTI_INTENT_LABEL (nifti1.h): the voxels are label indices, not intensities
_NIFTI_INTENT_LABEL = "1002"
# zlib/gzip (NIfTI's only compression) cannot shrink data by more than about 1032:1
_MAX_DEFLATE_RATIO = 1100


def _labelmap_evidence(reader: Any, p: Path) -> Optional[str]:
    """Why the file is a segmentation or labelmap rather than an image, or None."""
    keys = reader.GetMetaDataKeys()
    if any(k.startswith("Segment0_") for k in keys):
        return "a Slicer segmentation: its header has Segment0_* keys"
    if "intent_code" in keys and reader.GetMetaData("intent_code").strip() == _NIFTI_INTENT_LABEL:
        return "its NIfTI intent code is NIFTI_INTENT_LABEL"
    tags = labelmap_tags(p)
    if tags is not None:
        return f"a medautolabel labelmap: {tags.name} names it as its labelmap_file"
    return None


def _check_header_geometry(reader: Any, p: Path) -> None:
    """Refuse voxel sizes, origins and axis directions no scanner writes (zero, negative, NaN, singular)."""
    spacing = np.asarray(reader.GetSpacing(), dtype=np.float64)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        shown = " x ".join(f"{s:g}" for s in spacing)
        raise InputError(f"the header gives a voxel size of {shown} mm; each must be a finite number > 0", p)
    if not np.all(np.isfinite(np.asarray(reader.GetOrigin(), dtype=np.float64))):
        raise InputError("the header's origin is not a finite position", p)
    n = len(spacing)
    direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(n, n)[:3, :3]
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        raise InputError("the header's axis directions are not finite or do not span 3D space (singular matrix)", p)


def _check_claimed_size(reader: Any, p: Path, fmt: str) -> None:
    """Refuse a header claiming more voxels than this machine can hold, or than the file can contain."""
    import SimpleITK as sitk

    size = [int(s) for s in reader.GetSize()]
    voxels = voxel_count(size)
    component = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID()).GetSizeOfPixelComponent()
    shape = "x".join(str(s) for s in size)
    _check_fits_in_memory(size, component, p)
    on_disk = p.stat().st_size
    if fmt == "NIfTI" and voxels * component > on_disk * _MAX_DEFLATE_RATIO:
        raise InputError(f"the header claims {shape} voxels ({human_bytes(voxels * component)}) but the file "
                         f"holds only {human_bytes(on_disk)}: it is truncated or corrupt", p)


def _check_fits_in_memory(shape: List[int], itemsize: int, p: Path) -> None:
    """Refuse a header whose voxels (at least 4 bytes each: the engine works on a float32 copy) exceed the memory."""
    nbytes = voxel_count(shape) * max(int(itemsize), 4)
    if exceeds_memory(nbytes):
        raise InputError(memory_problem(nbytes, f"the header's {'x'.join(str(n) for n in shape)} voxels"), p)


def _nifti_header(p: Path) -> Any:
    """The NIfTI-1/2 header as stored (nibabel's class, without its fix-ups and log lines), or None."""
    import gzip
    import zlib

    import nibabel as nib

    try:
        with (gzip.open(p, "rb") if extension(p) == ".nii.gz" else open(p, "rb")) as f:
            raw = f.read(540)
    except (OSError, EOFError, zlib.error):
        return None
    for cls in (nib.Nifti1Header, nib.Nifti2Header):
        size = cls.sizeof_hdr
        if len(raw) >= size and size in (int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")):
            try:
                return cls(raw[:size], check=False)
            except Exception:  # noqa: BLE001 - not NIfTI to nibabel: ITK gives the verdict
                return None
    return None


def _check_nifti_header(p: Path) -> None:
    """Refuse NIfTI geometry fields that are zero, negative or NaN, complex voxels and absurd sizes.

    ITK silently reads a zero or NaN voxel size as 1 mm and a NaN quaternion as the identity,
    which would label the image at a wrong scale or place; and it prints library messages to the
    terminal on the way. So the raw header is checked first.
    """
    header = _nifti_header(p)
    if header is None:
        return
    n = max(1, min(int(header["dim"][0]), 3))
    pixdim = np.asarray(header["pixdim"][1:1 + n], dtype=np.float64)
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0):
        shown = " x ".join(f"{s:g}" for s in pixdim)
        raise InputError(f"the header gives a voxel size of {shown} mm; each must be a finite number > 0", p)
    if int(header["qform_code"]) > 0:
        q = [header[k] for k in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")]
        if not np.all(np.isfinite(np.asarray(q, dtype=np.float64))):
            raise InputError("the header's qform (orientation quaternion or origin) is not finite", p)
    if int(header["sform_code"]) > 0:
        rows = np.asarray([header["srow_x"], header["srow_y"], header["srow_z"]], dtype=np.float64)
        if not np.all(np.isfinite(rows)) or abs(np.linalg.det(rows[:, :3])) < 1e-12:
            raise InputError("the header's axis directions are not finite or do not span 3D space "
                             "(singular sform matrix)", p)
    if header.get_data_dtype().kind == "c":
        raise InputError("the image has complex voxel values; a real-valued 3D image is needed", p)
    try:
        shape = [int(n) for n in header.get_data_shape()]
    except Exception:  # noqa: BLE001 - an impossible dim field: ITK gives the verdict
        return
    _check_fits_in_memory(shape, header.get_data_dtype().itemsize, p)


def _scan_nifti_voxels(p: Path) -> Optional[np.ndarray]:
    """Check a NIfTI file holds all the voxel bytes its header announces; find its non-finite voxels.

    Raises ``InputError`` if the file is short (ITK would pad it with zeros). For float data it
    returns a flat boolean mask (file order, which is the order of ITK's ``(k, j, i)`` array) of the
    NaN/infinite voxels, or None when there are none: ITK's NIfTI reader silently turns them into 0,
    which on CT is water, not the missing value they stand for.
    """
    import gzip
    import zlib

    header = _nifti_header(p)
    if header is None:
        return None
    try:
        offset, dtype = int(header["vox_offset"]), header.get_data_dtype()
        count = int(np.prod(header.get_data_shape()))
    except Exception:  # noqa: BLE001 - ITK could read the header; leave the verdict to it
        return None
    floats = dtype.kind == "f"
    mask: Optional[np.ndarray] = None
    if extension(p) == ".nii" and not floats:
        actual = p.stat().st_size
    else:
        try:
            with (gzip.open(p, "rb") if extension(p) == ".nii.gz" else open(p, "rb")) as f:
                actual, seen = len(f.read(offset)), 0
                block = (1 << 22) // dtype.itemsize * dtype.itemsize
                for chunk in iter(lambda: f.read(block), b""):
                    actual += len(chunk)
                    n = min(len(chunk) // dtype.itemsize, count - seen)
                    if floats and n > 0:
                        bad = ~np.isfinite(np.frombuffer(chunk, dtype, count=n))
                        if bad.any():
                            mask = np.zeros(count, dtype=bool) if mask is None else mask
                            mask[seen:seen + n] = bad
                        seen += n
        except (OSError, EOFError, zlib.error):
            actual = -1
    if actual < offset + count * dtype.itemsize:
        raise InputError("the NIfTI file is truncated or corrupt: its voxel data cannot be read", p)
    return mask


def _header_problem(message: str, fmt: str) -> str:
    if "orthonormal" in message.lower():
        return f"the {fmt} file's voxel axes are not orthogonal (sheared matrix), which cannot be read"
    return f"not a readable {fmt} file (wrong format, truncated or corrupt header)"


def _check_3d_scalar(dim: int, size: Tuple[int, ...], components: int, pixel_id: int, p: Path) -> None:
    import SimpleITK as sitk

    shape = "x".join(str(s) for s in size)
    if components != 1:
        raise InputError(f"the image has {components} values per voxel (vector, RGB or multi-channel); "
                         "a single-channel 3D image is needed", p)
    if "complex" in sitk.GetPixelIDValueAsString(pixel_id).lower():
        raise InputError("the image has complex voxel values; a real-valued 3D image is needed", p)
    if dim == 4 and size[3] == 1:
        size = size[:3]
    elif dim == 4:
        raise InputError(f"the image is 4D ({shape}: a time series or several volumes); "
                         "a single 3D volume is needed", p)
    if dim < 3 or len(size) != 3 or min(size) < 2:
        raise InputError(f"the image is {'2D' if dim <= 3 else f'{dim}D'} ({shape}); "
                         "a 3D volume (at least 2 voxels along each axis) is needed", p)


def _to_image(img: Any, p: Path, meta: Dict[str, Any]) -> Image:
    try:
        return image_from_sitk(img, meta)
    except ValueError:
        raise InputError("the image geometry is degenerate (zero voxel size or collinear axes)", p) from None


# --- DICOM ---------------------------------------------------------------------------------------

def read_dicom_series(folder: PathLike, series_of: Optional[PathLike] = None) -> Image:
    """Read one DICOM series from ``folder``: the one holding ``series_of``, else the largest one.

    Slice positions are taken from every slice's ImagePositionPatient. A stack whose slices are
    sheared (CT gantry tilt) or unevenly spaced cannot be described by one matrix: it is resampled
    (linearly, between neighbouring slices) onto a regular grid orthogonal to the slices, so every
    voxel keeps its true physical position; ``meta["geometry_corrected"]`` then says what was done.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    with _quiet_itk():
        files = _series_files(folder, series_of)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()
        reader.LoadPrivateTagsOff()
        try:
            img = reader.Execute()
        except RuntimeError:
            raise InputError("cannot read the DICOM series (a file is truncated or corrupt, or the "
                             "slices differ in size or type)", folder) from None
    _check_3d_scalar(img.GetDimension(), img.GetSize(), img.GetNumberOfComponentsPerPixel(),
                     img.GetPixelID(), folder)
    meta: Dict[str, Any] = {"source_name": folder.name, "source_path": str(folder), "format": "DICOM",
                            "modality": _tag(reader, 0, "0008|0060"), "number_of_slices": len(files)}
    positions = _slice_positions(reader, len(files), folder)
    return _dicom_image(img, positions, meta, folder)


def _series_files(folder: Path, series_of: Optional[PathLike]) -> List[str]:
    import SimpleITK as sitk

    try:
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError:
        ids = ()
    if not ids:
        raise InputError("no DICOM series found in this folder (for an image file, give the file itself)",
                         folder)
    series = {sid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid)) for sid in ids}
    if series_of is not None:
        wanted = Path(series_of).resolve()
        chosen = next((sid for sid, files in series.items() if any(Path(f).resolve() == wanted for f in files)),
                      None)
        if chosen is None:
            raise InputError("not a readable DICOM image file", series_of)
    else:
        chosen = max(series, key=lambda sid: len(series[sid]))
        if len(series) > 1:
            log.info("%s: %d DICOM series found; reading the one with the most slices", printable(folder.name), len(series))
    _check_no_unreadable_slices(folder, chosen, {Path(f).name for files in series.values() for f in files})
    return series[chosen]


def _check_no_unreadable_slices(folder: Path, series_uid: str, readable: set) -> None:
    """Refuse a series when a file of it exists but GDCM skipped it (truncated or corrupt slice)."""
    uid = series_uid.encode("ascii", "ignore")
    for f in folder.iterdir():
        if f.name in readable or not f.is_file():
            continue
        try:
            with open(f, "rb") as fh:
                head = fh.read(1 << 16)
        except OSError:
            continue
        if head[128:132] == b"DICM" and uid and uid in head:
            raise InputError("a slice of the DICOM series cannot be read (truncated or corrupt file), so "
                             "the series is incomplete", folder)


def _tag(reader: Any, index: int, key: str) -> Optional[str]:
    if not reader.HasMetaDataKey(index, key):
        return None
    value = reader.GetMetaData(index, key).strip()
    return value or None


def _slice_positions(reader: Any, n: int, folder: Path) -> np.ndarray:
    """(n, 3) LPS ImagePositionPatient of each slice, in the reader's slice order."""
    rows = []
    for s in range(n):
        value = _tag(reader, s, "0020|0032")
        try:
            xyz = [float(v) for v in (value or "").split("\\")]
        except ValueError:
            xyz = []
        if len(xyz) != 3:
            raise InputError("a DICOM slice has no valid ImagePositionPatient, so the slices cannot be "
                             "placed in space", folder)
        rows.append(xyz)
    return np.asarray(rows, dtype=np.float64)


def _dicom_image(img: Any, positions: np.ndarray, meta: Dict[str, Any], folder: Path) -> Image:
    """Build the Image from the in-plane geometry of ITK and the true position of every slice."""
    import SimpleITK as sitk

    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    row, col = direction[:, 0], direction[:, 1]  # LPS unit vectors along i (columns) and j (rows)
    si, sj = img.GetSpacing()[:2]
    normal = np.cross(row, col)
    rel = positions - positions[0]
    h = rel @ normal
    if h[-1] < 0:
        normal, h = -normal, -h
    gaps = np.diff(h)
    if np.any(gaps <= 1e-3):
        raise InputError("DICOM slices share a position or are out of order (several acquisitions "
                         "mixed in one series?)", folder)
    a, b = rel @ row / si, rel @ col / sj  # in-plane shift of each slice, in voxels
    step = float(h[-1] / (len(h) - 1))
    tol = 0.05 * min(si, sj, step)
    array = sitk.GetArrayFromImage(img)
    if np.all(np.abs(h - step * np.arange(len(h))) < tol) and np.all(np.abs(a * si) < tol) \
            and np.all(np.abs(b * sj) < tol):
        lps = _matrix(row * si, col * sj, normal * step, positions[0])
        return Image(array, lps_affine_to_ras(lps), meta)
    median = float(np.median(gaps))
    if gaps.max() > 3.0 * median:
        raise InputError(f"DICOM slices are missing: a gap of {gaps.max():.2f} mm in a series spaced "
                         f"{median:.2f} mm", folder)
    stack = float(np.degrees(np.arccos(np.clip(abs(rel[-1] @ normal) / np.linalg.norm(rel[-1]), 0, 1))))
    out, shift = _regularise(array, a, b, h, median)
    origin = positions[0] + shift[0] * si * row + shift[1] * sj * col
    lps = _matrix(row * si, col * sj, normal * median, origin)
    meta["gantry_tilt_deg"] = round(stack, 2)
    meta["geometry_corrected"] = (
        f"slices tilted by {stack:.1f} deg and spaced {gaps.min():.2f}-{gaps.max():.2f} mm: "
        f"resampled onto a regular {median:.2f} mm grid orthogonal to the slices")
    meta["input_repairs"] = [_geometry_repair(gaps, median, meta["geometry_corrected"])]
    log.info("%s: %s", printable(folder.name), meta["geometry_corrected"])  # recorded in input_repairs, not printed
    return Image(out, lps_affine_to_ras(lps), meta)


def _geometry_repair(gaps: np.ndarray, step: float, detail: str) -> Dict[str, Any]:
    """The ``input_repairs`` record of a regularised DICOM stack: how many slices were missing and where.

    A gap of about n x the usual spacing means n - 1 missing slices; their voxels are interpolated
    linearly from the neighbouring slices, which the record says so that it reaches tags.json and
    the Slicer panel rather than passing for measured data.
    """
    missing = [(int(s), float(g), int(round(g / step)) - 1) for s, g in enumerate(gaps) if g > 1.5 * step]
    return {"problem": "missing DICOM slices" if missing else "tilted or unevenly spaced DICOM slices",
            "missing_slices": sum(n for _, _, n in missing),
            "gaps": [{"after_slice": s, "gap_mm": round(g, 3)} for s, g, _ in missing],
            "slice_spacing_mm": round(step, 3),
            "replaced_by": "linear interpolation between the neighbouring slices",
            "detail": detail}


def _matrix(ci: np.ndarray, cj: np.ndarray, ck: np.ndarray, origin: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = ci, cj, ck, origin
    return m


def _regularise(array: np.ndarray, a: np.ndarray, b: np.ndarray, h: np.ndarray,
                step: float) -> Tuple[np.ndarray, Tuple[float, float]]:
    """Resample slices at in-plane shifts (a, b) voxels and heights h mm onto a regular stack.

    Returns the (k, j, i) array and the in-plane (i, j) voxel offset of its origin from slice 0's.
    """
    from scipy import ndimage

    fill = float(array.min())
    a0, b0 = float(a.min()), float(b.min())
    n_rows, n_cols = array.shape[1:]
    shape = (n_rows + math.ceil(b.max() - b0 - 1e-6), n_cols + math.ceil(a.max() - a0 - 1e-6))

    def placed(s: int) -> np.ndarray:
        canvas = np.full(shape, fill, dtype=np.float32)
        canvas[:n_rows, :n_cols] = array[s]
        return ndimage.shift(canvas, (b[s] - b0, a[s] - a0), order=1, mode="constant", cval=fill)

    n_out = math.floor(h[-1] / step + 0.01) + 1  # positions are rounded text: 5.99999 steps are 6
    out = np.empty((n_out,) + shape, dtype=np.float32)
    for k in range(n_out):
        t = k * step
        s1 = int(min(np.searchsorted(h, t, side="right"), len(h) - 1))
        s0 = s1 - 1
        w = float(np.clip((t - h[s0]) / (h[s1] - h[s0]), 0.0, 1.0))
        out[k] = placed(s0) if w < 1e-6 else placed(s1) if w > 1 - 1e-6 else \
            (1 - w) * placed(s0) + w * placed(s1)
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        out = np.clip(np.rint(out), info.min, info.max).astype(array.dtype)
    return out, (a0, b0)


# --- writing -----------------------------------------------------------------------------------

def write_image(image: Image, path: PathLike, atomic: bool = True, compress: Optional[bool] = None) -> Path:
    """Write ``image`` as .nrrd, .nii.gz, .nii or .mha (by extension); return the path.

    With ``atomic`` (the default) the file appears complete or not at all; ``atomic=False`` is for
    callers that already write to a temporary name (see ``atomic.atomic_outputs``). ``compress``
    defaults to yes except for .nii; ``False`` is for fast hand-overs between processes.
    """
    import SimpleITK as sitk

    p = Path(path)
    ext = extension(p)
    if ext not in WRITE_FORMATS:
        raise MedAutoLabelError(f"cannot write '{ext or p.name}' files: use one of {', '.join(WRITE_FORMATS)}",
                                p)
    try:
        sitk_image = image_to_sitk(image)
    except ValueError as e:
        raise MedAutoLabelError(f"cannot write the image: {e}", p) from None
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(p) if atomic else contextlib.nullcontext(p) as target:
        try:
            sitk.WriteImage(sitk_image, str(target), useCompression=ext != ".nii" if compress is None else compress)
        except RuntimeError:
            raise MedAutoLabelError("cannot write the image file (disk full or no permission?)", p) from None
    return p
