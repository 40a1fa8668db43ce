"""`backend="onnxruntime"` and `backend="auto"` for `Clip`, `VQ` and `Generator`.

"auto" measures, per model part, PyTorch (in what `dtype="auto"` picks there) against ONNX Runtime
(fp32, and int8 where the family has it) on a short probe, and keeps the fastest candidate whose
outputs keep `dtype="auto"`'s fidelity bar against PyTorch fp32:

    CLIP towers     embedding cosine >= 0.999
    VQGAN encoder   latents within 1e-4 (scaled), so the tokens are fp32's up to exact ties
    VQGAN decoder   PSNR >= 40 dB
    DALL·E encoder  state within 1e-4 (scaled);  decode step: the same greedy tokens

A faster candidate must win by `MARGIN` to displace PyTorch (noise on a shared machine). The
measurement is cached in `<mmfast cache>/auto/` keyed by the weights, the machine, the versions and
the arguments, so a later load of the same model builds its choice without probing. Each runtime
gets `info` = {part: {"backend", "dtype", "why", measurements}}.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import math
import os
import time
import warnings

import torch
import torch.nn.functional as F

from .onnxruntime import OrtClip, OrtVQ, _machine, cache_root, check_dtype, exported, quantized, weights_sha256
from .onnxruntime_dalle import OrtDalleDecoder, OrtDalleEncoder

BACKENDS = ("torch", "onnxruntime", "tensorrt", "auto")
MARGIN = 1.05
_PROBE_STEPS = 8
_PROBE_FORMAT = 2     # bump when what a probe measures changes: older cached measurements then miss
ENV = "MMFAST_BACKEND"   # the loaders' default backend when none is passed ("auto" when unset)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; use one of {', '.join(map(repr, BACKENDS))}")
    return backend


def resolve_backend(backend: str | None) -> str:
    """The loaders' `backend=None`: $MMFAST_BACKEND if set, else "auto" (the measured fastest per part)."""
    if backend is not None:
        return check_backend(backend)
    env = os.environ.get(ENV, "").strip()
    if env and env not in BACKENDS:
        raise ValueError(f"${ENV}={env!r} is not a backend; set it to one of {', '.join(BACKENDS)} or unset it")
    return env or "auto"


def ort_missing() -> str | None:
    """Why ONNX Runtime cannot be a candidate here (None when it can)."""
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        return "ONNX Runtime is not installed (pip install 'mmfast[onnx]'), so PyTorch runs every part"
    return None


def _tensorrt_precision(what: str, dtype, device) -> str:
    """TensorRT's precision for `dtype` ("auto" -> fp16), after checking that it can run here at all."""
    from mmfast.export.tensorrt import PRECISIONS, import_tensorrt
    if device.type != "cuda":
        raise ValueError(f"backend='tensorrt' runs {what} on an NVIDIA GPU, but device={str(device)!r}; pass "
                         "device='cuda', or backend='onnxruntime' / 'torch' on the CPU")
    name = "fp16" if dtype == "auto" else {"float16": "fp16", "float32": "fp32"}.get(str(dtype), str(dtype))
    if name not in PRECISIONS:
        raise ValueError(f"dtype={dtype!r} cannot run {what} on TensorRT; use one of {PRECISIONS} or 'auto'")
    import_tensorrt()
    return name


def _timed(fn, repeats: int = 3) -> float:
    fn()                                                    # warm-up: first-call allocations, ORT arenas
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _key(*parts) -> str:
    import onnxruntime

    from mmfast import __version__
    text = json.dumps([str(p) for p in parts] + [_machine(), torch.__version__, onnxruntime.__version__,
                                                   __version__, torch.get_num_threads(), _PROBE_FORMAT])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _cached(key: str) -> dict | None:
    try:
        return json.loads((cache_root() / "auto" / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None


def _store(key: str, choice: dict) -> None:
    try:
        d = cache_root() / "auto"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{key}.json").write_text(json.dumps(choice, indent=1))
    except OSError:
        pass                                                # an unwritable cache only costs a probe next time


def _pick(part: str, cands: dict, fidelity: dict, ok, times: dict) -> dict:
    """The fastest candidate that passes `ok`, PyTorch unless another wins by MARGIN."""
    good = [c for c in cands if ok(fidelity[c])] or ["torch"]      # none keeps it: what dtype= chose
    best = min(good, key=lambda c: times[c])
    if best != "torch" and "torch" in good and times["torch"] < MARGIN * times[best]:
        best = "torch"
    runner = ", ".join(f"{c} {times[c] * 1e3:.1f} ms" for c in cands)
    why = f"fastest of {runner} that keeps the fidelity bar ({part})"
    return {"choice": best, "times_ms": {c: times[c] * 1e3 for c in cands},
            "fidelity": {c: fidelity[c] for c in cands}, "why": why}


def _info(choice: dict, dtype_of) -> dict:
    return {part: {"backend": c["choice"].split()[0], "dtype": dtype_of(part, c["choice"]), "why": c["why"],
                   "times_ms": c.get("times_ms"), "fidelity": c.get("fidelity")} for part, c in choice.items()}


# ---- CLIP ----------------------------------------------------------------------------------------------
class _PartsClip:
    """Routes each CLIP tower call to the engine that runs it (a torch CLIP or an OrtClip): per tower a
    list of (largest batch, engine, input dtype), the first whose bound covers the call's batch."""

    def __init__(self, image: list, text: list):
        self.image, self.text = image, text
        first = text[0][1]
        self.cfg, self.logit_scale = first.cfg, first.logit_scale

    @staticmethod
    def _route(routes: list, n: int):
        return next(r for r in routes if n <= r[0])

    def encode_image(self, pixels):
        _, m, dt = self._route(self.image, pixels.shape[0])
        return m.encode_image(pixels.to(dt))

    def encode_text(self, ids):
        return self._route(self.text, ids.shape[0])[1].encode_text(ids)

    def pool_positions(self, ids):
        return self.text[0][1].pool_positions(ids)


_INPUT = {"bf16": torch.bfloat16, "fp16": torch.float16}
_LARGE = 8          # the second probe batch is this many times the first (2 -> 16 images, 4 -> 32 texts)


def clip_backend(clip, model, backend: str, dtype):
    """(dtype name, model object, info) for `Clip.__init__` with backend "onnxruntime" or "auto"."""
    from mmfast.clip.runtime import AUTO_MIN_COSINE, _probe_inputs
    from mmfast.quantize import has_vnni

    px, ids = _probe_inputs(clip.config, clip.tokenizer, clip.preprocess)
    if backend == "onnxruntime":
        # "auto": int8 on VNNI CPUs if it keeps the bar on these weights (as torch's dtype="auto"), else fp32
        want = ("int8" if has_vnni() else "fp32") if dtype == "auto" else dtype
        name = check_dtype("CLIP", want, clip.device)
        with torch.inference_mode():
            ref_i, ref_t = model.encode_image(px), model.encode_text(ids)
        while True:
            m = OrtClip(model, int8=name == "int8")
            cos = {"image": float(F.cosine_similarity(m.encode_image(px), ref_i).min()),
                   "text": float(F.cosine_similarity(m.encode_text(ids), ref_t).min())}
            if dtype != "auto" or name == "fp32" or min(cos.values()) >= AUTO_MIN_COSINE:
                break
            name = "fp32"
        why = "backend='onnxruntime', " + (f"dtype={dtype!r}" if dtype != "auto" else
                                           "int8 keeps cosine >= 0.999 here" if name == "int8" else
                                           "fp32 (int8 needs VNNI and cosine >= 0.999 on the probe)")
        return name, m, {p: {"backend": "onnxruntime", "dtype": name, "why": why, "cosine_min": c}
                         for p, c in cos.items()}
    if backend == "tensorrt":
        from .tensorrt import TrtClip
        name = _tensorrt_precision("CLIP", dtype, clip.device)
        m = TrtClip(model, cache_dir=cache_root() / "tensorrt", precision=name, device=clip.device)
        return name, m, {p: {"backend": "tensorrt", "dtype": name, "why": "backend='tensorrt'"} for p in ("image", "text")}
    if clip.device.type != "cpu" or ort_missing():
        name, m = clip._choose(model, dtype)
        why = ort_missing() or f"ONNX Runtime runs on CPU here and the device is {clip.device}"
        return name, m, {p: {"backend": "torch", "dtype": name, "why": why} for p in ("image", "text")}
    key = _key("clip", weights_sha256(model), dtype, clip.device)
    choice = _cached(key)
    cands = {}
    if choice is None:
        with torch.inference_mode():
            ref_i, ref_t = model.encode_image(px), model.encode_text(ids)
        name, tm = clip._choose(copy.deepcopy(model), dtype)
        cands = {"torch": (name, tm), "onnxruntime fp32": ("fp32", OrtClip(model))}
        if dtype in ("auto", "int8"):
            cands["onnxruntime int8"] = ("int8", OrtClip(model, int8=True))
        choice = {}
        for part, x, ref, fn in (("image", px, ref_i, "encode_image"), ("text", ids, ref_t, "encode_text")):
            fid, times, big = {}, {}, {}
            xl = x.repeat(_LARGE, *([1] * (x.dim() - 1)))
            for c, (n, m) in cands.items():
                cast = (lambda t, n=n: t.to(clip.device, _INPUT.get(n, torch.float32))) if part == "image" else \
                    (lambda t: t)
                inp, inp_l = cast(x), cast(xl)
                with torch.inference_mode():
                    fid[c] = float(F.cosine_similarity(getattr(m, fn)(inp).float().cpu(), ref).min())
                    times[c] = _timed(lambda: getattr(m, fn)(inp))
                    big[c] = _timed(lambda: getattr(m, fn)(inp_l), repeats=2)
            choice[part] = _pick(f"{part}, batch {x.shape[0]}", cands, fid, lambda v: v >= AUTO_MIN_COSINE, times)
            large = _pick(f"{part}, batch {xl.shape[0]}", cands, fid, lambda v: v >= AUTO_MIN_COSINE, big)
            if large["choice"] != choice[part]["choice"]:     # the winner depends on the batch: route by it
                large["from_batch"] = int(math.sqrt(x.shape[0] * xl.shape[0])) + 1
                choice[part]["large"] = large
                choice[part]["why"] += f"; from batch {large['from_batch']}: {large['choice']}, " + large["why"]
            choice[part]["torch_dtype"] = cands["torch"][0]
        _store(key, choice)
    else:
        for part in choice:
            choice[part]["why"] = "cached measurement: " + choice[part]["why"]

    built = dict(cands)

    def build(c):
        if c not in built:
            if c == "torch":
                built[c] = clip._choose(copy.deepcopy(model), choice["image"]["torch_dtype"])
            else:
                built[c] = ("int8", OrtClip(model, int8=True)) if c.endswith("int8") else ("fp32", OrtClip(model))
        return built[c]

    def routes(part):
        c = choice[part]
        small = build(c["choice"])
        if "large" not in c:
            return [(float("inf"), small[1], _INPUT.get(small[0], torch.float32))]
        large = build(c["large"]["choice"])
        return [(c["large"]["from_batch"] - 1, small[1], _INPUT.get(small[0], torch.float32)),
                (float("inf"), large[1], _INPUT.get(large[0], torch.float32))]

    img_r, txt_r = routes("image"), routes("text")
    engines = {id(r[1]) for r in img_r + txt_r}
    names = {build(choice[p][k]["choice"] if k else choice[p]["choice"])[0]
             for p in ("image",) for k in ((None, "large") if "large" in choice[p] else (None,))}
    if len(engines) == 1:
        m = img_r[0][1]
    else:
        m = _PartsClip(img_r, txt_r)
    info = _info(choice, lambda p, c: build(c)[0])
    for p in ("image", "text"):
        if "large" in choice[p]:
            lg = choice[p]["large"]
            info[p]["large_batch"] = {"from_batch": lg["from_batch"], "backend": lg["choice"].split()[0],
                                      "dtype": build(lg["choice"])[0], "times_ms": lg["times_ms"]}
    # Clip casts pixels to this dtype's type before the call; a routed image tower casts per engine
    return (names.pop() if len(names) == 1 else "fp32"), m, info


# ---- VQGAN ------------------------------------------------------------------------------------------------
def _psnr(a, b, cfg):
    from mmfast.vqgan.runtime import _to_unit, psnr
    return psnr(_to_unit(a, cfg), _to_unit(b, cfg))


def vq_backend(vq, model, backend: str, dtype):
    """(dtype name, model object, info) for `VQ.__init__` with backend "onnxruntime" or "auto"."""
    from mmfast.export.onnx_common import worst
    from mmfast.vqgan.runtime import AUTO_MIN_PSNR

    cfg = model.cfg
    parts = ("encoder", "decoder") if cfg.has_encoder else ("decoder",)
    if backend == "onnxruntime":
        name = check_dtype("the VQGAN", "fp32" if dtype == "auto" else dtype, vq.device, allowed=("fp32",))
        info = {p: {"backend": "onnxruntime", "dtype": name, "why": "backend='onnxruntime'"} for p in parts}
        return name, OrtVQ(model, parts=parts), info
    if backend == "tensorrt":
        from .tensorrt import TrtVQ
        name = _tensorrt_precision("the VQGAN", dtype, vq.device)
        m = TrtVQ(model, cache_dir=cache_root() / "tensorrt", precision=name, device=vq.device)
        return "fp32", m, {p: {"backend": "tensorrt", "dtype": name, "why": "backend='tensorrt'"} for p in parts}
    if vq.device.type != "cpu" or ort_missing():
        name, m = vq._choose(model, dtype)
        why = ort_missing() or f"ONNX Runtime runs on CPU here and the device is {vq.device}"
        return name, m, {p: {"backend": "torch", "dtype": name, "why": why} for p in parts}
    key = _key("vq", weights_sha256(model), dtype, vq.device)
    choice = _cached(key)
    ort = None
    all_ort = choice is not None and all(choice[p]["choice"] != "torch" for p in parts)
    name, tm = ("fp32", None) if all_ort else vq._choose(copy.deepcopy(model), dtype)   # torch's dtype="auto"
    if choice is None:
        ref = tm if name == "fp32" else vq._prepare(copy.deepcopy(model), "fp32")
        ort = OrtVQ(model, parts=parts)
        ids = vq._probe_tokens(ref)
        g = torch.Generator().manual_seed(1)
        side = 8 * cfg.factor
        px = vq._to_model_range(F.interpolate(torch.rand(2, 3, 4, 4, generator=g), size=(side, side),
                                              mode="bicubic", align_corners=False).clamp(0, 1))
        choice = {}
        with torch.inference_mode():
            cands = {"torch": tm, "onnxruntime fp32": ort}
            if cfg.has_encoder:
                want = ref.encode_latents(px).float()
                fid = {c: worst(m.encode_latents(px).float().numpy(), want.numpy()) for c, m in cands.items()}
                times = {c: _timed(lambda: m.encode(px)) for c, m in cands.items()}
                choice["encoder"] = _pick("encoder", cands, fid, lambda v: v <= 1e-4, times)
            want = ref.decode(ids)
            fid = {c: _psnr(m.decode(ids), want, cfg) for c, m in cands.items()}
            times = {c: _timed(lambda: m.decode(ids)) for c, m in cands.items()}
            choice["decoder"] = _pick("decoder", cands, fid, lambda v: v >= AUTO_MIN_PSNR, times)
        _store(key, choice)
    else:
        for part in choice:
            choice[part]["why"] = "cached measurement: " + choice[part]["why"]
    on_ort = tuple(p for p in parts if choice[p]["choice"] != "torch")
    if not on_ort:
        m = tm
    elif len(on_ort) == len(parts):
        m = ort or OrtVQ(model, parts=parts)
    else:                                                    # one part each: torch runs the other
        m = OrtVQ(model, parts=on_ort, fallback=tm)
    info = _info(choice, lambda p, c: name if c == "torch" else "fp32")
    return (name if len(on_ort) < len(parts) else "fp32"), m, info


# ---- DALL·E ----------------------------------------------------------------------------------------------
def ort_generator_parts(paths: dict, decoder, dtype: str, threads: int | None = None) -> dict:
    """{part: ORT object} from exported paths ("encoder", "step"); int8 quantizes the step's MatMuls.
    `decoder` (fp32 torch) lends its cross-attention projections, copied."""
    out = {}
    if "encoder" in paths:
        out["encoder"] = OrtDalleEncoder(paths["encoder"], threads=threads, width=decoder.cfg.width)
    if "step" in paths:
        step = quantized(paths["step"], op_types=["MatMul"]) if dtype == "int8" else paths["step"]
        out["step"] = OrtDalleDecoder(decoder, step, threads=threads)
    return out


def _probe_generate(gen, text, steps: int) -> tuple[torch.Tensor, float]:
    """Greedy tokens of `steps` decode steps (guidance 16) and the seconds per step, through
    `gen`'s encoder / decoder / decode_step (whatever backend they are)."""
    cfg = gen.config
    one = lambda v, t: torch.full((1,), v, dtype=t)  # noqa: E731
    params = (one(1.0, torch.float32), one(1, torch.long), one(1.0, torch.float32), one(16.0, torch.float32))
    with torch.inference_mode():
        ck, cv, cl = gen.decoder.cross_kv(gen.encoder(text), text)
        k, v = gen.decoder.new_cache(2)
        prev, out = one(cfg.start_token, torch.long), []
        t = time.perf_counter()
        for i in range(steps):
            prev = gen.decode_step(gen.decoder, prev, torch.tensor(i), k, v, ck, cv, cl, one(0, torch.long), *params,
                                   max_top_k=min(256, cfg.codebook_size)).clone()   # greedy (top_k 1) at the default
            # top-k's candidate count, so the probe pays what sampling costs each engine
            out.append(prev)
    return torch.cat(out), (time.perf_counter() - t) / steps


class _Parts:
    """A stand-in generator for probes: config, encoder, decoder, decode_step."""

    def __init__(self, config, encoder, decoder, decode_step):
        self.config, self.encoder, self.decoder, self.decode_step = config, encoder, decoder, decode_step


def generator_backend(gen, encoder, decoder, tokenizer, *, backend: str, device, dtype, detoker_path=None) -> None:
    """`Generator.__init__` for backend "onnxruntime" / "auto": sets up `gen` with the parts `backend`
    picks. `encoder` / `decoder` are the fp32 torch modules: the graphs are exported from them (cached)
    before the torch candidate, a `Generator` in `dtype`, is built from them in place (so the fp32
    weights, the torch candidate's and ORT's never all sit in memory at once)."""
    from mmfast.dalle.generate import Generator, _device, decode_step
    from mmfast.export.onnx_common import worst

    check_backend(backend)
    dev = _device(device)
    if backend == "tensorrt":
        raise ValueError("backend='tensorrt' is not offered for the generator: its decode loop runs on "
                         "backend='torch' or 'onnxruntime'; TensorRT engines of the step's logits graph come "
                         "from mmfast.export (opset-17 logits export) for a serving stack of your own")

    def build(d):
        return Generator(encoder, decoder, tokenizer, device=device, dtype=d, detoker_path=detoker_path)

    def adopt(tg, ort: dict, choice: dict):
        gen.__dict__.update(tg.__dict__)                     # tokenizer, device, vq, ... as the torch path sets them
        if "encoder" in ort:
            gen.encoder = ort["encoder"]
        if "step" in ort:
            gen.decoder, gen.decode_step, gen.dtype = ort["step"], ort["step"].decode_step, torch.float32
            gen.mode = choice["step"]["dtype"]
        gen.info = choice
        gen.backend = backend if backend == "onnxruntime" else "auto: " + ", ".join(
            f"{p} {i['backend']} {i['dtype']}" for p, i in choice.items())

    torch_mode = lambda tg: getattr(tg, "mode", str(tg.dtype).removeprefix("torch."))  # noqa: E731
    if backend == "onnxruntime":
        name = check_dtype("the DALL·E generator", "fp32" if dtype == "auto" else dtype, dev)
        ort = ort_generator_parts(exported("dalle", (encoder, decoder), ("encoder", "step")), decoder, name)
        why = "backend='onnxruntime'" + (f", dtype={dtype!r}" if dtype != "auto" else "")
        adopt(build("fp32"), ort, {"encoder": {"backend": "onnxruntime", "dtype": "fp32", "why": why},
                                   "step": {"backend": "onnxruntime", "dtype": name, "why": why}})
        return
    if dev.type != "cpu" or ort_missing():
        tg = build(dtype)
        why = ort_missing() or f"ONNX Runtime runs on CPU here and the device is {dev}"
        adopt(tg, {}, {p: {"backend": "torch", "dtype": torch_mode(tg), "why": why} for p in ("encoder", "step")})
        return
    key = _key("dalle", weights_sha256(encoder, decoder), dtype, dev)
    choice = _cached(key)
    need = ("encoder", "step") if choice is None else tuple(p for p in ("encoder", "step")
                                                              if choice[p]["choice"] != "torch")
    ort = ort_generator_parts(exported("dalle", (encoder, decoder), need), decoder, "fp32") if need else {}
    if choice is None:
        with warnings.catch_warnings():                      # a model with short text rows: cut, as intended
            warnings.simplefilter("ignore")
            text = tokenizer(["a red apple on a wooden table"]).flatten(0, 1)   # (2, text_tokens)
        with torch.inference_mode():
            want_state = encoder(text)
        want, _ = _probe_generate(_Parts(decoder.cfg, encoder, decoder, decode_step), text, _PROBE_STEPS)
    tg = build(dtype)
    if choice is None:
        with torch.inference_mode():
            cands = {"torch": tg.encoder, "onnxruntime fp32": ort["encoder"]}
            fid = {c: worst(m(text).float().numpy(), want_state.numpy()) for c, m in cands.items()}
            times = {c: _timed(lambda: m(text)) for c, m in cands.items()}
        choice = {"encoder": _pick("encoder", cands, fid, lambda v: v <= 1e-4, times)}
        probes = {"torch": tg, "onnxruntime fp32": _Parts(decoder.cfg, ort["encoder"], ort["step"],
                                                           ort["step"].decode_step)}
        for _ in range(2):                                   # the second round: both warm
            got = {c: _probe_generate(g, text, _PROBE_STEPS) for c, g in probes.items()}
        fid = {c: bool(torch.equal(g[0], want)) for c, g in got.items()}
        choice["step"] = _pick("step", got, fid, bool, {c: g[1] for c, g in got.items()})
        _store(key, choice)
    else:
        for part in choice:
            choice[part]["why"] = "cached measurement: " + choice[part]["why"]
    info = _info(choice, lambda p, c: "fp32" if c != "torch" else torch_mode(tg))
    adopt(tg, {p: o for p, o in ort.items() if choice[p]["choice"] != "torch"}, info)
