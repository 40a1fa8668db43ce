"""VQGAN decode (tokens -> pixels) and encode (pixels -> tokens): mmfast vs taming-transformers and
min-dalle, the same random weights for everyone, one process (peak memory: one subprocess each).

Size: taming's ImageNet f16-16384 (ch 128, ch_mult 1,1,2,2,4, 2 res blocks, attention at 16),
256x256 images from 16x16 token grids (`--quick`: the same widths on 4x4 grids, 64x64 px).
- decode, batch 1 and 4: taming's path (`get_codebook_entry` one-hot matmul, post_quant_conv,
  Decoder; the baseline), min-dalle's `VQGanDetokenizer` (its GroupNorm eps is 1e-5, its output
  clip(x, 0, 1); same weights otherwise), mmfast `VQGAN.prepare(dtype)` in fp32 and bf16.
  Quality: PSNR to taming fp32 on a [0, 1] scale of the clamped output ((clamp(x, -1, 1) + 1) / 2);
  "default" marks the mode mmfast's dtype="auto" picks here (bf16 on CPUs with native bf16 when
  it keeps >= 40 dB, else fp32); it is also timed on one thread (on a shared machine two threads
  wait on each other whenever another process holds a core).
- encode, batch 16: taming Encoder + quant_conv + VectorQuantizer (builds the [M, K] distance matrix
  and a one-hot; the baseline) vs mmfast fp32 (the CPU encoder stays fp32 so tokens are fp32's),
  whole batch and in micro-batches. Quality: share of tokens equal to taming's (the rest are ties
  or near-ties: the chosen code's distance is checked against the minimum in tests/vqgan).
  extra: peak_mb = peak RSS of one call minus the RSS before it (its inputs and weights resident),
  measured in a fresh subprocess per provider (/proc/self/clear_refs resets the high-water mark).
- decode again, last (the setting cannot be undone): glibc told never to mmap / trim, so freed
  activations are reused instead of page-faulted in fresh ("malloc=keep-freed"), every provider.
Rows name OMP_WAIT_POLICY (torch's OpenMP threads spin before they sleep by default; with another
busy process on a 2-vCPU machine that is what dominates two-thread times): run the suite under
`OMP_WAIT_POLICY=PASSIVE` to see the other side.
GFLOP/s use taming's nominal FLOP count (conv + matmul multiply-adds x 2) for every provider, so
they compare time; mmfast's folded upsample does 16/36 of those convs' work.
Random weights: the bf16 PSNR on trained weights differs (the runtime probes it at load time).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import torch

from ..harness import Case, Provider

DD = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
          ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0)
N_EMBED, EMBED_DIM = 16384, 256
ENCODE_CHUNKS = (16, 8, 4, 1)       # mmfast encode micro-batch sizes measured at batch 16


def _taming(seed: int = 0):
    """taming's modules with one set of random weights (codebook ~ N(0, 1), like trained codes' scale)."""
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer
    torch.manual_seed(seed)
    m = torch.nn.Module()
    m.encoder, m.decoder = Encoder(**DD), Decoder(**DD)
    m.quant_conv, m.post_quant_conv = torch.nn.Conv2d(256, EMBED_DIM, 1), torch.nn.Conv2d(EMBED_DIM, 256, 1)
    m.quantize = VectorQuantizer(N_EMBED, EMBED_DIM, beta=0.25)
    torch.nn.init.normal_(m.quantize.embedding.weight)
    return m.eval().requires_grad_(False)


def _mmfast(state: dict, dtype: torch.dtype):
    from mmfast.vqgan import VQGAN, vq_preset
    model = VQGAN(vq_preset("vqgan-f16-16384"))
    model.load_state_dict(state)
    return model.prepare(dtype)


def _min_dalle(state: dict):
    from min_dalle.models.vqgan_detokenizer import VQGanDetokenizer
    detok = VQGanDetokenizer().eval().requires_grad_(False)
    sd = {k: v for k, v in state.items() if k.startswith(("decoder.", "post_quant_conv."))}
    detok.load_state_dict({**sd, "embedding.weight": state["quantize.embedding.weight"]})
    return detok


def _min_dalle_decode(detok, ids):
    """min-dalle's forward for 16x16 grids (it tiles a square batch into one image); its body for others."""
    b, h, w = ids.shape
    if h == w == 16 and math.isqrt(b) ** 2 == b:
        return detok.forward(False, ids.reshape(b, h * w))
    z = detok.embedding(ids).permute(0, 3, 1, 2).contiguous()
    return detok.decoder(detok.post_quant_conv(z)).permute(0, 2, 3, 1).clip(0.0, 1.0) * 255


def _taming_decode(t, ids):
    b, h, w = ids.shape
    z = t.quantize.get_codebook_entry(ids.reshape(-1), (b, h, w, EMBED_DIM))   # one-hot @ codebook
    return t.decoder(t.post_quant_conv(z))


def _taming_encode(t, x):
    _, _, (_, _, ids) = t.quantize(t.quant_conv(t.encoder(x)))
    return ids.reshape(x.shape[0], x.shape[2] // 16, x.shape[3] // 16)


def _mmfast_encode(model, x, chunk):
    return torch.cat([model.encode(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])


def _psnr(got, want) -> float:
    a, b = ((got.clamp(-1, 1) + 1) / 2).double(), ((want.clamp(-1, 1) + 1) / 2).double()
    mse = float((a - b).pow(2).mean())
    return round(10 * math.log10(1 / mse), 2) if mse > 0 else float("inf")


def _nominal_flops(module, *inputs, batch: int) -> float:
    """2 x multiply-adds of every conv and attention matmul taming's module runs on these inputs
    (one image), times `batch`."""
    total = 0.0

    def conv(m, inp, out):
        nonlocal total
        total += 2.0 * out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]

    def attn(m, inp, out):                  # q k^T and p v: 2 * 2 n^2 c per image
        nonlocal total
        b, c, h, w = inp[0].shape
        total += 4.0 * b * (h * w) ** 2 * c

    hooks = [m.register_forward_hook(conv) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks += [m.register_forward_hook(attn) for m in module.modules() if type(m).__name__ == "AttnBlock"]
    try:
        with torch.inference_mode():
            module(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return total * batch


def _default_dtype(psnr_bf16: float) -> torch.dtype:
    from mmfast.quantize import has_fast_bf16
    return torch.bfloat16 if has_fast_bf16() and psnr_bf16 >= 40.0 else torch.float32


def _no_grad(fn):
    def run():
        with torch.inference_mode():
            return fn()
    return run


def _one_thread(fn):
    def run():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(n)
    return run


def _decode_case(t, fast, detok, ids, tag=""):
    B, grid = ids.shape[0], ids.shape[1]
    with torch.inference_mode():
        want = _taming_decode(t, ids)
        got = {dt: m.decode(ids) for dt, m in fast.items()}
    psnr = {dt: _psnr(y, want) for dt, y in got.items()}
    default = _default_dtype(psnr[torch.bfloat16])
    flops = _nominal_flops(t.decoder, torch.randn(1, 256, grid, grid), batch=B) + \
        2.0 * B * grid * grid * 256 * EMBED_DIM                                      # post_quant_conv
    providers = [
        Provider("taming Decoder fp32", _no_grad(lambda: _taming_decode(t, ids)), "fp32",
                 {"note": "the reference of psnr_db"}),
        Provider("min-dalle VQGanDetokenizer fp32", _no_grad(lambda: _min_dalle_decode(detok, ids)),
                 "fp32", {"note": "GroupNorm eps 1e-5, clip(0, 1) output: not compared"}),
    ]
    for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        m, quality = fast[dt], {"psnr_db": psnr[dt], "max_abs_diff": float((got[dt] - want).abs().max())}
        label = f"mmfast {name}" + (" (default)" if dt == default else "")
        providers.append(Provider(label, _no_grad(lambda m=m: m.decode(ids)), name, quality))
        if dt == default:   # the same on one thread: what a shared machine's other load does to two
            providers.append(Provider(label + " 1 thread", _one_thread(_no_grad(lambda m=m: m.decode(ids))),
                                      name, quality))
    return Case("vqgan.decode", f"f16-16384 B={B} {grid * 16}x{grid * 16}{tag}", providers,
                baseline="taming Decoder fp32", items=B, flops=flops,
                extra={"default_dtype": str(default).removeprefix("torch."), **_omp()})


def _omp() -> dict:
    """How torch's OpenMP threads wait (read once at start-up: spinning threads hurt on a busy machine)."""
    return {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (spin, then sleep)")}


def _wanted(args, op: str) -> bool:
    """run.py's --only filter, applied before a case's inputs and peers are built."""
    return not getattr(args, "only", "") or args.only in op


def _keep_freed_memory() -> bool:
    """glibc: never mmap (so never munmap) and never trim: freed activations are reused without
    page faults. Process-wide and irreversible here, so it runs last."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def cases(args):
    grid = 4 if args.quick else 16
    t = _taming()
    state = {k: v for k, v in t.state_dict().items()}
    fast = {torch.float32: _mmfast(state, torch.float32), torch.bfloat16: _mmfast(state, torch.bfloat16)}
    detok = _min_dalle(state)
    g = torch.Generator().manual_seed(0)
    decode_ids = {B: torch.randint(0, N_EMBED, (B, grid, grid), generator=g) for B in (1, 4)}
    for ids in decode_ids.values():
        if _wanted(args, "vqgan.decode"):
            yield _decode_case(t, fast, detok, ids)

    # ---- encode ----------------------------------------------------------------------------------
    if _wanted(args, "vqgan.encode"):
        yield _encode_case(t, fast[torch.float32], grid, g, args.quick)

    # ---- decode again with freed memory kept (glibc mallopt), for every provider -------------------
    if _wanted(args, "vqgan.decode") and _keep_freed_memory():
        for ids in decode_ids.values():
            yield _decode_case(t, fast, detok, ids, tag=" malloc=keep-freed")


def _encode_case(t, m32, grid, g, quick):
    side = grid * 16
    B = 2 if quick else 16
    chunks = (2, 1) if quick else ENCODE_CHUNKS
    x = torch.rand(B, 3, side, side, generator=g) * 2 - 1
    with torch.inference_mode():
        want_ids = _taming_encode(t, x)
    M = B * grid * grid
    flops = _nominal_flops(t.encoder, x[:1], batch=B) + 2.0 * M * 256 * EMBED_DIM \
        + 2.0 * M * N_EMBED * EMBED_DIM                       # quant_conv, the distances to every code
    peaks = {name: _peak_mb("encode", name, B, quick) for name in
             ["taming"] + [f"mmfast chunk={c}" for c in chunks]}

    def mem(name):
        p, base = peaks[name], peaks["taming"]
        return {"peak_mb": p, "peak_vs_taming": round(p / base, 3) if p and base else None}

    providers = [Provider("taming Encoder+quant_conv+VectorQuantizer fp32",
                          _no_grad(lambda: _taming_encode(t, x)), "fp32", {"tokens_equal": 1.0, **mem("taming")})]
    for c in chunks:
        with torch.inference_mode():
            same = float((_mmfast_encode(m32, x, c) == want_ids).float().mean())
        providers.append(Provider(f"mmfast fp32 micro-batch {c}" if c < B else "mmfast fp32",
                                  _no_grad(lambda c=c: _mmfast_encode(m32, x, c)), "fp32",
                                  {"tokens_equal": round(same, 5), **mem(f"mmfast chunk={c}")}))
    return Case("vqgan.encode", f"f16-16384 B={B} {side}x{side}", providers,
                baseline="taming Encoder+quant_conv+VectorQuantizer fp32", items=B, flops=flops,
                extra={"peak_note": "one call's peak RSS over the RSS before it, first call in a fresh process",
                       **_omp()})


# ---- peak memory: one provider per fresh process -------------------------------------------------
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_mb(op: str, provider: str, batch: int, quick: bool) -> float | None:
    """Run `python -m benchmarks.suites.vqgan --peak ...` and return its peak MB (None off Linux)."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    cmd = [sys.executable, "-m", "benchmarks.suites.vqgan", "--peak", op, provider, str(batch)] + \
        (["--quick"] if quick else [])
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def _peak_worker(op: str, provider: str, batch: int, quick: bool) -> dict:
    grid = 4 if quick else 16
    t = _taming()
    x = torch.rand(batch, 3, grid * 16, grid * 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    if provider == "taming":
        fn = lambda: _taming_encode(t, x)  # noqa: E731
    else:
        model = _mmfast({k: v for k, v in t.state_dict().items()}, torch.float32)
        chunk = int(provider.split("=")[1])
        fn = lambda: _mmfast_encode(model, x, chunk)  # noqa: E731
        del t
    import ctypes
    import gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)        # freed memory back to the OS: RSS = live data
    before = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                               # reset the high-water mark VmHWM to the current RSS
    t0 = time.perf_counter()
    with torch.inference_mode():
        fn()                                       # the first call: nothing freed is reused from before
    secs = time.perf_counter() - t0
    peak = _rss_kb("VmHWM")
    return {"op": op, "provider": provider, "peak_mb": round((peak - before) / 1024, 1), "seconds": secs}


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "--peak":
        print(json.dumps(_peak_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), "--quick" in sys.argv)))
