"""decode_attention: reference, C++ (mmfast._C) and Triton (interpreter) against each other, and the
reference against torch's SDPA with an explicit mask (an independent implementation)."""
import pytest
import torch
import torch.nn.functional as F

from mmfast import kernels
from mmfast.kernels import ref
from tests.tolerance import TOL

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _triton(q, k, v, lengths, *, scale=None, num_splits=None):
    """The Triton launcher itself, on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py)."""
    from mmfast.kernels.triton import decode_attention as triton_attention

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return triton_attention.decode_attention(q, k, v, lengths, scale, num_splits=num_splits)


def _cpu(q, k, v, lengths, *, scale=None):
    assert kernels.backend_for(q) == "cpu", "mmfast._C is not built: pip install -e . --no-build-isolation"
    return kernels.decode_attention(q, k, v, lengths, scale=scale)


def _sdpa(q, k, v, lengths, *, scale=None):
    """torch's SDPA over all T with a boolean mask, in fp32: the independent check of the reference."""
    T = k.shape[2]
    mask = (torch.arange(T) < lengths[:, None])[:, None, None, :]                 # (B, 1, 1, T)
    out = F.scaled_dot_product_attention(q.float()[:, :, None], k.float(), v.float(), attn_mask=mask,
                                         scale=scale)
    return out[:, :, 0].to(q.dtype)                                               # (B, H, D)


def _data(B, H, T, D, dtype, seed=0, t_alloc=None):
    """q [B, H, D] and caches [B, H, T, D] that are views of a bigger [B, H, t_alloc, D] buffer
    (a static cache sliced like the generator does), lengths with 1 and T among them."""
    g = torch.Generator().manual_seed(seed)
    t_alloc = T if t_alloc is None else t_alloc
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k = torch.randn(B, H, t_alloc, D, generator=g).to(dtype)[:, :, :T]
    v = torch.randn(B, H, t_alloc, D, generator=g).to(dtype)[:, :, :T]
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    if B > 1:
        lengths[-1] = 1
    return q, k, v, lengths


def _close(got, want, dtype):
    assert got.dtype == dtype and got.shape == want.shape
    # fp32 math everywhere: only the final rounding to dtype differs (one ulp of the output)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


# ---- the reference against SDPA ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,T,D", [(1, 1, 1, 8), (3, 5, 17, 8), (7, 1, 123, 80), (2, 16, 256, 64)])
def test_reference_matches_sdpa(B, H, T, D, dtype):
    q, k, v, lengths = _data(B, H, T, D, dtype, seed=B + T + D)
    _close(ref.decode_attention_ref(q, k, v, lengths), _sdpa(q, k, v, lengths), dtype)
    _close(ref.decode_attention_ref(q, k, v, lengths, scale=0.3), _sdpa(q, k, v, lengths, scale=0.3), dtype)


def test_min_dalle_peer_matches_reference():
    q, k, v, lengths = _data(4, 3, 40, 16, torch.float32, seed=1)
    _close(ref.decode_attention_min_dalle(q, k, v, lengths), ref.decode_attention_ref(q, k, v, lengths),
           torch.float32)


# ---- C++ grid: odd sizes, strided caches, every dtype ------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [1, 8, 64, 80, 200])
@pytest.mark.parametrize("T", [1, 17, 123, 256])
@pytest.mark.parametrize("B,H", [(1, 1), (3, 5), (7, 1)])
def test_cpu_grid(B, H, T, D, dtype):
    q, k, v, lengths = _data(B, H, T, D, dtype, seed=B * 1000 + T * 7 + D, t_alloc=T + 3)
    want = ref.decode_attention_ref(q, k, v, lengths)
    _close(_cpu(q, k, v, lengths), want, dtype)
    _close(_cpu(q, k, v, lengths.int()), want, dtype)


def test_cpu_dalle_shapes():
    # DALL-E mini (H=16) and mega (H=32), D=64, T=256: cond + uncond rows of 4 images, one step
    for H in (16, 32):
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v, lengths = _data(8, H, 256, 64, dtype, seed=H)
            lengths[:] = 200
            _close(_cpu(q, k, v, lengths), ref.decode_attention_ref(q, k, v, lengths), dtype)


def test_cpu_non_unit_d_stride_is_copied():
    q, k, v, lengths = _data(2, 3, 20, 8, torch.float32, seed=5)
    kt = k.transpose(2, 3).contiguous().transpose(2, 3)                            # stride(3) = T
    assert kt.stride(3) != 1
    _close(_cpu(q[:, :, :], kt, v, lengths), ref.decode_attention_ref(q, k, v, lengths), torch.float32)
    qs = torch.randn(2, 8, 3).transpose(1, 2)                                      # q.stride(2) = 3
    _close(_cpu(qs, k, v, lengths), ref.decode_attention_ref(qs, k, v, lengths), torch.float32)


def test_cpu_masked_positions_are_never_read():
    # NaN past each row's length must not leak into the result
    q, k, v, lengths = _data(3, 2, 30, 16, torch.float32, seed=9)
    lengths = torch.tensor([30, 1, 12])
    want = ref.decode_attention_ref(q, k, v, lengths)
    k, v = k.clone(), v.clone()
    for b, n in enumerate(lengths.tolist()):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    for impl in (_cpu, _triton):
        _close(impl(q, k, v, lengths), want, torch.float32)


def test_unchecked_lengths_are_clamped():
    q, k, v, _ = _data(3, 2, 10, 8, torch.float32, seed=3)
    bad = torch.tensor([0, 15, -4])
    want = ref.decode_attention_ref(q, k, v, bad)                                  # 0 -> zeros, 15 -> T
    assert torch.equal(want[0], torch.zeros_like(want[0])) and torch.equal(want[2], want[0])
    torch.testing.assert_close(want[1], ref.decode_attention_ref(q, k, v, torch.tensor([1, 10, 1]))[1])
    _close(kernels.decode_attention(q, k, v, bad, check_lengths=False), want, torch.float32)
    for splits in (1, 3):
        _close(_triton(q, k, v, bad, num_splits=splits), want, torch.float32)


# ---- Triton (interpreter): small shapes, and more splits than tiles so that some are empty ----------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,T,D,splits", [(1, 1, 1, 8, 1), (3, 5, 17, 8, 4), (7, 1, 123, 64, 5),
                                            (3, 1, 256, 80, 1), (2, 2, 256, 64, 3), (1, 2, 300, 8, 7),
                                            (2, 1, 256, 128, 2)])  # the last: 2 tiles per split
def test_triton_grid(B, H, T, D, splits, dtype):
    q, k, v, lengths = _data(B, H, T, D, dtype, seed=B + H + T + D, t_alloc=T + 2)
    _close(_triton(q, k, v, lengths, num_splits=splits), ref.decode_attention_ref(q, k, v, lengths), dtype)


def test_triton_default_splits_and_scale():
    q, k, v, lengths = _data(3, 2, 50, 16, torch.float16, seed=4)
    _close(_triton(q, k, v, lengths, scale=0.7), ref.decode_attention_ref(q, k, v, lengths, scale=0.7),
           torch.float16)


_AOT = """
import importlib.util, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
spec = importlib.util.spec_from_file_location("decode_attention_aot", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
target = GPUTarget("cuda", 90, 32)
for ty, block_d, splits in [("fp16", 64, 4), ("bf16", 64, 1), ("fp32", 128, 8), ("bf16", 8, 3)]:
    const = {"NUM_SPLITS": splits, "BLOCK_T": 64, "BLOCK_D": block_d, "DIRECT": splits == 1}
    sig = {"q_ptr": f"*{ty}", "k_ptr": f"*{ty}", "v_ptr": f"*{ty}", "len_ptr": "*i64", "part_ptr": "*fp32",
           "out_ptr": f"*{ty}", "H": "i32", "T": "i32", "D": "i32", "qk_scale": "fp32",
           **{f"stride_{n}": "i32" for n in ("qb", "qh", "kb", "kh", "kt", "vb", "vh", "vt")},
           **{name: "constexpr" for name in const}}
    out = triton.compile(ASTSource(fn=mod._decode_attention_kernel, signature=sig, constexprs=const),
                         target=target)
    assert "cubin" in out.asm, ty
    const = {"NUM_SPLITS": splits, "BLOCK_S": triton.next_power_of_2(splits), "BLOCK_D": block_d}
    sig = {"part_ptr": "*fp32", "out_ptr": f"*{ty}", "D": "i32", **{name: "constexpr" for name in const}}
    out = triton.compile(ASTSource(fn=mod._decode_attention_merge_kernel, signature=sig, constexprs=const),
                         target=target)
    assert "cubin" in out.asm, ty
"""


def test_triton_kernel_compiles_for_the_gpu():
    """The interpreter accepts what the GPU compiler rejects: compile both kernels for sm_90 ahead
    of time, fp16 / bf16 / fp32 (no GPU needed: the triton wheel ships ptxas). In a subprocess,
    because interpreted and compiled Triton do not mix in one process."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    kernel_file = Path(kernels.__file__).parent / "triton" / "decode_attention.py"
    done = subprocess.run([sys.executable, "-c", _AOT, str(kernel_file)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_triton_module_import_keeps_public_op():
    pytest.importorskip("triton")
    kernels._triton("decode_attention")
    assert callable(kernels.decode_attention)


# ---- the public op -----------------------------------------------------------------------------------
def test_forced_reference(monkeypatch):
    monkeypatch.setenv("MMFAST_KERNELS", "ref")
    q, k, v, lengths = _data(3, 2, 20, 8, torch.bfloat16, seed=2)
    assert torch.equal(kernels.decode_attention(q, k, v, lengths), ref.decode_attention_ref(q, k, v, lengths))


def test_empty_batch_and_grad_inputs():
    q, k, v, _ = _data(2, 3, 10, 8, torch.float32)
    out = kernels.decode_attention(q[:0], k[:0], v[:0], torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0, 3, 8)
    qg = q.clone().requires_grad_()
    lengths = torch.tensor([10, 4])
    _close(kernels.decode_attention(qg, k, v, lengths), ref.decode_attention_ref(q, k, v, lengths), torch.float32)


def _bad(q, k, v, L, **kw):
    return kernels.decode_attention(q, k, v, L, **kw)


@pytest.mark.parametrize("call,err,words", [
    (lambda q, k, v, L: _bad(q[0], k, v, L), ValueError, "q must be 3-D"),
    (lambda q, k, v, L: _bad(q, k[0], v, L), ValueError, "k_cache must be 4-D"),
    (lambda q, k, v, L: _bad(q, k, v[:, :, :5], L), ValueError, "same shape"),
    (lambda q, k, v, L: _bad(q[:, :2], k, v, L), ValueError, "B, H and D must match"),
    (lambda q, k, v, L: _bad(q[..., :4], k, v, L), ValueError, "B, H and D must match"),
    (lambda q, k, v, L: _bad(q, k[:, :, :0], v[:, :, :0], L), ValueError, "T must be >= 1"),
    (lambda q, k, v, L: _bad(q.double(), k.double(), v.double(), L), TypeError, "float32, float16 or bfloat16"),
    (lambda q, k, v, L: _bad(q.half(), k, v, L), TypeError, "share one dtype"),
    (lambda q, k, v, L: _bad(q, k, v, L.float()), TypeError, "lengths must be an int32 or int64"),
    (lambda q, k, v, L: _bad(q, k, v, L[:1]), ValueError, r"lengths must be 1-D \[B\]"),
    (lambda q, k, v, L: _bad(q, k, v, torch.tensor([3, 0])), ValueError, r"lengths\[1\] = 0; a length of 0"),
    (lambda q, k, v, L: _bad(q, k, v, torch.tensor([11, 2])), ValueError, r"lengths\[0\] = 11; allocate"),
    (lambda q, k, v, L: _bad(q, k.to("meta"), v, L), ValueError, "k_cache is on meta"),
    (lambda q, k, v, L: _bad(q, k, v, L.to("meta")), ValueError, "lengths is on meta"),
    (lambda q, k, v, L: _bad(q.numpy(), k, v, L), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v, L: _bad(q, k, v, [3, 4]), TypeError, "lengths must be a torch.Tensor"),
    (lambda q, k, v, L: _bad(q, k, v, L, scale=float("nan")), ValueError, "scale must be finite"),
])
def test_bad_inputs_raise_with_the_fix(call, err, words):
    q, k, v, _ = _data(2, 3, 10, 8, torch.float32)
    with pytest.raises(err, match=words):
        call(q, k, v, torch.tensor([10, 4]))


def test_unchecked_lengths_skip_the_check():
    q, k, v, _ = _data(2, 3, 10, 8, torch.float32)
    kernels.decode_attention(q, k, v, torch.tensor([0, 99]), check_lengths=False)  # no raise


def test_cost_model():
    nbytes, flops = ref.decode_attention_cost(8, 16, 64, 256, cache_bytes=2)
    assert flops == 4 * 8 * 16 * 256 * 64
    assert nbytes == 2 * 8 * 16 * 256 * 64 * 2 + 2 * 8 * 16 * 64 * 2
