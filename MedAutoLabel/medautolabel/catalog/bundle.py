"""MONAI model-zoo-style bundles (configs/inference.json + metadata.json + models/model.pt): what a bundle
is, its digest, and whether it is trusted (labelling/bundle_runner.py runs one).

Bundle configs may execute Python (``$`` expressions), hence a bundle is parsed only when trusted:
``trust=True`` (``--trust``) or its sha256 listed in the trusted-bundles file
(``MEDAUTOLABEL_TRUSTED_BUNDLES``, default ``~/.config/medautolabel/trusted-bundles.txt``, one hex
digest per line). The digest covers every file in the bundle, and code its config imports from
outside the bundle must be trusted the same way (``check_outside_code``).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.machinery
import os
import re
import site
import sys
import sysconfig
from pathlib import Path
from typing import Any, Iterator, List, Optional, Set, Tuple, Union

from medautolabel.errors import ModelError
from medautolabel.text import printable

TRUST_ENV = "MEDAUTOLABEL_TRUSTED_BUNDLES"


def config_file(folder: Union[str, Path]) -> Optional[Path]:
    for name in ("inference.json", "inference.yaml", "inference.yml"):
        candidate = Path(folder) / "configs" / name
        if candidate.is_file():
            return candidate
    return None


def is_bundle(path: Union[str, Path]) -> bool:
    """A folder with configs/inference.{json,yaml} and no model.json of ours."""
    p = Path(path)
    return p.is_dir() and config_file(p) is not None and not (p / "model.json").exists()


def tree_sha256(root: Union[str, Path]) -> str:
    """Digest of a folder (every file at any depth: sorted relative names and contents) or of one file.

    Symbolic links are part of the digest as links (name and target). A link that leads outside
    ``root`` is refused: what it points to could change without changing the digest.
    """
    top = Path(root)
    digest = hashlib.sha256()
    if top.is_file():
        entries = [top]
        base = top.parent
    else:
        entries = sorted(p for p in top.rglob("*") if p.is_symlink() or p.is_file())
        base = top
    inside = base.resolve()
    for path in entries:
        name = path.relative_to(base).as_posix().encode() + b"\0"
        if path.is_symlink():
            target = path.resolve()
            if target != inside and inside not in target.parents:
                raise ModelError(f"a symbolic link leads outside the bundle ({printable(os.readlink(path))}); "
                                 "copy the file into the bundle instead", path)
            digest.update(b"link\0" + name + os.readlink(path).encode() + b"\0")
            continue
        digest.update(name)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def bundle_sha256(folder: Union[str, Path]) -> str:
    """Digest of every file in the bundle folder (``tree_sha256``): code beside configs/ and models/
    counts too, since a config may import it."""
    return tree_sha256(folder)


def trusted_file() -> Path:
    return Path(os.environ.get(TRUST_ENV, Path.home() / ".config" / "medautolabel" / "trusted-bundles.txt"))


def trusted_digests() -> Set[str]:
    """The sha256 digests listed in the trusted-bundles file (empty when there is none)."""
    path = trusted_file()
    if not path.is_file():
        return set()
    return {line.split("#")[0].strip().lower() for line in path.read_text().splitlines()} - {""}


def is_trusted(folder: Union[str, Path]) -> bool:
    return bundle_sha256(folder) in trusted_digests()


# --- code a bundle's config reaches outside the bundle ------------------------------------------

_PATH_CALL = re.compile(r"(sys\.path|addsitedir|PYTHONPATH)")
_BUNDLE_ROOT_ON_PATH = re.compile(r"^\$\s*sys\.path\.(?:insert\(\s*\d+\s*,|append\()\s*@bundle_root\s*\)\s*$")


def _walk_config(node: Any) -> Iterator[Tuple[str, str]]:
    """("target", dotted name) for each ``_target_``, ("expr", text) for each ``$`` expression and
    ("macro", text) for each ``%file#id`` macro (which reads another config file)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_" and isinstance(value, str) and not value.startswith(("$", "@", "%")):
                yield "target", value
            else:
                yield from _walk_config(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_config(value)
    elif isinstance(node, str) and node.startswith("$"):
        yield "expr", node
    elif isinstance(node, str) and node.startswith("%"):
        yield "macro", node


def _imported_modules(expression: str) -> List[str]:
    """Top-level modules an expression imports (``import x``, ``from x import y``, ``__import__('x')``,
    ``importlib.import_module('x')``); references like ``@network_def`` are replaced before parsing."""
    code = re.sub(r"@[\w#.]+", "None", expression[1:]).strip()
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    names: List[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Name) and node.func.id == "__import__")
                   or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"))):
            names.append(node.args[0].value)
    return [n.split(".")[0] for n in names]


def _installed_roots() -> List[Path]:
    """Folders whose modules count as installed: the standard library, site-packages, medautolabel."""
    paths = sysconfig.get_paths()
    roots = [paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths]
    roots += site.getsitepackages() if hasattr(site, "getsitepackages") else []
    roots.append(str(Path(__file__).resolve().parent))
    return [Path(r).resolve() for r in roots]


def _module_location(name: str, search: List[str]) -> Optional[Path]:
    """The file or package folder ``import name`` would load (None: built in, frozen or not found)."""
    loaded = sys.modules.get(name)
    if loaded is not None:
        origin = getattr(loaded, "__file__", None)
    elif name in sys.builtin_module_names:
        return None
    else:
        spec = importlib.machinery.PathFinder.find_spec(name, search)
        if spec is None:
            return None
        origin = spec.origin if spec.has_location else None
        if origin is None and spec.submodule_search_locations:
            return Path(list(spec.submodule_search_locations)[0]).resolve()
    if not origin:
        return None
    path = Path(origin).resolve()
    return path.parent if path.name == "__init__.py" else path


def outside_code(folder: Path, config: Any) -> List[Tuple[str, Optional[Path]]]:
    """What the bundle's config runs from outside the bundle and the installed stack: (what, where)
    pairs; ``where`` is None for a ``sys.path`` entry other than the bundle itself."""
    found: List[Tuple[str, Optional[Path]]] = []
    modules: List[str] = []
    search = list(sys.path)
    for kind, text in _walk_config(config):
        if kind == "target":
            if "." in text:
                modules.append(text.split(".")[0])
        elif kind == "macro":
            other = text[1:].split("#")[0]
            where = Path(other).resolve() if other else folder
            if where != folder and folder not in where.parents:
                found.append((f"config file {printable(other)}", where))
        elif _PATH_CALL.search(text):
            if _BUNDLE_ROOT_ON_PATH.match(text):
                search.insert(0, str(folder))
            else:
                found.append((f"a sys.path entry ({printable(text[:80])})", None))
        else:
            modules += _imported_modules(text)
    installed = _installed_roots()
    for name in dict.fromkeys(modules):
        where = _module_location(name, search)
        if where is None or where == folder or folder in where.parents:
            continue
        if not any(root in where.parents for root in installed):
            found.append((f"module {name}", where))
    return found


def check_outside_code(folder: Path, config: Path, trust: bool) -> None:
    """Refuse a bundle whose config imports code from elsewhere that is not trusted like the bundle:
    ``--trust`` (this run), or the module's own ``tree_sha256`` in the trusted-bundles file."""
    if trust:
        return
    from monai.bundle import ConfigParser

    listed = trusted_digests()
    for what, where in outside_code(folder, ConfigParser.load_config_file(str(config))):
        if where is None:
            raise ModelError(f"the bundle's config adds {what}, outside the bundle, which its digest cannot "
                             "cover: use --trust to run it", config)
        digest = tree_sha256(where)
        if digest not in listed:
            raise ModelError(f"the bundle's config uses {what} from outside the bundle ({printable(where)}); "
                             f"it runs only when trusted too: use --trust, or add its sha256 {digest} to "
                             f"{trusted_file()}", config)
