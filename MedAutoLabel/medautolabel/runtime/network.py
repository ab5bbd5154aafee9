"""The network of a model card: built from MONAI, weights loaded safely, checked, and cached.

Weights are either a state dict read with ``torch.load(..., weights_only=True)`` (no arbitrary
unpickling) or a TorchScript archive (``torch.jit.load``). A file that would need unpickling
arbitrary Python objects is refused.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import threading
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Tuple, Union

import torch

from medautolabel.errors import ModelError

if TYPE_CHECKING:  # the card is read, never imported at run time: runtime sits below catalog
    from medautolabel.catalog.modelcard import ClassificationTask, ModelCard, NetworkSpec

_CACHE_SIZE = 3
_cache: OrderedDict[Tuple[str, str, str, str], torch.nn.Module] = OrderedDict()
_sha_cache: Dict[Tuple[str, int, int], str] = {}
_lock = threading.Lock()


def file_sha256(path: Union[str, Path]) -> str:
    """Hex sha256 of a file, memoised per (path, size, modification time)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _sha_cache:
            return _sha_cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    with _lock:
        _sha_cache[key] = digest
    return digest


def first_output(out):
    """The main output of a network that may return several heads (deep supervision)."""
    return out[0] if isinstance(out, (list, tuple)) else out


def build_network(card: ModelCard) -> torch.nn.Module:
    """A freshly initialised MONAI network as the card describes it (``network.architecture``/``parameters``)."""
    return build_from_spec(card.network, card.path, "network")


def build_from_spec(spec: NetworkSpec, card_path: Any = None, where: str = "network") -> torch.nn.Module:
    """A freshly initialised MONAI network from a card's network entry (``where`` names it in errors)."""
    from monai.networks import nets

    arch = spec.architecture
    cls = None if arch == "TorchScript" else getattr(nets, arch, None)
    if cls is None:
        raise ModelError(f"field '{where}.architecture': {arch!r} is not in this MONAI version", card_path)
    try:
        return cls(**spec.parameters)
    except (TypeError, ValueError, AssertionError, KeyError, NotImplementedError) as e:
        raise ModelError(f"field '{where}.parameters': MONAI {arch} rejects them ({_one_line(e)})",
                         card_path) from None


def is_torchscript(path: Union[str, Path]) -> bool:
    """True when the file is a TorchScript archive (a zip with compiled ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.endswith("/constants.pkl") for n in z.namelist())


def load_network(card: ModelCard, device: torch.device) -> torch.nn.Module:
    """The card's network with its weights on ``device`` in eval mode; cached per (file, sha256, device)."""
    return load_spec(card.network, card.weights_path, device, card.path, "network")


def load_classifier(card: ModelCard, task: ClassificationTask, device: torch.device) -> torch.nn.Module:
    """A classification task's network (method "network") with its weights, like ``load_network``."""
    n = card.classification.index(task)
    return load_spec(task.network, card.file(task.network.weights), device, card.path,
                     f"classification[{n}].network")


def load_spec(spec: NetworkSpec, path: Path, device: torch.device, card_path: Any = None,
              where: str = "network") -> torch.nn.Module:
    """The network of one card entry with the weights at ``path``, checked against its sha256, cached."""
    if not path.is_file():
        raise ModelError("weights file not found", path)
    sha = file_sha256(path)
    if spec.sha256 is not None and sha != spec.sha256:
        raise ModelError(f"sha256 of the weights is {sha[:16]}... but the model card says "
                         f"{spec.sha256[:16]}...: the file is damaged or not the one the card describes",
                         path)
    key = (str(path.resolve()), sha, str(device),
           json.dumps([spec.architecture, spec.parameters], sort_keys=True, default=str))
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    net = _load_uncached(spec, path, device, card_path, where)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    with _lock:
        _cache[key] = net
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return net


def clear_cache() -> None:
    """Forget every cached network (frees their memory)."""
    with _lock:
        _cache.clear()


def _load_uncached(spec: NetworkSpec, path: Path, device: torch.device, card_path: Any,
                   where: str) -> torch.nn.Module:
    """The network with the weights at ``path`` on ``device``, built afresh (the caller caches it)."""
    if spec.architecture == "TorchScript" or is_torchscript(path):
        if not is_torchscript(path):
            raise ModelError("the model card says TorchScript but the weights file is not a TorchScript archive",
                             path)
        try:
            with warnings.catch_warnings():  # torch >= 2.9 flags TorchScript as deprecated; it still works
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(str(path), map_location=device)
        except Exception as e:  # noqa: BLE001 - any failure here means a damaged archive
            raise ModelError(f"cannot load TorchScript weights ({_one_line(e)})", path) from None
    state = read_state_dict(path, device)
    net = build_from_spec(spec, card_path, where)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError:
        want, got = set(net.state_dict()), set(state)
        missing, extra = sorted(want - got), sorted(got - want)
        detail = f"{len(missing)} missing, {len(extra)} unexpected"
        if missing or extra:
            detail += f" (e.g. {(missing or extra)[0]!r})"
        else:
            detail = "tensor shapes differ"
        raise ModelError(f"weights do not fit the {spec.architecture} the model card describes: "
                         f"{detail}", path) from None
    return net.to(device)


def read_state_dict(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Dict[str, torch.Tensor]:
    """Read a state dict with ``weights_only=True``; refuse files that need arbitrary unpickling."""
    try:
        obj = torch.load(str(path), map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise ModelError("refused: the weights file needs unpickling arbitrary Python objects, which could run "
                         "code; save a state dict (torch.save(net.state_dict(), ...)) or TorchScript instead",
                         path) from None
    except Exception as e:  # noqa: BLE001 - truncated/foreign files raise many errors
        raise ModelError(f"cannot read the weights (damaged or not a PyTorch file: {_one_line(e)})",
                         path) from None
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: Any, path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            prefix = "module."  # saved from DataParallel/DistributedDataParallel
            if all(k.startswith(prefix) for k in obj):
                return {k[len(prefix):]: v for k, v in obj.items()}
            return dict(obj)
        for key in ("state_dict", "model", "network"):
            if isinstance(obj.get(key), Mapping):
                return _unwrap_state_dict(obj[key], path)
    raise ModelError("the weights file holds no state dict (a mapping of parameter names to tensors)", path)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(e).__name__)
