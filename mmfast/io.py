"""Read checkpoint files into plain `{name: tensor}` dicts: as data, never as code.

Formats, recognised by their bytes (the suffix only words the error):

- safetensors;
- `torch.save` files (`.bin/.pt/.pth/.ckpt`, zip or legacy pickle) through
  `torch.load(weights_only=True)`, memory-mapped when zipped. Files it refuses because they pickle
  objects besides tensors (Lightning checkpoints: callback state, `argparse.Namespace` / omegaconf
  hyper-parameters, numpy scalars) are read again by mmfast's own unpickler, in which every such
  class is an inert placeholder: it records what the pickle hands it and runs nothing;
- TorchScript archives (OpenAI's `clip` releases `ViT-B-32.pt` etc. are `torch.jit` zips). They
  are read without `torch.jit.load`, which would compile and run the code inside: the same
  unpickler rebuilds `<prefix>/data.pkl`, every `__torch__.*` class becomes an inert placeholder,
  tensor storages come from `<prefix>/data/<key>`, and parameter / buffer names come from the
  `__parameters__` / `__buffers__` lists of `<prefix>/code/**.py`, read as text.

mmfast's unpickler (`_SafeUnpickler`) re-implements the opcodes that can call or mutate objects:
REDUCE / NEWOBJ / INST / OBJ may only call the tensor-rebuilding functions and a few pure-data
constructors (`OrderedDict`, `set`, `torch.Size`, ...) or create placeholders; BUILD may only give
state to placeholders (and `_metadata` to an `OrderedDict`); items may only go into lists, dicts,
sets and placeholders; EXT opcodes are refused. Nothing is imported. A pickle that names something
that can run code (`os.system`, `builtins.eval`, `subprocess.Popen`, `importlib.import_module`, any
other `torch` function, ...) or that calls the result of a call is refused with a `ValueError`, before
anything is called.
"""
from __future__ import annotations

import _compat_pickle
import collections
import json
import os
import pathlib
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from io import BytesIO

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
        try:
            layout = _script_layout(zf, prefix)
            root = _ZipUnpickler(zf, prefix, path, placeholders=False).load()
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
    except Exception as e:  # noqa: BLE001 - BadZipFile, EOFError, UnicodeDecodeError (a mangled name), ...
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
    except pickle.UnpicklingError:
        # weights_only refuses every class it does not know, code or not: read the file again with
        # placeholders for those classes (and a refusal for the ones that can run code).
        return _unpickle_torch_file(path)
    except Exception as e:  # noqa: BLE001 - RuntimeError, EOFError, struct.error, SafetensorError (torch.load
        # hands a *.safetensors name to safetensors whatever its bytes), ...: all mean a corrupt file here
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


# ---------------------------------------------------------------- pickles, as data

class _Refused(pickle.UnpicklingError):
    pass


class _Inert:
    """Stand-in for a class a pickle names but mmfast never imports: it keeps what the pickle hands it
    (call arguments, BUILD state, appended or set items) and runs nothing."""

    qualname = "?"

    def __init__(self, args: tuple = (), kwargs: dict | None = None):
        self.args, self.kwargs, self.state, self.items = args, kwargs or {}, None, []

    def __repr__(self):
        return f"<inert {self.qualname}>"


class _ScriptObject(_Inert):
    """A `__torch__.*` (TorchScript) class: its attributes are the BUILD state."""

    qualname = "__torch__"


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Call:
    """A callable a pickle may reach, under its pickled name: never the target of BUILD or of added items."""

    def __init__(self, fn, qualname: str, rebuilds_tensor: bool = False):
        self.fn, self.qualname, self.rebuilds_tensor = fn, qualname, rebuilds_tensor

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    # (storage, offset, size, stride[, requires_grad, backward_hooks, metadata]): hooks and grad are dropped.
    if not (isinstance(storage, tuple) and len(storage) == 2 and isinstance(storage[0], torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"a tensor's storage is a {type(storage).__name__}, not a storage record")
    untyped, dtype = storage
    size, stride = tuple(size), tuple(stride)
    if not all(isinstance(n, int) and n >= 0 for n in (storage_offset, *size, *stride)) or len(size) != len(stride):
        raise pickle.UnpicklingError(f"malformed tensor: offset {storage_offset!r}, size {size!r}, stride {stride!r}")
    # set_ would silently grow a storage that is too small: check the extent first.
    end = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0
    if end * dtype.itemsize > untyped.nbytes():
        raise pickle.UnpicklingError(f"a tensor of size {size} reaches past the end of its storage")
    return torch.empty((0,), dtype=dtype).set_(untyped, storage_offset, size, stride)


def _tensor_arg(value, *unused):
    if not isinstance(value, torch.Tensor):
        raise pickle.UnpicklingError(f"a parameter wraps a {type(value).__name__}, not a tensor")
    return value


def _rebuild_from_type(func, new_type, args, state):
    # torch._tensor._rebuild_from_type_v2: a tensor with Python attributes (state) or of a subclass
    # (new_type); both are dropped, the plain tensor is kept.
    if not (isinstance(func, _Call) and func.rebuilds_tensor and isinstance(args, tuple)):
        raise _Refused("its pickle rebuilds a tensor with a function that does not rebuild tensors")
    return func(*args)


def _reconstructor(cls, base, state):
    # copyreg._reconstructor: how protocol 0 / 1 pickles create objects
    if not (isinstance(cls, type) and issubclass(cls, _Inert)):
        raise _Refused(f"its pickle reconstructs {_describe(cls)} through copyreg")
    obj = cls()
    obj.state = state
    return obj


def _latin1(text, encoding="latin1"):
    # _codecs.encode(text, "latin1"): how protocol 2 pickles bytes. Other codecs would import modules.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"its pickle encodes with codec {encoding!r}")
    return text.encode("latin-1")


_TENSOR_TYPE = object()  # torch.Tensor / Parameter as the `new_type` argument of _rebuild_from_type_v2
_TENSOR_REBUILDS = {"_rebuild_tensor_v2": _rebuild_tensor, "_rebuild_tensor": _rebuild_tensor,
                    "_rebuild_parameter": _tensor_arg, "_rebuild_parameter_with_state": _tensor_arg}
_CALLS = {  # the only callables a pickle may reach, each an inert or pure-data equivalent
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch.jit._pickle", "restore_type_tag"): (lambda value, *unused: value),
    **{("torch.jit._pickle", f"build_{k}list"): (lambda value, *unused: value)
       for k in ("int", "double", "bool", "tensor", "generic")},
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("_codecs", "encode"): _latin1,
    ("copyreg", "_reconstructor"): _reconstructor,
}
_SAFE_GLOBALS = {
    **{("torch._utils", name): _Call(fn, f"torch._utils.{name}", True) for name, fn in _TENSOR_REBUILDS.items()},
    **{key: _Call(fn, ".".join(key)) for key, fn in _CALLS.items()},
    **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
    ("torch", "Tensor"): _TENSOR_TYPE,
    ("torch._tensor", "Tensor"): _TENSOR_TYPE,
    ("torch.nn.parameter", "Parameter"): _TENSOR_TYPE,
}
_QUANTIZED = {torch.qint8, torch.qint32, torch.quint8, torch.quint4x2, torch.quint2x4}

# Modules (with their submodules) and names whose callables run code, start processes, import, or
# read and write files: a pickle naming one is refused, although here it would get a placeholder.
# Everything under `torch` not allowed above is refused as well (torch.load, torch.jit, torch.hub, fx, ...).
_RUNS_CODE_MODULES = frozenset("""
    os posix nt subprocess _posixsubprocess pty sys builtins importlib imp runpy code codeop pickle _pickle
    marshal shelve dill cloudpickle joblib types functools operator _operator inspect ctypes _ctypes
    multiprocessing concurrent threading _thread signal socket asyncio shutil tempfile io _io zipimport
    pkgutil site sysconfig distutils setuptools pip pkg_resources webbrowser platform pdb bdb timeit trace
    profile cProfile doctest pydoc glob fileinput linecache urllib http ftplib smtplib telnetlib xmlrpc
    logging tkinter idlelib yaml copyreg _codecs codecs numpy.testing numpy.f2py numpy.distutils
    numpy.ctypeslib numpy.lib.npyio numpy.lib._npyio_impl
""".split())
_RUNS_CODE_NAMES = frozenset("""
    eval exec execfile compile system popen spawn fork __import__ import_module getattr setattr delattr
    globals locals vars open load loads runstring call check_call check_output Popen apply breakpoint input
""".split())
# Plain builtin types keep their names as placeholders; every other builtin (eval, getattr, ...) is refused.
_BUILTIN_TYPES = frozenset("object dict list tuple int float str bytes bytearray bool slice range type".split())


def _runs_code(module: str, name: str) -> bool:
    if module == "builtins" and name in _BUILTIN_TYPES:
        return False
    parts = f"{module}.{name}".split(".")
    return (any(".".join(parts[:i]) in _RUNS_CODE_MODULES for i in range(1, len(parts)))
            or any(p in _RUNS_CODE_NAMES for p in parts))


def _describe(obj) -> str:
    if isinstance(obj, _Inert):
        return f"an instance of {obj.qualname} (the result of another call)"
    if isinstance(obj, _Call):
        return obj.qualname
    if isinstance(obj, type) and issubclass(obj, _Inert):
        return f"the class {obj.qualname}"
    return f"a {type(obj).__name__}"


class _SafeUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with every opcode that calls or mutates objects re-implemented.

    `placeholders`: unknown classes (not code) become `_Inert` placeholders; when False (TorchScript
    archives) only `__torch__.*` classes do and every other unknown name is refused.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, placeholders: bool):
        super().__init__(file, encoding="utf-8")
        self._placeholders = placeholders
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if self.proto < 3:  # protocol 2 writes Python 2 names (__builtin__, copy_reg); map them as pickle does
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            else:
                module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module == "torch" and name.endswith("Storage"):
            dtype = torch.storage._storage_type_to_dtype_map().get(name)
            if dtype is not None and dtype not in _QUANTIZED:
                return _StorageType(dtype)
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        script = module == "__torch__" or module.startswith("__torch__.")
        if not script and not self._placeholders:
            raise _Refused(f"its data.pkl wants {module}.{name}, which is not a tensor-rebuilding function")
        if module == "torch" or module.startswith("torch."):
            raise _Refused(f"its pickle wants {module}.{name}; of torch, mmfast only rebuilds tensors, dtypes, "
                           "sizes and devices")
        if not script and _runs_code(module, name):
            raise _Refused(f"its pickle wants {module}.{name}, which can run code")
        qualname = f"{module}.{name}"
        if qualname not in self._classes:
            base = _ScriptObject if script else _Inert
            self._classes[qualname] = type(name, (base,), {"qualname": qualname, "__module__": __name__})
        return self._classes[qualname]

    def get_extension(self, code):  # EXT1/2/4: the copyreg registry and its process-wide cache
        raise _Refused(f"its pickle uses copyreg extension code {code}")

    def _call(self, func, args, kwargs):
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise pickle.UnpicklingError("malformed call arguments")
        if isinstance(func, _Call):
            return func(*args, **kwargs)
        if isinstance(func, type) and issubclass(func, _Inert):
            return func(args, kwargs)
        raise _Refused(f"its pickle calls {_describe(func)}")

    def _new(self, cls, args, kwargs):
        if isinstance(cls, _Call) and isinstance(cls.fn, type):  # OrderedDict, set, torch.Size, ...
            return cls.fn.__new__(cls.fn, *args, **kwargs)
        return self._call(cls, args, kwargs)

    def _instantiate(self, klass, args):  # INST and OBJ (protocols 0 and 1)
        self.append(self._call(klass, tuple(args), {}))

    def _load_reduce(self):
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args, {})

    def _load_newobj(self):
        args = self.stack.pop()
        self.stack[-1] = self._new(self.stack[-1], args, {})

    def _load_newobj_ex(self):
        kwargs, args = self.stack.pop(), self.stack.pop()
        self.stack[-1] = self._new(self.stack[-1], args, kwargs)

    def _load_build(self):
        state, inst = self.stack.pop(), self.stack[-1]
        if isinstance(inst, _Inert):
            inst.state = state
        elif (type(inst) is collections.OrderedDict and isinstance(state, dict)
              and all(isinstance(k, str) and not k.startswith("__") for k in state)):
            vars(inst).update(state)  # Module.state_dict() carries its `_metadata` this way
        else:
            raise _Refused(f"its pickle sets the state of {_describe(inst)}")

    def _add(self, items: list, pairs: bool):
        target = self.stack[-1]
        if isinstance(target, _Inert):
            target.items.extend(zip(items[::2], items[1::2]) if pairs else items)
        elif pairs and type(target) in (dict, collections.OrderedDict):
            for i in range(0, len(items), 2):
                target[items[i]] = items[i + 1]
        elif not pairs and type(target) in (list, set):
            (target.extend if type(target) is list else target.update)(items)
        else:
            raise _Refused(f"its pickle adds items to {_describe(target)}")

    def _load_append(self):
        self._add([self.stack.pop()], pairs=False)

    def _load_appends(self):
        self._add(self.pop_mark(), pairs=False)

    def _load_additems(self):
        self._add(self.pop_mark(), pairs=False)

    def _load_setitem(self):
        value = self.stack.pop()
        self._add([self.stack.pop(), value], pairs=True)

    def _load_setitems(self):
        self._add(self.pop_mark(), pairs=True)

    for _op, _fn in ((pickle.REDUCE, _load_reduce), (pickle.NEWOBJ, _load_newobj),
                     (pickle.NEWOBJ_EX, _load_newobj_ex), (pickle.BUILD, _load_build),
                     (pickle.APPEND, _load_append), (pickle.APPENDS, _load_appends),
                     (pickle.ADDITEMS, _load_additems), (pickle.SETITEM, _load_setitem),
                     (pickle.SETITEMS, _load_setitems)):
        dispatch[_op[0]] = _fn
    del _op, _fn


class _ZipUnpickler(_SafeUnpickler):
    """`<prefix>/data.pkl` of a torch zip (torch.save or TorchScript); storages are `<prefix>/data/<key>`."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str, path: pathlib.Path, placeholders: bool):
        super().__init__(BytesIO(zf.read(f"{prefix}/data.pkl")), placeholders)
        self._zf, self._prefix, self._path = zf, prefix, path
        self._storages: dict[str, torch.UntypedStorage] = {}
        self._mapped: torch.UntypedStorage | None = None

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


_LEGACY_MAGIC, _LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001  # torch.serialization's, for non-zip files


class _LegacyUnpickler(_SafeUnpickler):
    """The main pickle of a legacy (non-zip) torch.save file; storage bytes follow it in the file."""

    def __init__(self, f, budget: int):
        super().__init__(f, placeholders=True)
        self.roots: dict[str, tuple[torch.Tensor, torch.dtype]] = {}
        self._budget = budget  # the file's size: the storages together cannot hold more

    def persistent_load(self, pid):
        # pid: ("storage", storage type, key, location, numel, (view key, offset, numel) or None)
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, stype, key, _location, numel, view = pid
        if not (isinstance(key, str) and isinstance(numel, int) and numel >= 0):
            raise pickle.UnpicklingError(f"malformed storage reference {pid!r}")
        if key not in self.roots:
            self._budget -= numel * stype.dtype.itemsize
            if self._budget < 0:
                raise pickle.UnpicklingError("its storages claim more bytes than the file holds")
            self.roots[key] = (torch.empty(numel * stype.dtype.itemsize, dtype=torch.uint8), stype.dtype)
        storage = self.roots[key][0].untyped_storage()
        if view is not None:
            if not (isinstance(view, tuple) and len(view) == 3
                    and all(isinstance(v, int) and v >= 0 for v in view[1:])):
                raise pickle.UnpicklingError(f"malformed storage view {view!r}")
            start = view[1] * stype.dtype.itemsize
            storage = storage[start:start + view[2] * stype.dtype.itemsize]
        return storage, stype.dtype


def _unpickle_torch_file(path: pathlib.Path):
    """A torch.save file's object, with unknown classes as inert placeholders (see the module docstring)."""
    try:
        if zipfile.is_zipfile(path):
            prefix, _ = _zip_layout(path)
            with zipfile.ZipFile(path) as zf:
                if f"{prefix}/byteorder" in zf.namelist() and zf.read(f"{prefix}/byteorder") != b"little":
                    raise pickle.UnpicklingError("it was written on a big-endian machine")
                return _ZipUnpickler(zf, prefix, path, placeholders=True).load()
        with open(path, "rb") as f:
            return _load_legacy(f, os.path.getsize(path))
    except _Refused as e:
        raise ValueError(f"refused to load '{path}': {e}. mmfast never runs code from checkpoint files") from None
    except Exception as e:  # noqa: BLE001 - whatever a malformed pickle raises, the file is corrupt
        raise ValueError(f"'{path}' could not be read (expected {_TORCH_FORMATS}): "
                         f"{type(e).__name__}: {_first_line(str(e))}") from e


def _load_legacy(f, budget: int):
    # magic number, protocol version, sys info, the object, its storage keys, then each storage's bytes
    if _SafeUnpickler(f, placeholders=False).load() != _LEGACY_MAGIC:
        raise pickle.UnpicklingError("no torch.save magic number")
    if _SafeUnpickler(f, placeholders=False).load() != _LEGACY_PROTOCOL:
        raise pickle.UnpicklingError("unknown legacy protocol version")
    info = _SafeUnpickler(f, placeholders=False).load()
    if not (isinstance(info, dict) and info.get("little_endian", True)):
        raise pickle.UnpicklingError("it was written on a big-endian machine")
    unpickler = _LegacyUnpickler(f, budget)
    obj = unpickler.load()
    keys = _SafeUnpickler(f, placeholders=False).load()
    for key in keys:
        data, dtype = unpickler.roots[key]
        (numel,) = struct.unpack("<q", f.read(8))
        if numel * dtype.itemsize != data.numel() or f.readinto(memoryview(data.numpy())) != data.numel():
            raise pickle.UnpicklingError(f"storage {key} is truncated or has the wrong size")
    return obj


# ---------------------------------------------------------------- TorchScript, without running it

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
