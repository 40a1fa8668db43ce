"""similarity_topk / similarity: C++ (mmfast._C), Triton (interpreter, launcher called directly) and
the dispatcher, each against the PyTorch reference on odd shapes, every gallery storage dtype.

Exact top-k with near-ties may legitimately return different ids than the reference (summation
order), so ids are checked through their scores: the returned scores match the reference's top-k
scores, and each returned id's true score (from the reference's full matrix) equals the returned
score. int8 is compared against the dequantised gallery (values * per-row scale)."""
import pytest
import torch

from mmfast import kernels
from mmfast.kernels import ref
from tests.tolerance import TOL

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8]


def make_gallery(n, d, dtype, seed=0):
    """Unit rows in `dtype`; int8 as values + per-row scale. Returns (gallery, gallery_scale)."""
    g = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)
    if dtype != torch.int8:
        return g.to(dtype), None
    scale = g.abs().amax(1) / 127
    return torch.round(g / scale[:, None]).to(torch.int8), scale


def check_topk(scores, ids, queries, gallery, k, gallery_scale=None, scale=None, tol=TOL[torch.float32]):
    Q, N = queries.shape[0], gallery.shape[0]
    assert scores.shape == ids.shape == (Q, k) and scores.dtype == torch.float32 and ids.dtype == torch.int64
    assert bool(((ids >= 0) & (ids < N)).all())
    assert all(len(set(row.tolist())) == k for row in ids), "an id appears twice in one row"
    ref_scores, _ = ref.similarity_topk_ref(queries, gallery, k, scale=scale, gallery_scale=gallery_scale)
    full = ref.similarity_ref(queries, gallery, scale=scale, gallery_scale=gallery_scale)
    atol = tol["atol"] * max(1.0, abs(scale or 1.0))
    torch.testing.assert_close(scores, ref_scores, atol=atol, rtol=tol["rtol"])
    torch.testing.assert_close(full.gather(1, ids), scores, atol=atol, rtol=tol["rtol"])
    assert bool((scores[:, :-1] >= scores[:, 1:] - atol).all()), "not sorted best first"


# ---- C++ through the public dispatcher (CPU tensors) -----------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(1, 4), (7, 17), (123, 64), (1000, 100), (1029, 512), (4099, 1024)])
def test_cpu_topk_matches_reference(n, d, dtype):
    assert kernels.backend_for(torch.empty(0)) == "cpu"
    gallery, gs = make_gallery(n, d, dtype)
    for q_count in (1, 3, 17):
        queries = torch.randn(q_count, d)
        for k in sorted({1, min(n, 10), min(n, 1024)}):
            scores, ids = kernels.similarity_topk(queries, gallery, k, gallery_scale=gs)
            check_topk(scores, ids, queries, gallery, k, gs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_scale_sign_and_query_dtypes(dtype):
    gallery, gs = make_gallery(300, 48, dtype)
    for qdtype in (torch.float32, torch.float16, torch.bfloat16):
        queries = torch.randn(5, 48).to(qdtype)
        for scale in (100.0, -2.5, torch.tensor(14.3)):
            scores, ids = kernels.similarity_topk(queries, gallery, 9, scale=scale, gallery_scale=gs)
            check_topk(scores, ids, queries, gallery, 9, gs, scale=float(scale))


def test_cpu_strided_gallery_rows():
    base = torch.nn.functional.normalize(torch.randn(500, 80), dim=1)
    gallery = base[:, :64]  # row stride 80, unit stride along D: read in place
    queries = torch.randn(4, 64)
    scores, ids = kernels.similarity_topk(queries, gallery, 7)
    check_topk(scores, ids, queries, gallery, 7)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,q", [(1, 4, 1), (123, 17, 3), (1000, 512, 17)])
def test_cpu_dense_matches_reference(n, d, q, dtype):
    gallery, gs = make_gallery(n, d, dtype)
    queries = torch.randn(q, d)
    out = kernels.similarity(queries, gallery, scale=100.0, gallery_scale=gs)
    torch.testing.assert_close(out, ref.similarity_ref(queries, gallery, scale=100.0, gallery_scale=gs),
                               atol=1e-3, rtol=1e-5)


# ---- defined behaviour on degenerate inputs (C++, reference and Triton agree) -----------------------
def _all_impls():
    impls = [("ref", lambda q, g, k, gs=None: ref.similarity_topk_ref(q, g, k, gallery_scale=gs)),
             ("cpu", lambda q, g, k, gs=None: kernels.similarity_topk(q, g, k, gallery_scale=gs))]
    try:
        tl = kernels._triton("similarity")
        impls.append(("triton", lambda q, g, k, gs=None: tl.similarity_topk(
            kernels._prepared_queries(q, None, True), g, k, gallery_scale=gs)))
    except ImportError:
        pass
    return impls


@pytest.mark.parametrize("name,impl", _all_impls(), ids=lambda x: x if isinstance(x, str) else "")
def test_zero_query_ties_and_nan_rows(name, impl):
    gallery, _ = make_gallery(50, 16, torch.float32)
    # A zero query scores 0 everywhere: the k smallest ids, in order.
    scores, ids = impl(torch.zeros(2, 16), gallery, 5)
    assert bool((scores == 0).all()) and ids.tolist() == [list(range(5))] * 2
    # Exact ties (duplicate rows): the smaller id first.
    dup = gallery[:1].repeat(20, 1)
    scores, ids = impl(gallery[:1], dup, 20)
    assert ids.tolist() == [list(range(20))]
    # A NaN row scores -inf: it ranks last, every other id is still valid.
    nan_gallery = gallery.clone()
    nan_gallery[3] = float("nan")
    scores, ids = impl(gallery[3:4] + 1.0, nan_gallery, 50)
    assert ids[0, -1].item() == 3 and scores[0, -1].item() == float("-inf")
    assert sorted(ids[0].tolist()) == list(range(50))


# ---- Triton (TRITON_INTERPRET=1, CPU tensors; launcher called directly) ------------------------------
TRITON_CASES = [  # (n, d, q, k, dtype): small shapes, the interpreter is slow
    (1, 4, 1, 1, torch.float32), (7, 17, 3, 7, torch.float16), (123, 64, 17, 10, torch.bfloat16),
    (1000, 100, 3, 37, torch.int8), (300, 1024, 2, 300, torch.float32), (1030, 16, 1, 1024, torch.float16),
]


@pytest.mark.parametrize("n,d,q,k,dtype", TRITON_CASES, ids=str)
def test_triton_topk_and_dense_match_reference(n, d, q, k, dtype):
    pytest.importorskip("triton")
    tl = kernels._triton("similarity")
    gallery, gs = make_gallery(n, d, dtype)
    queries = torch.randn(q, d)
    qn = kernels._prepared_queries(queries, None, True)
    # fp16 / int8 galleries take fp16 tl.dot inputs (the queries are rounded to fp16).
    tol = TOL[torch.float16] if dtype in (torch.float16, torch.int8) else TOL[torch.float32]
    scores, ids = tl.similarity_topk(qn, gallery, k, gallery_scale=gs)
    check_topk(scores, ids, queries, gallery, k, gs, tol=tol)
    dense = tl.similarity(qn, gallery, gallery_scale=gs)
    torch.testing.assert_close(dense, ref.similarity_ref(queries, gallery, gallery_scale=gs), **tol)


_AOT = """
import importlib.util, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
spec = importlib.util.spec_from_file_location("similarity_aot", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
for gallery_type, k_pad, dense in [("*fp16", 16, False), ("*bf16", 1024, False), ("*i8", 2, True)]:
    const = {"BLOCK_Q": 16, "BLOCK_N": 128, "BLOCK_D": 64, "K_PAD": k_pad, "HAS_SCALE": gallery_type == "*i8",
             "DOT_F16": gallery_type != "*bf16", "IEEE": False, "DENSE": dense}
    sig = {"q_ptr": "*fp32", "g_ptr": gallery_type, "gs_ptr": "*fp32", "keys_ptr": "*fp32" if dense else "*i64",
           "Q": "i32", "N": "i32", "D": "i32", "stride_g": "i32", "rows_per_split": "i32",
           **{name: "constexpr" for name in const}}
    out = triton.compile(ASTSource(fn=mod._similarity_topk_kernel, signature=sig, constexprs=const),
                         target=GPUTarget("cuda", 90, 32))
    assert "cubin" in out.asm, gallery_type
"""


def test_triton_kernel_compiles_for_the_gpu():
    """The interpreter accepts what the GPU compiler rejects (tl.dot shapes, dtypes): compile for
    sm_90 ahead of time, no GPU needed (the triton wheel ships ptxas). In a subprocess, because
    interpreted and compiled Triton do not mix in one process."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    kernel_file = Path(kernels.__file__).parent / "triton" / "similarity.py"
    done = subprocess.run([sys.executable, "-c", _AOT, str(kernel_file)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_triton_module_import_keeps_public_op():
    pytest.importorskip("triton")
    kernels._triton("similarity")
    assert callable(kernels.similarity) and callable(kernels.similarity_topk)


def test_forced_reference_backend(monkeypatch):
    monkeypatch.setenv("MMFAST_KERNELS", "ref")
    gallery, _ = make_gallery(40, 8, torch.float16)
    queries = torch.randn(2, 8)
    got = kernels.similarity_topk(queries, gallery, 4)
    want = ref.similarity_topk_ref(queries, gallery, 4)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---- validation at the public boundary --------------------------------------------------------------
@pytest.mark.parametrize("call,err,words", [
    (lambda q, g, s: kernels.similarity_topk(q, g, 11), ValueError, "k must be"),
    (lambda q, g, s: kernels.similarity_topk(q, g, 0), ValueError, "k must be"),
    (lambda q, g, s: kernels.similarity_topk(q, g, 2.0), ValueError, "k must be"),
    (lambda q, g, s: kernels.similarity_topk(q, g, True), ValueError, "k must be"),
    (lambda q, g, s: kernels.similarity_topk(q[:, :3], g, 1), ValueError, "D=3"),
    (lambda q, g, s: kernels.similarity_topk(q, g[:0], 1), ValueError, "empty"),
    (lambda q, g, s: kernels.similarity_topk(q[0], g, 1), ValueError, "2-D"),
    (lambda q, g, s: kernels.similarity_topk(q, g[None], 1), ValueError, "2-D"),
    (lambda q, g, s: kernels.similarity_topk(q.numpy(), g, 1), TypeError, "torch.Tensor"),
    (lambda q, g, s: kernels.similarity_topk(q.int(), g, 1), TypeError, "queries must be float"),
    (lambda q, g, s: kernels.similarity_topk(q, g.double(), 1), TypeError, "gallery must be"),
    (lambda q, g, s: kernels.similarity_topk(q.to("meta"), g, 1), ValueError, "move the queries"),
    (lambda q, g, s: kernels.similarity_topk(q * float("nan"), g, 1), ValueError, "NaN"),
    (lambda q, g, s: kernels.similarity_topk(q, g.to(torch.int8), 1), ValueError, "gallery_scale"),
    (lambda q, g, s: kernels.similarity_topk(q, g, 1, gallery_scale=s), ValueError, "only for int8"),
    (lambda q, g, s: kernels.similarity_topk(q, g, 1, scale=float("inf")), ValueError, "scale"),
    (lambda q, g, s: kernels.similarity(q, g[:, :2]), ValueError, "D=2"),
])
def test_bad_inputs_raise_with_the_fix(call, err, words):
    gallery, _ = make_gallery(10, 8, torch.float32)
    with pytest.raises(err, match=words):
        call(torch.randn(3, 8), gallery, torch.ones(10))


def test_cost_model():
    nbytes, flops = ref.similarity_cost(16, 1000, 512, k=10, gallery_bytes=1)
    assert flops == 2 * 16 * 1000 * 512
    assert nbytes == 1000 * 512 + 1000 * 4 + 16 * 512 * 4 + 16 * 10 * 12


def test_no_queries_give_empty_results():
    gallery, _ = make_gallery(10, 8, torch.float16)
    scores, ids = kernels.similarity_topk(torch.empty(0, 8), gallery, 3)
    assert scores.shape == ids.shape == (0, 3)
    assert kernels.similarity(torch.empty(0, 8), gallery).shape == (0, 10)


# ---- int8 shadow prefilter of fp16 / bf16 galleries: must equal the plain search exactly ----------
def near_tie_gallery(n, d, dtype, seed=0):
    """Unit rows with duplicates and rows one last bit apart (the bound must not drop any of them)."""
    g = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)
    g = g.to(dtype)
    if n >= 8:
        bits = g.view(torch.int16)
        g[n // 2], g[n - 1] = g[0], g[1]             # exact duplicates
        bits[n // 3] = bits[2] ^ 1                   # last-bit neighbours
        bits[n // 4] = bits[2]
        g[n // 5] = g[3] * 0.999                     # just below another row
    return g


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(1, 7), (7, 33), (123, 64), (1037, 100)])
def test_prefilter_equals_plain_search(n, d, dtype):
    g = near_tie_gallery(n, d, dtype)
    pre = kernels.similarity_prefilter(g)
    for q_count in (1, 9, 20):  # <= 8 queries take the plain path, more the VNNI scan
        q = torch.randn(q_count, d, generator=torch.Generator().manual_seed(q_count))
        q[0] = g[0].float()                          # a query that ties the duplicated rows
        for k in sorted({min(x, n) for x in (1, 2, 10, max(1, n // 2), n)}):
            want = kernels.similarity_topk(q, g, k, scale=3.0)
            got = kernels.similarity_topk(q, g, k, scale=3.0, prefilter=pre)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (q_count, k)


def test_prefilter_codes_bound_the_rows():
    g = near_tie_gallery(300, 48, torch.float16)
    g[5, 3] = float("nan")
    codes, cs, ce = kernels.similarity_prefilter(g)
    ok = torch.arange(300) != 5
    resid = (g.double() - codes.double() * cs.double()[:, None]).norm(dim=1)
    assert bool((ce.double()[ok] >= resid[ok]).all()) and ce[5] == float("inf")
    q = torch.randn(12, 48)
    want = kernels.similarity_topk(q, g, 7)
    got = kernels.similarity_topk(q, g, 7, prefilter=(codes, cs, ce))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # The reference ignores the prefilter (same answer as without it).
    r = ref.similarity_topk_ref(q, g, 7)
    torch.testing.assert_close(got[0], r[0], **TOL[torch.float32])


@pytest.mark.parametrize("make,err,words", [
    (lambda g, pre: (g.float(), pre), ValueError, "only for float16"),
    (lambda g, pre: (g, pre[:2]), TypeError, "prefilter must be a tuple"),
    (lambda g, pre: (g, [*pre]), TypeError, "prefilter must be a tuple"),
    (lambda g, pre: (g, (pre[0][:5], pre[1], pre[2])), ValueError, "similarity_prefilter"),
    (lambda g, pre: (g, (pre[0], pre[1].double(), pre[2])), ValueError, "code_scale float32"),
])
def test_prefilter_bad_inputs_name_the_argument(make, err, words):
    g = near_tie_gallery(10, 8, torch.float16)
    gallery, pre = make(g, kernels.similarity_prefilter(g))
    with pytest.raises(err, match=words):
        kernels.similarity_topk(torch.randn(3, 8), gallery, 2, prefilter=pre)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        kernels.similarity_prefilter(g.float())
