"""Fuzz every op of mmfast.kernels against its reference in kernels/ref.py.

Shapes are odd and sometimes empty or mismatched, dtypes every kind (int, bool, float64, the three
float types), values sometimes NaN / inf / huge, arguments sometimes of the wrong type. A call that
returns must equal the reference within the dtype's tolerance; every other call must be refused with
an error naming the argument.
"""
import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from mmfast import kernels
from mmfast.kernels import ref
from tests.fuzz.oracle import run_case

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
ANY = FLOATS * 3 + [torch.float64, torch.int8, torch.int32, torch.int64, torch.bool, torch.uint8]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # relative to the values' scale


def pick(data, hostile: bool, good, *bad):
    """`good` in a valid case; in a hostile one, `good` or one of `bad`."""
    return data.draw(st.sampled_from([good] * 2 + list(bad))) if hostile else good


def tensor(draw, shape, dtype, special=True):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    t = torch.randn(shape, generator=g)
    if special and t.numel() and draw(st.integers(0, 9)) == 0:
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf"), 1e30]))
    if dtype == torch.bool:
        return t > 0
    if not dtype.is_floating_point:
        return (t * 10).clamp(-100, 100).to(dtype)
    return t.to(dtype)


def maybe_not_a_tensor(draw, t, hostile=True):
    if not hostile:
        return t
    return draw(st.sampled_from([t] * 12 + [None, t.tolist() if t.numel() < 50 else 1.0, "x", t.numpy()
                                            if t.dtype not in (torch.bfloat16,) else 3]))


def tame(*ts) -> bool:
    """All values finite and moderate: where decode_attention / group_norm_silu define their results. With
    NaN / inf / 1e30 inputs (overflowing products) only the shape and dtype are checked: the fused kernels
    and the references order their reductions differently, so which entries end up NaN may differ."""
    return all(bool(t.float().isfinite().all()) and float(t.float().abs().max()) < 1e20 for t in ts if t.numel())


def close(got, want, dtype, what, scale=1.0):
    got, want = got.float(), want.float()
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got)), f"{what}: non-finite entries differ from the reference"
    err = (got[fin] - want[fin]).abs().max().item() if fin.any() else 0.0
    lim = TOL.get(dtype, 2e-5) * max(1.0, want[fin].abs().max().item() if fin.any() else 1.0) * scale
    assert err <= lim, f"{what}: off the reference by {err} (> {lim})"


@given(data=st.data())
def test_similarity_topk_and_similarity(data):
    h = data.draw(st.booleans())
    d = pick(data, h, data.draw(st.sampled_from([1, 3, 16, 33, 64])), 0)
    q_rows, n = data.draw(st.integers(0, 9)), pick(data, h, data.draw(st.integers(1, 40)), 0)
    qd = pick(data, h, data.draw(st.sampled_from(FLOATS)), *ANY)
    gd = pick(data, h, data.draw(st.sampled_from(FLOATS + [torch.int8])), *ANY)
    q = tensor(data.draw, (q_rows, d + pick(data, h, 0, 1)), qd)
    g = tensor(data.draw, pick(data, h, (n, d), (n,)), gd, special=False)
    if g.is_floating_point() and g.dim() == 2 and n and d:
        g = torch.nn.functional.normalize(g.float(), dim=-1).to(gd)
    if gd == torch.int8 and g.dim() == 2:
        g = torch.randint(-127, 128, g.shape, dtype=torch.int8, generator=torch.Generator().manual_seed(n))
    gscale = pick(data, h, torch.rand(n) / 100 if gd == torch.int8 else None, torch.rand(n).double(),
                  torch.rand(n + 1), 0.5)
    scale = pick(data, h, data.draw(st.sampled_from([None, None, 100.0, -1.0, 0.0, torch.tensor(4.6)])),
                 float("nan"), "x", [1.0])
    k = pick(data, h, data.draw(st.integers(1, max(n, 1))), -1, 0, n + 1, True, 2.0, None)
    q, g = maybe_not_a_tensor(data.draw, q, h), maybe_not_a_tensor(data.draw, g, h)
    pre = None
    if isinstance(g, torch.Tensor) and g.dim() == 2 and g.shape[1] and g.dtype in (torch.float16, torch.bfloat16) \
            and data.draw(st.booleans()):
        pre = kernels.similarity_prefilter(g) if data.draw(st.integers(0, 5)) else (g,)
    names = ["queries", "gallery", "gallery_scale", "scale", "k", "prefilter"]

    def check_topk(out):
        scores, ids = out
        ws, _ = ref.similarity_topk_ref(q, g, k, scale=scale, gallery_scale=gscale)
        assert scores.shape == ws.shape and ids.shape == ws.shape, "shape"
        close(scores, ws, g.dtype, "similarity_topk scores", scale=abs(float(scale or 1)) or 1)
        full = ref.similarity_ref(q, g, scale=scale, gallery_scale=gscale).nan_to_num(nan=float("-inf"))
        close(full.gather(1, ids) if ids.numel() else ids.float(), ws, g.dtype, "similarity_topk ids' scores",
              scale=abs(float(scale or 1)) or 1)

    def check_full(out):
        close(out, ref.similarity_ref(q, g, scale=scale, gallery_scale=gscale), g.dtype, "similarity",
              scale=abs(float(scale or 1)) or 1)

    run_case("kernels.similarity_topk", lambda: kernels.similarity_topk(q, g, k, scale=scale, gallery_scale=gscale,
                                                                      prefilter=pre),
             names=names, check=check_topk)
    run_case("kernels.similarity", lambda: kernels.similarity(q, g, scale=scale, gallery_scale=gscale),
             names=names, check=check_full)


@given(data=st.data())
def test_similarity_prefilter(data):
    h = data.draw(st.booleans())
    shape = pick(data, h, data.draw(st.sampled_from([(5, 8), (33, 17), (1, 1), (0, 4)])), (3, 0), (8,), (2, 3, 4))
    g = tensor(data.draw, shape, pick(data, h, data.draw(st.sampled_from([torch.float16, torch.bfloat16])), *ANY))
    g = maybe_not_a_tensor(data.draw, g, h)

    def check(out):
        codes, cs, ce = out
        gf = g.double()
        finite = torch.isfinite(gf).all(dim=1)
        approx = codes.double() * cs.double()[:, None]
        err = (torch.where(finite[:, None], gf, 0.0) - approx).norm(dim=1)
        assert torch.all(err[finite] <= ce.double()[finite]), "code_err does not bound the quantisation error"
        assert torch.all(torch.isinf(ce[~finite])), "a non-finite row must get code_err = inf"

    run_case("kernels.similarity_prefilter", lambda: kernels.similarity_prefilter(g), names=["gallery"], check=check)


@given(data=st.data())
def test_nearest_code(data):
    h = data.draw(st.booleans())
    K, D = pick(data, h, data.draw(st.sampled_from([(1, 1), (7, 3), (97, 8), (256, 16)])), (0, 4), (5, 0))
    dt = pick(data, h, data.draw(st.sampled_from(FLOATS)), *ANY)
    cb = tensor(data.draw, pick(data, h, (K, D), (K,)), pick(data, h, dt, *ANY))
    lead = pick(data, h, data.draw(st.sampled_from([(5,), (2, 3), (1, 2, 2), (0,)])), ())
    x = tensor(data.draw, (*lead, D + pick(data, h, 0, 1)), dt)
    sq = None
    if data.draw(st.booleans()) and cb.dim() == 2:
        sq = pick(data, h, cb.float().pow(2).sum(1), torch.zeros(K + 1), cb.pow(2).sum(1).double(), "x")
    x, cb = maybe_not_a_tensor(data.draw, x, h), maybe_not_a_tensor(data.draw, cb, h)
    want_dist = data.draw(st.booleans())

    def check(out):
        ids, dist = out if want_dist else (out, None)
        assert ids.shape == x.shape[:-1] and ids.dtype == torch.int64, "shape / dtype"
        wid, wd = ref.nearest_code_ref(x, cb, codebook_sqnorm=sq, return_distance=True)
        assert torch.equal(ids == -1, wid == -1), "rows marked -1 (not finite) differ from the reference"
        ok = ids != -1
        if ok.any():  # ties flip: the chosen code's distance must be the minimum, within tolerance
            xf = x.reshape(-1, D).float()[ok.reshape(-1)]
            e = cb.float()
            chosen = (xf - e[ids[ok]]).pow(2).sum(-1)
            best = (xf - e[wid[ok]]).pow(2).sum(-1)
            e2 = e.pow(2).sum(-1)
            e2 = e2[torch.isfinite(e2)].max() if torch.isfinite(e2).any() else 0.0  # NaN codes never win
            tol = TOL[cb.dtype] * 4 * (1 + xf.pow(2).sum(-1) + e2)
            assert torch.all(chosen <= best + tol), "a chosen code is not the nearest"
        if dist is not None:
            assert torch.equal(dist.isnan(), ids == -1), "dist is NaN exactly where ids is -1"

    run_case("kernels.nearest_code", lambda: kernels.nearest_code(x, cb, codebook_sqnorm=sq,
                                                                  return_distance=want_dist),
             names=["x", "codebook", "codebook_sqnorm"], check=check)


@given(data=st.data())
def test_decode_attention(data):
    h = data.draw(st.booleans())
    B, H = pick(data, h, data.draw(st.integers(1, 3)), 0), pick(data, h, data.draw(st.integers(1, 3)), 0)
    T, D = pick(data, h, data.draw(st.integers(1, 20)), 0), pick(data, h, data.draw(st.sampled_from([1, 8, 17, 64])), 0)
    dt = pick(data, h, data.draw(st.sampled_from(FLOATS)), *ANY)
    q = tensor(data.draw, pick(data, h, (B, H, D), (B, H, 1, D)), dt)
    k = tensor(data.draw, (B, H, T, D), pick(data, h, dt, *ANY))
    v = tensor(data.draw, (B, H, T + pick(data, h, 0, 1), D), dt)
    lengths = torch.tensor([pick(data, h, data.draw(st.integers(1, max(T, 1))), -1, 0, T + 1) for _ in range(B)],
                           dtype=pick(data, h, data.draw(st.sampled_from([torch.int32, torch.int64])), torch.float32))
    scale = pick(data, h, data.draw(st.sampled_from([None, None, 0.5])), float("inf"), "x")
    check_lengths = pick(data, h, True, False)
    q, k, v, lengths = (maybe_not_a_tensor(data.draw, t, h) for t in (q, k, v, lengths))

    def check(out):
        # positions at or past lengths[b] are never read: the reference would still multiply their NaNs by 0
        T = k.shape[2]
        past = (torch.arange(T)[None, :] >= lengths.clamp(0, T)[:, None])[:, None, :, None]  # (B, 1, T, 1)
        want = ref.decode_attention_ref(q, k.masked_fill(past, 0), v.masked_fill(past, 0), lengths, scale=scale)
        assert out.shape == want.shape and out.dtype == want.dtype, "shape / dtype"
        valid = ~past.expand(k.shape)
        if tame(q, k[valid], v[valid]):
            close(out, want, q.dtype, "decode_attention")

    run_case("kernels.decode_attention", lambda: kernels.decode_attention(q, k, v, lengths, scale=scale,
                                                                          check_lengths=check_lengths),
             names=["q", "k_cache", "v_cache", "lengths", "scale"], check=check)


@given(data=st.data())
def test_group_norm_silu(data):
    hs = data.draw(st.booleans())
    C = data.draw(st.sampled_from([1, 4, 32, 64, 6]))
    B, H, W = pick(data, hs, data.draw(st.integers(1, 2)), 0), data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    dt = pick(data, hs, data.draw(st.sampled_from(FLOATS)), *ANY)
    x = tensor(data.draw, pick(data, hs, (B, C, H, W), (C, H, W)), dt)
    if x.dim() == 4 and data.draw(st.booleans()):
        x = x.contiguous(memory_format=torch.channels_last)
    w = tensor(data.draw, (C + pick(data, hs, 0, 1),), pick(data, hs, torch.float32, *ANY))
    b = tensor(data.draw, (C,), torch.float32)
    groups = pick(data, hs, data.draw(st.sampled_from([g for g in (1, 2, 4, 32) if C % g == 0])), 3, 0, True, 2.0)
    out_dtype = pick(data, hs, data.draw(st.sampled_from([None, None, torch.float32, torch.bfloat16])), torch.int8)
    silu = data.draw(st.booleans())
    inplace = pick(data, hs, False, True) if out_dtype in (None, x.dtype) else False
    x, w = maybe_not_a_tensor(data.draw, x, hs), maybe_not_a_tensor(data.draw, w, hs)
    x_in = x.clone() if isinstance(x, torch.Tensor) else x

    def check(out):
        want = ref.group_norm_silu_ref(x_in, w, b, groups=groups, eps=1e-6, silu=silu, out_dtype=out_dtype)
        assert out.shape == want.shape and out.dtype == want.dtype, "shape / dtype"
        if tame(x_in, w):
            close(out, want, out.dtype if out.dtype in TOL and x_in.dtype == torch.float32 else x_in.dtype,
                  "group_norm_silu", scale=4)

    run_case("kernels.group_norm_silu", lambda: kernels.group_norm_silu(x, w, b, groups=groups, silu=silu,
                                                                        out_dtype=out_dtype, inplace=inplace),
             names=["x", "weight", "bias", "groups", "out_dtype", "inplace"], check=check)
