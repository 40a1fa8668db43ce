"""nearest_code: reference, C++ (mmfast._C) and Triton (interpreter) against an fp64 ground truth.

Argmin-style op: we check that the chosen code's distance equals the true minimum (ties and
near-ties may flip between implementations), never that the indices match.
"""
import pytest
import torch

from mmfast import kernels
from mmfast.kernels import ref
from tests.tolerance import TOL

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _triton(x, e, *, codebook_sqnorm=None, return_distance=False):
    """The Triton launcher itself, on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py)."""
    from mmfast.kernels.triton import codebook as triton_codebook

    x2 = x.reshape(-1, e.shape[1]).contiguous()                              # (M, D)
    ids, dist = triton_codebook.nearest_code(x2, e, codebook_sqnorm, return_distance)
    ids = ids.reshape(x.shape[:-1])
    return (ids, dist.reshape(x.shape[:-1])) if return_distance else ids


def _cpu(x, e, *, codebook_sqnorm=None, return_distance=False):
    assert kernels.backend_for(e) == "cpu", "mmfast._C is not built: pip install -e . --no-build-isolation"
    return kernels.nearest_code(x, e, codebook_sqnorm=codebook_sqnorm, return_distance=return_distance)


IMPLS = {"ref": ref.nearest_code_ref, "cpu": _cpu, "triton": _triton}


def _data(M, K, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, D, generator=g).to(dtype), torch.randn(K, D, generator=g).to(dtype)


def _check(x, e, ids, dist=None):
    """The chosen code is a nearest one (fp64 distances of the stored values), within what fp32
    accumulation can resolve; the returned distance is that code's distance."""
    x64, e64 = x.reshape(-1, e.shape[1]).double(), e.double()
    d2 = (x64 * x64).sum(1, keepdim=True) + (e64 * e64).sum(1) - 2 * x64 @ e64.T   # (M, K)
    ids = ids.reshape(-1)
    assert ids.dtype == torch.int64 and bool(((ids >= 0) & (ids < e.shape[0])).all())
    chosen, best = d2.gather(1, ids[:, None])[:, 0], d2.min(1).values
    # a score is an fp32 sum of D products: its error scales with |x|^2 + |e|^2, not with the gap
    scale = float(((x64 * x64).sum(1) + (e64 * e64).sum(1).max()).max())
    tol = TOL[torch.float32]  # accumulation is fp32 whatever the storage dtype
    torch.testing.assert_close(chosen, best, rtol=0.0, atol=tol["atol"] * scale)
    if dist is not None:
        assert dist.dtype == torch.float32
        torch.testing.assert_close(dist.reshape(-1).double(), chosen, rtol=tol["rtol"], atol=tol["atol"])


# ---- correctness grid: odd sizes, small and large D, every dtype ---------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [3, 4, 5, 8, 9, 17, 33, 64, 256])
@pytest.mark.parametrize("K", [1, 7, 1029])
@pytest.mark.parametrize("M", [1, 7, 123, 1031])
@pytest.mark.parametrize("impl", ["ref", "cpu"])
def test_grid(impl, M, K, D, dtype):
    x, e = _data(M, K, D, dtype, seed=M * 7 + K * 3 + D)
    ids, dist = IMPLS[impl](x, e, return_distance=True)
    assert ids.shape == (M,) and dist.shape == (M,)
    _check(x, e, ids, dist)


# The interpreter runs one numpy op per program and statement: few, big blocks, small shapes.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,D", [(1, 1, 4), (7, 7, 3), (123, 1, 5), (1, 300, 33), (123, 300, 4),
                                   (70, 130, 64), (65, 200, 256), (40, 50, 300)])
def test_grid_triton(M, K, D, dtype):
    x, e = _data(M, K, D, dtype, seed=M + K + D)
    ids, dist = _triton(x, e, return_distance=True)
    _check(x, e, ids, dist)


def test_triton_large_m():
    x, e = _data(1031, 1029, 17, torch.float16)
    _check(x, e, _triton(x, e))


@pytest.mark.parametrize("M,D", [(100, 4), (7, 256)])
def test_cpu_few_rows_many_codes(M, D):
    # few rows and many codes: with 2+ threads the C++ kernel splits the codes between them and
    # merges the winners; a tie across the split must still go to the lowest index
    x, e = _data(M, 20000, D, torch.float32)
    e[15000] = e[3] = x[2] + 0.01
    ids, dist = _cpu(x, e, return_distance=True)
    _check(x, e, ids, dist)
    assert ids[2].item() == 3


@pytest.mark.parametrize("impl", list(IMPLS))
def test_sqnorm_and_batch_shape(impl):
    # a VQGAN latent [B, D, H, W] goes in as [B, H, W, D] (a non-contiguous view)
    z = torch.randn(2, 64, 5, 3).permute(0, 2, 3, 1)
    e = torch.randn(300, 64)
    sq = e.pow(2).sum(1)
    ids = IMPLS[impl](z, e, codebook_sqnorm=sq)
    assert ids.shape == (2, 5, 3)
    _check(z, e, ids)
    assert torch.equal(ids, IMPLS[impl](z, e))  # the given norms are the computed ones: same ids


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_go_to_lowest_index(impl, dtype):
    # small integers (and x off by 1/4): every product and sum is exact in fp32, so the three
    # copies of code 9 tie exactly whatever order a BLAS (the interpreter's tl.dot) sums in
    e = torch.randint(-4, 5, (70, 33)).to(dtype)
    e[40] = e[9]
    e[66] = e[9]
    x = torch.cat([e[9:10].float() + 0.25, torch.randint(-4, 5, (3, 33)).float()]).to(dtype)
    assert IMPLS[impl](x, e)[0].item() == 9


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on NaN/Inf
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("D", [4, 64])
def test_nan_rows_get_minus_one(impl, D):
    x, e = _data(9, 50, D, torch.float32)
    x[2, 1] = float("nan")
    x[5, 0] = float("inf")
    x[7, :] = 3e19  # finite, but the squared distance overflows fp32
    e[0] = e[1] = float("nan")  # never chosen, even for a row right on top of them
    ids, dist = IMPLS[impl](x, e, return_distance=True)
    bad = torch.tensor([2, 5, 7])
    assert ids[bad].tolist() == [-1, -1, -1] and bool(dist[bad].isnan().all())
    keep = torch.tensor([0, 1, 3, 4, 6, 8])
    assert bool((ids[keep] >= 2).all())
    _check(x[keep], e[2:], ids[keep] - 2, dist[keep])
    e[:] = float("inf")  # no finite code at all
    assert IMPLS[impl](x, e).tolist() == [-1] * 9


@pytest.mark.parametrize("impl", ["ref", "cpu"])
def test_empty_x(impl):
    e = torch.randn(10, 8)
    ids, dist = IMPLS[impl](torch.randn(0, 8), e, return_distance=True)
    assert ids.shape == (0,) and ids.dtype == torch.int64 and dist.shape == (0,)
    assert IMPLS[impl](torch.randn(2, 0, 8), e).shape == (2, 0)


def test_forced_reference(monkeypatch):
    monkeypatch.setenv("MMFAST_KERNELS", "ref")
    x, e = _data(20, 30, 8, torch.float32)
    assert torch.equal(kernels.nearest_code(x, e), ref.nearest_code_ref(x, e))


def test_grad_inputs_are_fine():
    x, e = torch.randn(6, 8, requires_grad=True), torch.nn.Parameter(torch.randn(30, 8))
    _check(x.detach(), e.detach(), kernels.nearest_code(x, e))


def test_taming_formula_matches_taming():
    quantize = pytest.importorskip("taming.modules.vqvae.quantize")
    vq = quantize.VectorQuantizer(n_e=200, e_dim=16, beta=0.25)
    z = torch.randn(2, 16, 4, 5)
    with torch.no_grad():
        _, _, (_, _, taming_ids) = vq(z)
        ids = ref.nearest_code_taming(z.permute(0, 2, 3, 1).reshape(-1, 16), vq.embedding.weight)
    assert torch.equal(ids, taming_ids[:, 0])
    _check(z.permute(0, 2, 3, 1), vq.embedding.weight.detach(), kernels.nearest_code(
        z.permute(0, 2, 3, 1), vq.embedding.weight.detach()))


# ---- validation at the public boundary -----------------------------------------------------------
@pytest.mark.parametrize("args,kwargs,err,words", [
    ((torch.randn(4, 8).numpy(), torch.randn(5, 8)), {}, TypeError, "x must be a torch.Tensor"),
    ((torch.randn(4, 8), torch.randn(5, 8, 1)), {}, ValueError, "codebook must be 2-D"),
    ((torch.randn(4, 8), torch.randn(0, 8)), {}, ValueError, "codebook is empty"),
    ((torch.randn(4, 7), torch.randn(5, 8)), {}, ValueError, "D=8"),
    ((torch.randn(4, 8).long(), torch.randn(5, 8).long()), {}, TypeError, "x must be float32"),
    ((torch.randn(4, 8), torch.randn(5, 8).half()), {}, TypeError, "x.to(torch.float16)"),
    ((torch.randn(4, 8), torch.randn(5, 8).to("meta")), {}, ValueError, "move x"),
    ((torch.randn(4, 8), torch.randn(5, 8)), {"codebook_sqnorm": torch.randn(4)}, ValueError,
     "codebook_sqnorm must be a float32 tensor of shape (5,)"),
    ((torch.randn(4, 8), torch.randn(5, 8)), {"codebook_sqnorm": torch.randn(5).double()}, ValueError,
     "codebook_sqnorm"),
    ((torch.randn(4, 8), torch.randn(5, 8)), {"codebook_sqnorm": [1.0] * 5}, TypeError, "codebook_sqnorm"),
])
def test_validation(args, kwargs, err, words):
    with pytest.raises(err) as info:
        kernels.nearest_code(*args, **kwargs)
    assert words in str(info.value)
