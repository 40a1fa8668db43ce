"""group_norm_silu: reference and C++ (mmfast._C) against an fp64 ground truth, odd shapes, both
layouts, fp32 / bf16 storage, in place; the dispatcher's validation."""
import pytest
import torch
import torch.nn.functional as F

from mmfast import kernels
from mmfast.kernels import ref
from tests.tolerance import TOL

CL = torch.channels_last


def _truth(x, w, b, groups, eps, silu):
    y = F.group_norm(x.double().contiguous(), groups, w.double(), b.double(), eps)
    return F.silu(y) if silu else y


def _data(shape, dtype, fmt, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + offset).to(dtype).contiguous(memory_format=fmt)
    w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    return x, w, b


def _cpu(*a, **kw):
    assert kernels.backend_for(a[0]) == "cpu", "mmfast._C is not built: pip install -e . --no-build-isolation"
    return kernels.group_norm_silu(*a, **kw)


# (B, C, H, W, groups): 2 channels per group, C not a multiple of 16, more than 128 channels (a
# chunk and a tail), one pixel, odd sides, and one big enough for several threads (>= 2^19 values)
SHAPES = [(2, 48, 7, 5, 16), (3, 40, 33, 31, 8), (2, 32, 1, 1, 16), (2, 24, 17, 1, 3), (1, 520, 9, 6, 26),
          (2, 128, 64, 64, 32)]


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [CL, torch.contiguous_format], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("impl", ["ref", "cpu"])
def test_matches_fp64(impl, shape, fmt, dtype, out_dtype, silu):
    *size, groups = shape
    x, w, b = _data(size, dtype, fmt)
    fn = ref.group_norm_silu_ref if impl == "ref" else _cpu
    y = fn(x, w, b, groups=groups, eps=1e-6, silu=silu, out_dtype=out_dtype)
    want = out_dtype or dtype
    assert y.dtype == want and y.shape == x.shape
    assert y.is_contiguous(memory_format=fmt)            # the input's layout is kept
    truth = _truth(x, w, b, groups, 1e-6, silu)          # of the stored (possibly bf16) values
    torch.testing.assert_close(y.double(), truth, **{k: 2 * v for k, v in TOL[want].items()})


@pytest.mark.parametrize("fmt", [CL, torch.contiguous_format], ids=["nhwc", "nchw"])
def test_large_mean_keeps_precision(fmt):
    """mean >> std: the shifted sums keep the variance exact (E[x^2] - mean^2 in fp32 would not)."""
    x, w, b = _data((2, 64, 40, 40), torch.float32, fmt, offset=1000.0)
    y = _cpu(x, w, b, groups=32, eps=1e-6)
    torch.testing.assert_close(y.double(), _truth(x, w, b, 32, 1e-6, True), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", [CL, torch.contiguous_format], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace(fmt, dtype):
    x, w, b = _data((2, 96, 13, 11), dtype, fmt)
    want = _cpu(x, w, b, groups=32)
    y = _cpu(x, w, b, groups=32, inplace=True)
    assert y is x
    torch.testing.assert_close(x, want, atol=0, rtol=0)


@pytest.mark.parametrize("fmt", [CL, torch.contiguous_format], ids=["nhwc", "nchw"])
def test_bf16_output_is_fp32_output_rounded(fmt):
    """bf16 stores round to nearest even like torch's conversion (vcvtneps2bf16 or its emulation)."""
    x, w, b = _data((2, 64, 19, 23), torch.bfloat16, fmt)
    x[0, 3, 4, 5] = float("nan")                          # a NaN group: NaN out, quiet, in bf16 too
    y16 = _cpu(x, w, b, groups=32)
    y32 = _cpu(x, w, b, groups=32, out_dtype=torch.float32)
    nan = y32.isnan()
    assert torch.equal(y16.isnan(), nan)                  # NaN payloads may differ from torch's
    assert torch.equal(y16[~nan].view(torch.int16), y32[~nan].to(torch.bfloat16).view(torch.int16))
    assert bool(y16[0, 2:4].isnan().all()) and not bool(y16[0, 4:].isnan().any()) and not bool(y16[1].isnan().any())


def test_threads_agree():
    x, w, b = _data((2, 128, 64, 64), torch.bfloat16, CL)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _cpu(x, w, b, groups=32, out_dtype=torch.float32)
    finally:
        torch.set_num_threads(n)
    torch.testing.assert_close(_cpu(x, w, b, groups=32, out_dtype=torch.float32), one, **TOL[torch.float32])


def test_other_layouts_and_grad_take_the_reference():
    x, w, b = _data((2, 32, 10, 12), torch.float32, torch.contiguous_format)
    truth = _truth(x, w, b, 8, 1e-5, True)
    strided = x.transpose(2, 3)                            # neither contiguous nor channels-last
    torch.testing.assert_close(kernels.group_norm_silu(strided, w, b, groups=8, eps=1e-5).double(),
                               truth.transpose(2, 3), **TOL[torch.float32])
    for fmt in (torch.contiguous_format, CL):           # training: torch's differentiable ops, same values
        xg = x.clone().contiguous(memory_format=fmt).requires_grad_(True)
        y = kernels.group_norm_silu(xg, w, b, groups=8, eps=1e-5)
        torch.testing.assert_close(y.detach().double(), truth, **TOL[torch.float32])
        y.sum().backward()
        assert xg.grad is not None and xg.grad.shape == x.shape
        assert torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("shape", [(2, 32, 10, 12, 8), (1, 24, 7, 1, 3), (3, 16, 1, 1, 8)])
def test_training_path_gradients_match_fp64(shape, silu, dtype):
    """With grad enabled (the VQGAN trainer, bf16 autocast included) the values and the gradients of
    x, weight and bias match fp64 autograd; a bf16 x keeps its dtype (no fp32 round trip)."""
    *dims, groups = shape
    x, w, b = _data(tuple(dims), dtype, torch.contiguous_format, seed=3)
    gy = torch.randn(dims, generator=torch.Generator().manual_seed(4))
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = kernels.group_norm_silu(*leaves, groups=groups, eps=1e-6, silu=silu)
    assert y.dtype == dtype
    (y.float() * gy).sum().backward()
    ref64 = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
    truth = F.group_norm(ref64[0], groups, ref64[1], ref64[2], 1e-6)
    truth = F.silu(truth) if silu else truth
    (truth * gy.double()).sum().backward()
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y.detach().double(), truth.detach(), **tol)
    torch.testing.assert_close(leaves[0].grad.double(), ref64[0].grad, **tol)
    if dtype == torch.bfloat16:   # weight / bias grads sum B*H*W bf16-rounded terms: error grows ~ sqrt(terms)
        tol = dict(atol=0.01 * (dims[0] * dims[2] * dims[3]) ** 0.5, rtol=2e-2)
    for got, want in zip(leaves[1:], ref64[1:]):
        torch.testing.assert_close(got.grad.double(), want.grad, **tol)


def test_validation():
    x, w, b = _data((2, 48, 5, 5), torch.float32, CL)
    with pytest.raises(ValueError, match="groups"):
        kernels.group_norm_silu(x, w, b, groups=5)
    with pytest.raises(ValueError, match="weight"):
        kernels.group_norm_silu(x, w[:40], b, groups=16)
    with pytest.raises(ValueError, match="4-D"):
        kernels.group_norm_silu(x[0], w, b, groups=16)
    with pytest.raises(TypeError, match="float32"):
        kernels.group_norm_silu(x.to(torch.int32), w, b, groups=16)
    with pytest.raises(ValueError, match="inplace"):
        kernels.group_norm_silu(x, w, b, groups=16, out_dtype=torch.bfloat16, inplace=True)
    with pytest.raises(TypeError, match="Tensor"):
        kernels.group_norm_silu(x.numpy(), w, b, groups=16)
