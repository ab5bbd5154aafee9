"""Preprocessed training cases in one HDF5 file (h5py; chunked, compressed).

Each case is run once through ``medautolabel.labelling.preprocess.preprocess`` -- the very function
inference uses -- and stored on the network grid: ``image`` (C, *spatial) float32 channels and
``label`` (*spatial) raw dataset label values (nearest-neighbour onto the same grid), plus a
random subset of voxel indices per label value (crop centres). Groups are named by the content
hash of the case's two files, so a renamed file is still a hit.

The file is valid for one preprocessing (input channels + preprocessing section of the card);
when that changes it is rebuilt. Files are recognised by path + size + mtime (then their stored
sha256 is trusted) or, failing that, by their sha256. Nothing is ever rewritten in place: a new
file is assembled next to the old one (reused groups are copied, not recomputed) and renamed.
Epochs then read crops straight from the chunks, so datasets larger than memory stream from disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from medautolabel.catalog.modelcard import ModelCard
from medautolabel.io.atomic import atomic_output
from medautolabel.labelling.preprocess import preprocess, resample
from medautolabel.runtime.network import file_sha256
from medautolabel.training.config import Cache as CacheConfig
from medautolabel.training.config import ConfigError
from medautolabel.training.data import Case, read_image

FORMAT = "medautolabel-training-cache/1"
CHUNK = 32  # voxels per chunk side: a 64^3 crop touches 27-64 chunks


def preprocessing_key(card: Dict[str, Any]) -> str:
    """Hash of everything that shapes the cached arrays."""
    spec = {"format": FORMAT, "input": card["input"], "preprocessing": card["preprocessing"]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def default_cache_path(dataset_root: Path) -> Path:
    """<user cache dir>/medautolabel/training/<hash of the dataset folder>.h5"""
    base = os.environ.get("XDG_CACHE_HOME") or os.environ.get("LOCALAPPDATA") or str(Path.home() / ".cache")
    tag = hashlib.sha256(str(dataset_root.resolve()).encode()).hexdigest()[:16]
    return Path(base) / "medautolabel" / "training" / f"{tag}.h5"


@dataclass
class CacheReport:
    path: Path
    built: int  # cases preprocessed now
    reused: int  # cases taken from the existing file
    rebuilt_all: bool  # the preprocessing changed (or there was no valid file)
    seconds: float
    bytes: int
    case_keys: List[str]  # group name per case, in the order given
    file_shas: List[str]  # sha256 of image and label per case, in order

    @property
    def hit(self) -> bool:
        return self.built == 0


def _stat(path: Path) -> Tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _compression(cfg: CacheConfig) -> Dict[str, Any]:
    if cfg.compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    if cfg.compression == "lzf":
        return {"compression": "lzf", "shuffle": True}
    return {}


def _file_shas(cases: Sequence[Case], known: Dict[str, List[Any]]) -> Tuple[List[str], Dict[str, List[Any]]]:
    """sha256 per file, trusting ``known`` {path: [size, mtime_ns, sha]} where size and mtime match."""
    shas, index = [], {}
    for c in cases:
        for f in (c.image, c.label):
            size, mtime = _stat(f)
            k = known.get(str(f))
            sha = k[2] if k and k[0] == size and k[1] == mtime else file_sha256(f)
            index[str(f)] = [size, mtime, sha]
            shas.append(sha)
    return shas, index


def _preprocess_case(case: Case, card: ModelCard) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
    """(image channels, label values) on the network grid, and the tensor's voxel spacing."""
    image, label = read_image(case.image), read_image(case.label)
    prepared = preprocess(image, card)
    lab = resample(label.array.astype(np.float32, copy=False), label.ijk_to_ras, prepared.net_shape,
                   prepared.net_ijk_to_ras, order=0)
    if prepared.axis_order == "ijk":
        lab = lab.T
    if lab.min() < 0 or lab.max() > 65535 or not np.array_equal(lab, np.rint(lab)):
        raise ConfigError(f"case {case.index}: label values must be whole numbers in 0..65535", case.label)
    dtype = np.uint8 if lab.max() < 256 else np.uint16
    return prepared.tensor[0].numpy(), np.ascontiguousarray(lab, dtype=dtype), prepared.tensor_spacing


def _class_indices(label: np.ndarray, limit: int, seed: int) -> Dict[int, np.ndarray]:
    """Flat voxel indices per label value, a random subset of at most ``limit`` each.

    Like MONAI's map_classes_to_indices with max_samples_per_class, but per *present* value (the
    number of classes is not known here) and with its own seeded generator (reproducible cache).
    """
    rng = np.random.default_rng(seed)
    flat = label.ravel()
    out = {}
    for v in np.unique(flat):
        idx = np.flatnonzero(flat == v)
        if idx.size > limit:
            idx = np.sort(rng.choice(idx, limit, replace=False))
        out[int(v)] = idx.astype(np.int64 if flat.size >= 2**31 else np.int32)
    return out


def build_cache(path: Path, cases: Sequence[Case], card: ModelCard, card_dict: Dict[str, Any], cfg: CacheConfig,
                progress: Optional[Callable[[int, int], None]] = None) -> CacheReport:
    """Make sure ``path`` holds every case preprocessed for ``card``; preprocess only what is missing."""
    import h5py

    t0 = time.perf_counter()
    key = preprocessing_key(card_dict)
    known: Dict[str, List[Any]] = {}
    have: set = set()
    valid = False
    if path.is_file():
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") == FORMAT and f.attrs.get("preprocessing_key") == key:
                    valid = True
                    known = json.loads(f.attrs.get("file_index", "{}"))
                    have = set(f["cases"].keys())
        except (OSError, KeyError, ValueError):  # damaged or foreign file: rebuild
            valid = False
    shas, index = _file_shas(cases, known)
    keys = [hashlib.sha256((shas[2 * n] + shas[2 * n + 1]).encode()).hexdigest()[:24] for n in range(len(cases))]
    missing = [n for n, k in enumerate(keys) if k not in have]
    if valid and not missing and all(known.get(p) == v for p, v in index.items()):
        return CacheReport(path, 0, len(cases), False, time.perf_counter() - t0, path.stat().st_size, keys, shas)

    path.parent.mkdir(parents=True, exist_ok=True)
    reused = 0
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as out:
            out.attrs["format"] = FORMAT
            out.attrs["preprocessing_key"] = key
            out.attrs["preprocessing"] = json.dumps({"input": card_dict["input"],
                                                     "preprocessing": card_dict["preprocessing"]})
            out.attrs["file_index"] = json.dumps(index)
            group = out.create_group("cases")
            if valid:
                with h5py.File(path, "r") as old:
                    for k in sorted(set(keys)):
                        if k in have:
                            old.copy(old["cases"][k], group, name=k)
                            reused += keys.count(k)
            for done, n in enumerate(missing):
                if keys[n] in group:
                    continue
                image, label, spacing = _preprocess_case(cases[n], card)
                g = group.create_group(keys[n])
                chunks = tuple(min(CHUNK, s) for s in label.shape)
                g.create_dataset("image", data=image, chunks=(image.shape[0],) + chunks, **_compression(cfg))
                g.create_dataset("label", data=label, chunks=chunks, **_compression(cfg))
                for v, idx in _class_indices(label, cfg.max_indices_per_class, int(keys[n][:8], 16)).items():
                    g.create_dataset(f"indices/{v}", data=idx)
                g.attrs["spacing"] = np.asarray(spacing, dtype=np.float64)
                if progress is not None:
                    progress(done + 1, len(missing))
    return CacheReport(path, len(cases) - reused, reused, not valid, time.perf_counter() - t0,
                       path.stat().st_size, keys, shas)


class CaseStore:
    """Read access to the cached cases (in memory when they fit, else crops straight from the file).

    The HDF5 handle is opened lazily per process, so data-loading workers each get their own.
    """

    def __init__(self, path: Path, keys: Sequence[str], in_memory: bool) -> None:
        self.path = Path(path)
        self.keys = list(keys)
        self.in_memory = in_memory
        self._file = None
        self._pid = None
        self._memory: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        self._indices: Dict[str, Dict[int, np.ndarray]] = {}
        self._shapes: Dict[str, Tuple[int, ...]] = {}
        f = self._h5()
        for k in set(self.keys):
            g = f["cases"][k]
            self._shapes[k] = tuple(g["label"].shape)
            self._indices[k] = {int(v): g["indices"][v][()] for v in g["indices"]}
            if in_memory:
                self._memory[k] = (g["image"][()], g["label"][()])
        self.spacing = tuple(float(s) for s in f["cases"][self.keys[0]].attrs["spacing"])
        self.channels = int(f["cases"][self.keys[0]]["image"].shape[0])
        if in_memory:
            self.close()

    @staticmethod
    def nbytes(path: Path, keys: Sequence[str]) -> int:
        """Uncompressed size of the given cases (to decide whether they fit in memory)."""
        import h5py

        total = 0
        with h5py.File(path, "r") as f:
            for k in set(keys):
                g = f["cases"][k]
                total += g["image"].size * g["image"].dtype.itemsize + g["label"].size * g["label"].dtype.itemsize
        return total

    def _h5(self):
        import h5py

        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __getstate__(self) -> Dict[str, Any]:  # workers reopen the file themselves
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def shape(self, n: int) -> Tuple[int, ...]:
        return self._shapes[self.keys[n]]

    def indices(self, n: int) -> Dict[int, np.ndarray]:
        return self._indices[self.keys[n]]

    def read(self, n: int, box: Optional[Tuple[slice, ...]] = None) -> Tuple[np.ndarray, np.ndarray]:
        """(image (C, *box), label (*box)) of case ``n``; the whole case when ``box`` is None."""
        k = self.keys[n]
        box = box or tuple(slice(0, s) for s in self._shapes[k])
        if self.in_memory:
            image, label = self._memory[k]
            return image[(slice(None),) + tuple(box)], label[tuple(box)]
        g = self._h5()["cases"][k]
        return g["image"][(slice(None),) + tuple(box)], g["label"][tuple(box)]
