"""Read checkpoint files into plain `{name: tensor}` dicts: as data, never as code.

Formats, recognised by their bytes (the suffix only words the error):

- safetensors;
- `torch.save` files (`.bin/.pt/.pth/.ckpt`, zip or legacy pickle) through
  `torch.load(weights_only=True)`, memory-mapped when zipped;
- TorchScript archives (OpenAI's `clip` releases `ViT-B-32.pt` etc. are `torch.jit` zips). They
  are read without `torch.jit.load`, which would compile and run the code inside: a restricted
  unpickler rebuilds `<prefix>/data.pkl`, every `__torch__.*` class becomes an inert placeholder,
  tensor storages come from `<prefix>/data/<key>`, and parameter / buffer names come from the
  `__parameters__` / `__buffers__` lists of `<prefix>/code/**.py`, read as text.

Anything in a pickle that would call a function other than the few that rebuild tensors is
refused with a `ValueError`, before it runs.
"""
from __future__ import annotations

import collections
import json
import os
import pathlib
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping

import torch

_ZIP_MAGIC = b"PK\x03\x04"
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")  # torch.save({"state_dict": ...}) etc.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_MODULE_BOOKKEEPING = ("training", "_is_full_backward_hook")  # on every scripted module; not data
_TORCH_FORMATS = "a torch.save file (zip or legacy pickle) or a TorchScript archive"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint file, on CPU, without running code from it.

    Parameters
    ----------
    path : a `.safetensors`, `torch.save` (`.bin/.pt/.pth/.ckpt`) or TorchScript file. Wrappers
        (`{"state_dict": ...}`, `{"model": ...}`) and `module.` / `_orig_mod.` prefixes are removed;
        non-tensor entries are dropped. For TorchScript archives this is what
        `torch.jit.load(path).state_dict()` would give (non-persistent buffers included; OpenAI's
        archives also hold the 0-d tensors `input_resolution`, `context_length`, `vocab_size`).

    Returns
    -------
    dict[str, torch.Tensor] : name -> tensor (memory-mapped where the format allows).

    Raises
    ------
    FileNotFoundError : no such file.
    ValueError : the file is corrupt, is not a checkpoint, or its pickle asks to run code.

    Examples
    --------
    >>> sd = read_state_dict("ViT-B-32.pt")  # OpenAI's TorchScript release
    >>> sd["visual.conv1.weight"].shape
    torch.Size([768, 3, 32, 32])
    """
    path = _existing_file(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(_ZIP_MAGIC):
        if _zip_layout(path)[1]:
            return read_torchscript(path)[0]
        return _tensors_only(_unwrap(_torch_load(path, mmap=True), path), path)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        return _read_safetensors(path)
    if not head.startswith(b"\x80"):  # pickle's PROTO opcode: how every legacy torch.save file starts
        raise ValueError(f"'{path}' is not a checkpoint: it starts with {head[:8]!r}, while {_TORCH_FORMATS} "
                         "starts with a zip or pickle header, and safetensors with its header length")
    return _tensors_only(_unwrap(_torch_load(path, mmap=False), path), path)


def read_torchscript(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Read a TorchScript archive's parameters and buffers, and its other plain attributes.

    No code from the archive runs: see the module docstring.

    Returns
    -------
    tensors : dict[str, torch.Tensor]
        Parameters and buffers by attribute path, e.g. `visual.transformer.resblocks.0.attn.in_proj_weight`,
        equal to `torch.jit.load(path).state_dict()`.
    attributes : dict[str, object]
        Every other attribute that holds data (ints, floats, strings, lists, plain tensors), by path;
        the `training` flags are left out.
    """
    path = _existing_file(path)
    prefix, script = _zip_layout(path)
    if not script:
        raise ValueError(f"'{path}' is a zip archive but not a TorchScript one (no {prefix}/code/); "
                         "use read_state_dict for torch.save files")
    with zipfile.ZipFile(path) as zf:
        layout = _script_layout(zf, prefix)
        try:
            root = _ArchiveUnpickler(zf, prefix, path).load()
        except _Refused as e:
            raise ValueError(f"refused to load '{path}': {e}. mmfast never runs code from checkpoint files") from None
        except Exception as e:  # noqa: BLE001 - whatever a malformed pickle raises, the file is corrupt
            raise ValueError(f"'{path}' is a corrupt TorchScript archive ({prefix}/data.pkl): "
                             f"{type(e).__name__}: {e}") from e
    if not isinstance(root, _ScriptObject):
        raise ValueError(f"'{path}': {prefix}/data.pkl holds a {type(root).__name__}, not a TorchScript module")
    tensors: dict[str, torch.Tensor] = {}
    attributes: dict[str, object] = {}
    _walk(root, "", layout, tensors, attributes, set())
    return tensors, attributes


def read_json(path: str | os.PathLike):
    """Read a JSON file (model config, `preprocessor_config.json`, ...).

    Raises FileNotFoundError naming the file, or ValueError with the line and column of bad JSON.
    """
    path = _existing_file(path, "JSON file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"'{path}' is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"'{path}' is not a UTF-8 text (JSON) file: {e}") from e


# ---------------------------------------------------------------- files and formats

def _existing_file(path, what: str = "checkpoint file") -> pathlib.Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: '{path}'")
    if path.is_dir():
        raise ValueError(f"'{path}' is a directory; pass the weights file inside it")
    return path


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then the JSON header itself.
    return len(head) == 9 and head[8:9] == b"{"


def _read_safetensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    try:
        return safetensors.torch.load_file(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends all mean a bad file here
        raise ValueError(f"'{path}' could not be read as a safetensors file (corrupt or another format): "
                         f"{type(e).__name__}: {e}") from e


def _zip_layout(path: pathlib.Path) -> tuple[str, bool]:
    """The single top-level folder of a torch zip, and whether it is TorchScript."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"'{path}' is a truncated or corrupt zip archive (expected {_TORCH_FORMATS}): {e}") from e
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise ValueError(f"'{path}' is a zip archive without exactly one <prefix>/data.pkl, "
                         f"so not {_TORCH_FORMATS} (found {pickles or 'none'})")
    prefix = pickles[0].split("/")[0]
    return prefix, any(n.startswith(f"{prefix}/code/") or n == f"{prefix}/constants.pkl" for n in names)


def _torch_load(path: pathlib.Path, mmap: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg or "GLOBAL" in msg:
            found = re.search(r"GLOBAL ([\w.]+)", msg)
            what = f" wants {found.group(1)}" if found else " wants a non-tensor object"
            raise ValueError(f"refused to load '{path}': its pickle{what}, which could run code. mmfast "
                             "loads checkpoints with torch.load(weights_only=True) only; if you trust the "
                             "file, load it yourself and save its state_dict() with safetensors") from None
        detail = msg.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        raise ValueError(f"'{path}' could not be read (expected {_TORCH_FORMATS}): {_first_line(detail)}") from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError, struct.error) as e:
        raise ValueError(f"'{path}' could not be read (expected {_TORCH_FORMATS}): "
                         f"{type(e).__name__}: {_first_line(str(e))}") from e


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg.strip() else msg


def _unwrap(obj, path: pathlib.Path) -> Mapping:
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"'{path}' holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    for p in _WRAPPER_PREFIXES:
        if obj and all(isinstance(k, str) and k.startswith(p) for k in obj):
            obj = {k[len(p):]: v for k, v in obj.items()}
    return obj


def _tensors_only(sd: Mapping, path: pathlib.Path) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not out:
        raise ValueError(f"'{path}' contains no tensors (top-level keys: {list(sd)[:10]})")
    return out


# ---------------------------------------------------------------- TorchScript, without running it

class _Refused(pickle.UnpicklingError):
    pass


class _ScriptObject:
    """Inert stand-in for a `__torch__.*` class: it only keeps the state the pickle hands it."""

    qualname = "__torch__"

    def __init__(self, *args, **kwargs):
        self.state = None

    def __setstate__(self, state):
        self.state = state


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    # (storage, offset, size, stride[, requires_grad, backward_hooks, metadata]): hooks and grad are dropped.
    untyped, dtype = storage
    return torch.empty((0,), dtype=dtype).set_(untyped, storage_offset, tuple(size), tuple(stride))


def _identity(value, *unused):
    return value


# The only callables a TorchScript data.pkl may reach, each mapped to an inert equivalent.
_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _identity,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
    **{("torch.jit._pickle", f"build_{k}list"): _identity for k in ("int", "double", "bool", "tensor", "generic")},
}


_QUANTIZED = {torch.qint8, torch.qint32, torch.quint8, torch.quint4x2, torch.quint2x4}


class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, zf: zipfile.ZipFile, prefix: str, path: pathlib.Path):
        super().__init__(zf.open(f"{prefix}/data.pkl"))
        self._zf, self._prefix, self._path = zf, prefix, path
        self._storages: dict[str, torch.UntypedStorage] = {}
        self._mapped: torch.UntypedStorage | None = None
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._classes:
                self._classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return self._classes[qualname]
        if module == "torch" and name.endswith("Storage"):
            dtype = torch.storage._storage_type_to_dtype_map().get(name)
            if dtype is not None and dtype not in _QUANTIZED:
                return _StorageType(dtype)
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        raise _Refused(f"its data.pkl wants {module}.{name}, which is not a tensor-rebuilding function")

    def persistent_load(self, pid):
        # pid: ("storage", storage type, key, location, numel)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, stype, key, _location, numel = pid
        if not (isinstance(key, str) and isinstance(numel, int) and numel >= 0):
            raise pickle.UnpicklingError(f"malformed storage reference {pid!r}")
        if key not in self._storages:
            self._storages[key] = self._read_storage(f"{self._prefix}/data/{key}", numel * stype.dtype.itemsize)
        return self._storages[key], stype.dtype

    def _read_storage(self, name: str, nbytes: int) -> torch.UntypedStorage:
        info = self._zf.getinfo(name)
        if info.file_size < nbytes:
            raise pickle.UnpicklingError(f"record {name} holds {info.file_size} bytes, the pickle expects {nbytes}")
        if info.compress_type == zipfile.ZIP_STORED:
            # Stored records (what torch writes, 64-byte aligned) are memory-mapped, not copied.
            with open(self._path, "rb") as f:
                f.seek(info.header_offset)
                local = f.read(30)  # the local file header; its name/extra lengths vary by writer
            name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            start = info.header_offset + 30 + name_len + extra_len
            if start % 64 == 0:
                if self._mapped is None:  # private (copy-on-write) map of the whole file, as torch.load(mmap=True)
                    size = os.path.getsize(self._path)
                    self._mapped = torch.UntypedStorage.from_file(os.fspath(self._path), False, size)
                return self._mapped[start:start + nbytes]
        data = torch.empty(nbytes, dtype=torch.uint8)
        with self._zf.open(name) as f:
            f.readinto(memoryview(data.numpy()))
        return data.untyped_storage()


_CLASS_RE = re.compile(r"^class (\w+)\(", re.M)
_SLOTS_RE = re.compile(r"^\s+(__parameters__|__buffers__) = \[(.*)\]\s*$", re.M)


def _script_layout(zf: zipfile.ZipFile, prefix: str) -> dict[str, set[str]]:
    """Qualified class name -> its parameter and buffer names, from the archive's code, as text."""
    layout: dict[str, set[str]] = {}
    code = f"{prefix}/code/"
    for name in zf.namelist():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        module = name[len(code):-3].replace("/", ".")  # code/__torch__/a/b.py -> __torch__.a.b
        text = zf.read(name).decode("utf-8", errors="replace")
        starts = [(m.start(), m.group(1)) for m in _CLASS_RE.finditer(text)] + [(len(text), "")]
        for (begin, cls), (end, _) in zip(starts, starts[1:]):
            slots = _SLOTS_RE.findall(text, begin, end)
            if slots:  # a writer that omits the lists leaves the class unknown: all its tensors are kept
                layout[f"{module}.{cls}"] = {n for _, names in slots for n in re.findall(r'"([^"]*)"', names)}
    return layout


def _walk(obj: _ScriptObject, path: str, layout, tensors: dict, attributes: dict, seen: set) -> None:
    if id(obj) in seen:  # a well-formed module tree has no cycles; a crafted pickle might
        return
    seen.add(id(obj))
    if not isinstance(obj.state, dict):
        return  # a class with its own __getstate__: no named attributes to report
    slots = layout.get(obj.qualname)  # None: class code missing; keep every tensor attribute
    for name, value in obj.state.items():
        full = f"{path}{name}"
        if isinstance(value, _ScriptObject):
            _walk(value, full + ".", layout, tensors, attributes, seen)
        elif isinstance(value, torch.Tensor) and (slots is None or name in slots):
            tensors[full] = value
        elif name not in _MODULE_BOOKKEEPING and value is not None:
            attributes[full] = value
