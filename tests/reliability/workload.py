"""Tiny random-init Clip, VQ, Generator and SimilarityIndex, a pool of inputs for each hot entry point,
and the two reliability workloads shared by tests/reliability and tools/reliability_report.py:

- `run_threads`: T threads x N mixed calls on the *same* objects; every result must equal, bit for bit,
  what the same call returned when made alone (serially) before the threads started.
- `soak`: many calls of one entry point in one process; resident memory (/proc/self/statm) after a
  warm-up against the end.

`MMFAST_RELIABILITY_SCALE=1` runs the issue's full counts (8 x 1000 calls, 10,000 calls per entry point);
the default is the CI size.
"""
from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from mmfast.clip.config import ClipConfig, ClipTextConfig, ClipVisionConfig
from mmfast.clip.model import CLIP
from mmfast.clip.runtime import Clip
from mmfast.dalle.config import DalleConfig
from mmfast.dalle.generate import Generator
from mmfast.dalle.model import DalleDecoder, DalleEncoder
from mmfast.dalle.tokenizer import DalleTokenizer
from mmfast.index import SimilarityIndex
from mmfast.vqgan import VQ, VQGAN, VQConfig

FULL = os.environ.get("MMFAST_RELIABILITY_SCALE", "") not in ("", "0")
THREADS, CALLS = 8, (1000 if FULL else 50)                # per thread
SOAK_CALLS, SOAK_WARMUP = (10_000, 500) if FULL else (300, 100)
SOAK_CI_SLOW = {"Generator.generate_tokens": (60, 20)}   # ~40 ms a call: fewer in CI
POOL = 6                                                  # distinct inputs per entry point

CLIP_CFG = ClipConfig(embed_dim=16, vision=ClipVisionConfig(image_size=32, patch_size=16, width=64, layers=1,
                                                            heads=1, mlp_dim=128),
                      text=ClipTextConfig(context_length=77, width=64, layers=1, heads=1, mlp_dim=128))
VQ_CFG = VQConfig(resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
                  z_channels=16, embed_dim=8, n_embed=97)
# 16 image tokens from a 64-code vocabulary: a generate call is 16 decoder steps, not 256
DALLE_CFG = DalleConfig(encoder_layers=1, decoder_layers=1, width=64, heads=1, glu_dim=96, text_vocab=128,
                        text_tokens=48, image_vocab=64, image_tokens=16, codebook_size=64, start_token=63)
ENTRY_POINTS = ("Clip.encode_images", "Clip.encode_texts", "VQ.encode", "VQ.decode", "Generator.generate_tokens",
                "SimilarityIndex.search")
WORDS = "a photo of the red cat dog on moon in style van gogh blue car teacher watercolor".split()


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "logit_scale":
                continue
            base = 1.0 if p.dim() == 1 and name.endswith("weight") else 0.0  # LayerNorm scales stay near 1
            p.copy_(base + std * torch.randn(p.shape, generator=g))
    return module.eval()


def _dalle_tokenizer() -> DalleTokenizer:
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, chr(ord(" ") + 256): 4}  # "Ġ": a word's start
    for c in range(33, 127):
        vocab[chr(c)] = len(vocab)
    return DalleTokenizer(vocab, [], text_tokens=DALLE_CFG.text_tokens)


@dataclass
class Models:
    clip: Clip
    vq: VQ
    gen: Generator
    index: SimilarityIndex
    inputs: dict = field(default_factory=dict)   # entry point -> list of POOL inputs

    def calls(self) -> dict:
        """entry point -> fn(input) -> tensor: the hot calls of a service."""
        return {
            "Clip.encode_images": lambda x: self.clip.encode_images(x),
            "Clip.encode_texts": lambda x: self.clip.encode_texts(x),
            "VQ.encode": lambda x: self.vq.encode(x),
            "VQ.decode": lambda x: self.vq.decode(x),
            "Generator.generate_tokens": lambda x: self.gen.generate_tokens(x[0], n=2, seed=x[1], top_k=16,
                                                                            guidance=4.0),
            "SimilarityIndex.search": lambda x: torch.cat([t.double() for t in self.index.search(x, 5)]),
        }


def build(dtype: str = "auto") -> Models:
    """The objects as a service holds them (dtype="auto": each family's default CPU mode here)."""
    clip = Clip(_randomize(CLIP(CLIP_CFG), 0), device="cpu", dtype=dtype, backend="torch")
    vq = VQ(_randomize(VQGAN(VQ_CFG), 1), device="cpu", dtype=dtype, backend="torch")
    enc, dec = _randomize(DalleEncoder(DALLE_CFG), 2), _randomize(DalleDecoder(DALLE_CFG), 3)
    gen = Generator(enc, dec, _dalle_tokenizer(), device="cpu", dtype=dtype, backend="torch")
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    index = SimilarityIndex(CLIP_CFG.embed_dim, dtype="fp16", prefilter="int8")
    index.add(torch.randn(3000, CLIP_CFG.embed_dim, generator=g))
    text = lambda n, most=12: [" ".join(rng.choice(WORDS, rng.integers(1, most))) for _ in range(n)]  # noqa: E731
    image = lambda: rng.integers(0, 256, (int(rng.integers(24, 64)), int(rng.integers(24, 64)), 3),  # noqa: E731
                                 dtype=np.uint8)
    inputs = {
        "Clip.encode_images": [[image() for _ in range(1 + j % 3)] for j in range(POOL)],
        "Clip.encode_texts": [text(1 + j % 4) for j in range(POOL)],
        "VQ.encode": [[image() for _ in range(1 + j % 2)] for j in range(POOL)],
        "VQ.decode": [torch.randint(0, VQ_CFG.n_embed, (1 + j % 2, 4, 4), generator=g) for j in range(POOL)],
        "Generator.generate_tokens": [(text(1 + j % 2, 5), 1000 * j) for j in range(POOL)],
        # up to 8 queries: one pass over the fp16 rows; 16 and more: the int8 prefilter, then rescoring
        "SimilarityIndex.search": [torch.randn((1, 5, 16)[j % 3], CLIP_CFG.embed_dim, generator=g)
                                   for j in range(POOL)],
    }
    return Models(clip, vq, gen, index, inputs)


def serial_results(m: Models) -> dict:
    """(entry point, input number) -> the result of the call made alone."""
    return {(name, j): fn(m.inputs[name][j]) for name, fn in m.calls().items() for j in range(POOL)}


def plan(thread: int, calls: int) -> list[tuple[str, int]]:
    """A thread's mixed sequence of (entry point, input number), fixed by its number."""
    rng = random.Random(thread)
    return [(rng.choice(ENTRY_POINTS), rng.randrange(POOL)) for _ in range(calls)]


def run_threads(m: Models, want: dict, threads: int = THREADS, calls: int = CALLS) -> dict:
    """`threads` threads make `calls` mixed calls each on the shared objects at once. Returns
    {"failures": [(thread, call, entry point, input, what)], "calls": ..., "seconds": ...}."""
    fns = m.calls()
    failures, lock = [], threading.Lock()
    start = threading.Barrier(threads)

    def work(t: int):
        start.wait()
        for i, (name, j) in enumerate(plan(t, calls)):
            try:
                got = fns[name](m.inputs[name][j])
                ok = torch.equal(got, want[(name, j)])
                what = None if ok else f"differs by {float((got.double() - want[(name, j)].double()).abs().max()):.3g}"
            except Exception as e:  # noqa: BLE001 - a crash under threads is a failure like a wrong answer
                what = f"{type(e).__name__}: {e}"
            if what:
                with lock:
                    failures.append((t, i, name, j, what))

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    t0 = time.perf_counter()
    for p in pool:
        p.start()
    for p in pool:
        p.join()
    return {"failures": failures, "calls": threads * calls, "seconds": time.perf_counter() - t0}


def rss() -> int:
    """Resident set size of this process in bytes (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def soak(m: Models, name: str, calls: int | None = None, warmup: int | None = None) -> dict:
    """`warmup` then `calls` calls of one entry point (cycling through its inputs); RSS before / after."""
    if calls is None:
        calls, warmup = (SOAK_CALLS, SOAK_WARMUP) if FULL else SOAK_CI_SLOW.get(name, (SOAK_CALLS, SOAK_WARMUP))
    fn, inputs = m.calls()[name], m.inputs[name]
    for i in range(warmup):
        fn(inputs[i % POOL])
    before = rss()
    t0 = time.perf_counter()
    for i in range(calls):
        fn(inputs[i % POOL])
    seconds = time.perf_counter() - t0
    after = rss()
    return {"entry_point": name, "calls": calls, "warmup_calls": warmup, "rss_after_warmup_mb": before / 2 ** 20,
            "rss_end_mb": after / 2 ** 20, "rss_growth_pct": 100 * (after - before) / before,
            "rss_growth_bytes_per_call": (after - before) / calls, "seconds": seconds}


def index_snapshots(n_adds: int = 30, rows: int = 40, searchers: int = 4, dim: int = 16) -> dict:
    """`searchers` threads search one SimilarityIndex while `n_adds` adds land. The documented semantics:
    a search sees the index after some number m of whole adds, and m never goes back for a thread.
    Each answer is matched bit for bit against the serial answers after 1..n_adds adds.
    Returns {"answers", "inconsistent" (no m gives it), "went_back", "states_seen", "errors"}."""
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(rows, dim, generator=g) for _ in range(n_adds)]
    # 2 queries: one pass over the fp16 rows; 16: the int8 prefilter, then rescoring
    queries = [torch.randn(q, dim, generator=torch.Generator().manual_seed(q)) for q in (2, 16)]
    index, serial = SimilarityIndex(dim, dtype="fp16", prefilter="int8"), []
    for b in batches:  # serial[m - 1]: the answers after m adds
        index.add(b)
        serial.append([index.search(q, 7) for q in queries])

    def which(qi, answer) -> set:
        return {m for m, s in enumerate(serial) if torch.equal(answer[0], s[qi][0]) and torch.equal(answer[1], s[qi][1])}

    index = SimilarityIndex(dim, dtype="fp16", prefilter="int8")
    index.add(batches[0])
    seen, errors, done = {t: [] for t in range(searchers)}, [], threading.Event()
    out = {"answers": 0, "inconsistent": 0, "went_back": 0}
    lock = threading.Lock()

    def searcher(t):
        low, i = 0, 0
        while not done.is_set():
            qi, i = (t + i) % len(queries), i + 1
            try:
                ms = which(qi, index.search(queries[qi], 7))
            except Exception as e:  # noqa: BLE001 - counted as a failure
                errors.append(repr(e))
                return
            with lock:
                out["answers"] += 1
                out["inconsistent"] += not ms
                out["went_back"] += bool(ms) and max(ms) < low
            if ms:
                low = max(low, min(ms))
                seen[t].append(min(ms))

    threads = [threading.Thread(target=searcher, args=(t,)) for t in range(searchers)]
    for th in threads:
        th.start()
    for b in batches[1:]:
        index.add(b)
        time.sleep(0.002)  # let searches land between adds
    time.sleep(0.01)
    done.set()
    for th in threads:
        th.join()
    final = [which(qi, index.search(q, 7)) for qi, q in enumerate(queries)]
    return {**out, "errors": errors, "states_seen": len({m for s in seen.values() for m in s}),
            "final_is_last_state": all(n_adds - 1 in f for f in final), "size": len(index)}
