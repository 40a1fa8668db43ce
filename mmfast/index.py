"""SimilarityIndex: exact cosine-similarity search over stored, L2-normalised embeddings.

Rows live in one growable buffer (capacity doubles, so `add` is amortised O(rows added)) in the
storage dtype; search is `mmfast.kernels.similarity_topk` over the filled part of that buffer, a
single pass with a fused top-k. Concurrency is snapshot-based: `search` takes a consistent view of
(vectors, scales, ids, size) under a short lock and then runs without it (the CPU kernel releases
the GIL), so searches from several threads run in parallel; `add` only ever writes rows past every
published size, or into a fresh buffer it then publishes, so a running search never sees a torn row.

Files are safetensors: "vectors" [N, D] in the storage dtype, "ids" [N] int64, "scale" [N] float32
(int8 only), with dim/dtype in the metadata; an index with ``prefilter="int8"`` adds its shadow copy
as "prefilter_codes" [N, D] int8, "prefilter_scale" [N] and "prefilter_err" [N] float32 (metadata
prefilter=int8), so that loading rebuilds nothing and maps it like the vectors. `load(path, mmap=True)` keeps the vectors memory-mapped
(safetensors' `safe_open` maps the file copy-on-write and hands out tensors over the mapping): pages
are read when a search first touches them, so opening a gallery larger than RAM costs nothing up
front, and the OS may drop clean pages under pressure. The first `add` after such a load copies the
rows into an ordinary buffer.
"""
from __future__ import annotations

import json
import os
import struct
import threading

import numpy as np
import torch

from mmfast import kernels
from mmfast._atomic import atomic_write

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
_FORMAT = "mmfast.SimilarityIndex/1"
_PRE_NAMES = ("prefilter_codes", "prefilter_scale", "prefilter_err")
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
              torch.int64: "I64"}
_MAX_ID = 2 ** 63 - 1


def _file_path(path, fn: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}: path must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


def _write_safetensors(f, tensors: dict, meta: dict) -> None:
    """The safetensors layout (8-byte header size, JSON header padded to 8, raw little-endian data)
    streamed into `f` from the tensors themselves: no serialized copy of the gallery in memory."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))  # keeps every tensor aligned
    header, offset = {"__metadata__": meta}, 0
    for k in order:
        t = tensors[k]
        end = offset + t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    f.write(struct.pack("<Q", len(head)) + head)
    for k in order:
        if tensors[k].numel():
            f.write(tensors[k].reshape(-1).view(torch.uint8).numpy())


def _as_matrix(x, name: str, dim: int) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiub":  # object, string, complex, ... arrays: torch refuses them with its own words
            raise TypeError(f"{name} must be floating point (e.g. CLIP embeddings), got a numpy {x.dtype} array")
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{name} must have shape [n, {dim}] (this index's dim), got {tuple(x.shape)}; "
                         "use x[None] for a single vector")
    if not (x.is_floating_point()):
        raise TypeError(f"{name} must be floating point (e.g. CLIP embeddings), got {x.dtype}")
    return x.detach()


class SimilarityIndex:
    """Exact top-k cosine-similarity index.

    Parameters
    ----------
    dim : int, the embedding dimension (or an [N, D] tensor / array, which is added right away).
    dtype : "fp16" (default), "bf16", "fp32" or "int8" (per-row scale; 4x smaller than fp32).
    prefilter : None (default) or "int8", fp16/bf16 only: also keep an int8 copy of every row
        (`mmfast.kernels.similarity_prefilter`; +50% memory: 1 byte per element + 8 bytes per row).
        Searches of more than 8 queries on CPU then scan the int8 copy with VNNI and rescore the
        candidates from the fp16/bf16 rows: the same results as without it (same scores, same ids
        up to exact ties), 1.5x (16 queries) to 2.8x (256 queries) faster on 1M x 512 (2 cores).
    device : where rows are stored and searched ("cpu": C++ kernel; "cuda": Triton kernel).

    Threads: one index may be shared. `search` and `save` see a consistent snapshot, the index after
    some number of whole `add` calls (never part of one, and for one thread never fewer than an
    earlier call saw), and run in parallel with each other and with `add`; `add` calls are serialised.
    tests/reliability/test_threads.py checks this answer by answer against serial runs.

    Example
    -------
    >>> index = SimilarityIndex(512, dtype="fp16")
    >>> index.add(clip.encode_images(images))            # [N, 512]; ids 0..N-1
    >>> scores, ids = index.search(clip.encode_texts(["a cat"]), k=5)   # [1, 5] each
    """

    def __init__(self, dim, dtype: str = "fp16", *, prefilter=None, device="cpu"):
        vectors = None
        if isinstance(dim, (torch.Tensor, np.ndarray)):
            vectors, dim = dim, int(dim.shape[-1])
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int (the embedding size, e.g. 512), got {dim!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if prefilter not in (None, "int8") or (prefilter and dtype not in ("fp16", "bf16")):
            raise ValueError(f"prefilter must be None or 'int8' (with dtype 'fp16' or 'bf16'), got "
                             f"prefilter={prefilter!r} with dtype={dtype!r}; an int8 or fp32 index has no use for it")
        self.dim, self.dtype, self.device, self.prefilter = dim, dtype, torch.device(device), prefilter
        self._lock = threading.Lock()
        self._n = 0
        self._vectors = torch.empty(0, dim, dtype=_DTYPES[dtype], device=self.device)
        self._scale = torch.empty(0, dtype=torch.float32, device=self.device)  # int8 only
        self._ids = torch.empty(0, dtype=torch.int64, device=self.device)
        self._pre = None  # prefilter="int8": (codes [cap, D] int8, scale [cap], err [cap]) float32
        if prefilter:
            self._pre = (torch.empty(0, dim, dtype=torch.int8, device=self.device),
                         torch.empty(0, dtype=torch.float32, device=self.device),
                         torch.empty(0, dtype=torch.float32, device=self.device))
        self._next_id = 0
        self._owned = True  # False while the buffers are a memory map from load(): add() copies first
        if vectors is not None:
            self.add(vectors)

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        pre = f", prefilter={self.prefilter!r}" if self.prefilter else ""
        return (f"SimilarityIndex(dim={self.dim}, dtype={self.dtype!r}{pre}, size={self._n}, "
                f"device={str(self.device)!r})")

    # ---- writing -------------------------------------------------------------------------------
    def _encode(self, x: torch.Tensor):
        """float rows -> (storage rows, per-row scale or None), normalised in fp32."""
        x = x.to(self.device, torch.float32)
        norms = x.norm(dim=1)
        bad = ~torch.isfinite(x).all(dim=1) | (norms == 0)
        if bool(bad.any()):
            rows = bad.nonzero().flatten()[:5].tolist()
            raise ValueError(f"vectors: {int(bad.sum())} row(s) are zero or contain NaN/inf (first: {rows}); "
                             "they have no direction to compare, drop them before add()")
        x = x / norms[:, None]
        if self.dtype != "int8":
            return x.to(_DTYPES[self.dtype]), None
        scale = x.abs().amax(dim=1) / 127.0                               # [n], > 0 for unit rows
        return torch.round(x / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale

    def add(self, vectors, ids=None) -> None:
        """Normalise and store `vectors` ([n, dim] float tensor / array). `ids`: [n] integers returned
        by `search` (default: consecutive, continuing after the largest id so far)."""
        x = _as_matrix(vectors, "vectors", self.dim)
        n = x.shape[0]
        if ids is not None:
            try:
                ids = torch.as_tensor(ids)
            except (TypeError, ValueError, RuntimeError) as e:  # strings, ragged lists, ints past int64
                raise ValueError(f"ids must be {n} integers (one per vector), got {type(ids).__name__}: {e}") from None
            if ids.shape != (n,) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise ValueError(f"ids must be {n} integers (one per vector), got {ids.dtype} of shape "
                                 f"{tuple(ids.shape)}")
            if ids.dtype == torch.uint64 and n and int(ids.cpu().numpy().max()) > _MAX_ID:  # would wrap in int64
                raise ValueError(f"ids must fit in int64, got {int(ids.cpu().numpy().max())}")
            ids = ids.to(self.device, torch.int64)
        if n == 0:
            return
        rows, scale = self._encode(x)
        pre = kernels.similarity_prefilter(rows) if self.prefilter else None  # of the stored fp16 rows
        with self._lock:
            start = self._n
            if ids is None:
                if self._next_id + n - 1 > _MAX_ID:
                    raise ValueError(f"ids: the index already holds id {self._next_id - 1}, so {n} more consecutive "
                                     "ids would pass 2**63 - 1; pass ids= explicitly")
                ids = torch.arange(self._next_id, self._next_id + n, device=self.device)
            if start + n > self._vectors.shape[0] or not self._owned:
                self._grow(start + n)
            # Rows past self._n are invisible to searches until the size below is published.
            self._vectors[start:start + n] = rows
            self._ids[start:start + n] = ids
            if scale is not None:
                self._scale[start:start + n] = scale
            if pre is not None:
                for buf, part in zip(self._pre, pre):
                    buf[start:start + n] = part
            self._next_id = max(self._next_id, int(ids.max()) + 1)
            self._n = start + n

    def _grow(self, need: int) -> None:
        """A new, bigger buffer (doubling), with the live rows copied; searches holding the old one
        keep it alive until they finish."""
        cap = max(need, 2 * self._vectors.shape[0], 1024)
        n = self._n

        def bigger(old, shape, dtype):
            new = torch.empty(shape, dtype=dtype, device=self.device)
            new[:n] = old[:n]
            return new
        self._vectors = bigger(self._vectors, (cap, self.dim), self._vectors.dtype)
        self._ids = bigger(self._ids, (cap,), torch.int64)
        if self.dtype == "int8":
            self._scale = bigger(self._scale, (cap,), torch.float32)
        if self._pre is not None:
            codes, cs, ce = self._pre
            self._pre = (bigger(codes, (cap, self.dim), torch.int8), bigger(cs, (cap,), torch.float32),
                         bigger(ce, (cap,), torch.float32))
        self._owned = True

    # ---- reading -------------------------------------------------------------------------------
    def search(self, queries, k: int):
        """The k most similar stored vectors of each query, exactly.

        Parameters
        ----------
        queries : [Q, dim] float tensor / array (normalised here; moved to the index's device).
        k : 1 <= k <= len(index); a larger k is an error rather than a silent clamp.

        Returns
        -------
        (scores [Q, k] float32 cosine similarities, ids [Q, k] int64 user ids), best first.
        """
        q = _as_matrix(queries, "queries", self.dim).to(self.device)
        with self._lock:  # a consistent snapshot; the search itself runs unlocked
            n, vectors, scale, ids, pre = self._n, self._vectors, self._scale, self._ids, self._pre
        if n == 0:
            raise ValueError("search: the index is empty; add() vectors first")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"search: k must be an int in [1, {n}] (the index holds {n} vectors), got {k!r}")
        scores, rows = kernels.similarity_topk(q, vectors[:n], k,
                                               gallery_scale=scale[:n] if self.dtype == "int8" else None,
                                               prefilter=None if pre is None else tuple(t[:n] for t in pre))
        return scores, ids[:n][rows]

    # ---- files ---------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write a safetensors file, atomically (`mmfast._atomic.atomic_write`): `path` holds its old
        contents or the whole new index, even if the process is killed mid-save, and no temporary file
        is left. Safe while other threads `add` / `search`: it writes the snapshot taken as it starts."""
        with self._lock:
            n, vectors, scale, ids, pre = self._n, self._vectors, self._scale, self._ids, self._pre
        tensors = {"vectors": vectors[:n].cpu().contiguous(), "ids": ids[:n].cpu().contiguous()}
        if self.dtype == "int8":
            tensors["scale"] = scale[:n].cpu().contiguous()
        meta = {"format": _FORMAT, "dim": str(self.dim), "dtype": self.dtype}
        if pre is not None:
            meta["prefilter"] = self.prefilter
            for name, t in zip(_PRE_NAMES, pre):
                tensors[name] = t[:n].cpu().contiguous()
        path = _file_path(path, "save")
        if os.path.isdir(path):
            raise ValueError(f"save: '{path}' is a directory; pass a file path such as "
                             f"'{os.path.join(path, 'index.safetensors')}'")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"save: the folder of '{path}' ('{folder}') does not exist; create it first")
        atomic_write(path, lambda f: _write_safetensors(f, tensors, meta))

    @classmethod
    def load(cls, path, mmap: bool = True, *, device="cpu") -> "SimilarityIndex":
        """Open a file written by `save`. mmap=True maps it (nothing is read until searched);
        mmap=False reads it into memory now."""
        from safetensors import safe_open

        path = _file_path(path, "load")
        if not os.path.exists(path):
            raise FileNotFoundError(f"SimilarityIndex file not found: '{path}'")
        if os.path.isdir(path):
            raise ValueError(f"'{path}' is a directory; pass the index file written by save()")
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                t = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: the file is corrupt
            raise ValueError(f"'{path}' is not a readable SimilarityIndex file (corrupt or another format): "
                             f"{type(e).__name__}: {e}") from e
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not an mmfast SimilarityIndex file (metadata format="
                             f"{meta.get('format')!r}, expected {_FORMAT!r})")
        try:
            index = cls(int(meta["dim"]), meta["dtype"], prefilter=meta.get("prefilter"), device=device)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: bad SimilarityIndex metadata {meta}: {e}") from None
        want = {"vectors", "ids"} | ({"scale"} if index.dtype == "int8" else set()) | \
            (set(_PRE_NAMES) if index.prefilter else set())
        if set(t) != want:
            raise ValueError(f"{path}: expected tensors {sorted(want)}, found {sorted(t)}")
        n = t["ids"].shape[0] if t["ids"].dim() == 1 else -1
        if n < 0 or t["ids"].dtype != torch.int64:
            raise ValueError(f"{path}: 'ids' is {t['ids'].dtype} {tuple(t['ids'].shape)}, expected int64 [n]")
        if t["vectors"].shape != (n, index.dim) or t["vectors"].dtype != _DTYPES[index.dtype]:
            raise ValueError(f"{path}: 'vectors' is {t['vectors'].dtype} {tuple(t['vectors'].shape)}, "
                             f"expected {_DTYPES[index.dtype]} ({n}, {index.dim})")
        extra = [("scale", torch.float32, (n,))] if index.dtype == "int8" else []
        if index.prefilter:
            extra += [("prefilter_codes", torch.int8, (n, index.dim)), ("prefilter_scale", torch.float32, (n,)),
                      ("prefilter_err", torch.float32, (n,))]
        for name, dtype, shape in extra:
            if t[name].dtype != dtype or tuple(t[name].shape) != shape:
                raise ValueError(f"{path}: '{name}' is {t[name].dtype} {tuple(t[name].shape)}, expected "
                                 f"{dtype} {shape}")
        keep = (lambda x: x) if mmap and index.device.type == "cpu" else (lambda x: x.to(index.device).clone())
        index._vectors, index._ids = keep(t["vectors"]), keep(t["ids"])
        if index.dtype == "int8":
            index._scale = keep(t["scale"])
        if index.prefilter:
            index._pre = tuple(keep(t[name]) for name in _PRE_NAMES)
        index._n = n
        index._next_id = int(index._ids.max()) + 1 if n else 0
        index._owned = not (mmap and index.device.type == "cpu")
        return index
