"""csrc/cuda/kv.cu run on the CPU through the CUDA emulation (tests/cuda_emu.py): the decode
attention against the reference within the derived bound (tests/helpers.py::kv_attention_bound),
across plans with one and several context splits, masks, strided cache views, odd head sizes and
all three dtypes; kv_quantize bit for bit against the reference. The same kernels the GPU runs,
thread by thread; what the emulation cannot show (timing, races inside a block) is the GPU
tests' (tests/test_kv_cuda.py)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from lowbit import ops

from conftest import param_id
from helpers import kv_attention_bound
from test_kv_ops import make

cuda_emu = pytest.importorskip("cuda_emu")

DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


@pytest.fixture(scope="module")
def lib():
    return cuda_emu.library("kv")


def _strides(t):
    if t is None:
        return [0, 0]
    return [0 if t.shape[0] == 1 else t.stride(0), 0 if t.shape[1] == 1 else t.stride(1)]


def emu_decode(lib, args, mask, bits, group, scaling):
    """(out, splits) of the emulated kernels."""
    q, kc, ks, kz, vc, vs, vz, kr, vr = args
    b, hq, length, d = q.shape
    hkv, r, nb = kr.shape[1], kr.shape[2], kc.shape[2]
    out = torch.full_like(q, float("nan"), memory_format=torch.contiguous_format)
    tensors = [q, kc, ks, kz, vc, vs, vz, kr, vr, mask]
    ptrs = (ctypes.c_void_p * 10)(*[t.data_ptr() if t is not None else None for t in tensors])
    strides = (ctypes.c_int64 * 20)(*[s for t in tensors for s in _strides(t)])
    dims = (ctypes.c_int64 * 9)(b, hq, hkv, length, d, group, nb, r, bits)
    splits = ctypes.c_int64(0)
    err = lib.emu_kv_decode_attention(DTYPE_CODES[q.dtype], dims, ptrs, strides, ctypes.c_float(scaling),
                                      ctypes.c_void_p(out.data_ptr()), ctypes.byref(splits))
    assert err == 0, f"cudaError {err}"
    return out, splits.value


def check(lib, args, keys, values, mask, bits, group, scaling=None):
    q = args[0]
    scaling = scaling if scaling is not None else q.shape[-1] ** -0.5
    got, splits = emu_decode(lib, args, mask, bits, group, scaling)
    want = ops.kv_decode_attention(*args, mask, bits, group, scaling, backend="reference")
    bound = kv_attention_bound(q, keys, values, mask, scaling, want)
    diff = (got.double() - want.double()).abs()
    assert not got.isnan().any(), "some output was never written"
    assert bool((diff <= bound).all()), f"max excess {(diff - bound).max().item():.3g}"
    return got, want, splits


# (batch, query heads, kv heads, queries, head_dim, group, packed blocks, residual tokens): one and
# several query tiles, head_dim from 8 to 256 (odd ones too), groups 4 to 128, no blocks or no
# residual, contexts long enough to split.
SHAPES = [(1, 1, 1, 1, 8, 8, 0, 3), (2, 6, 2, 1, 32, 8, 5, 0), (1, 9, 3, 1, 64, 64, 4, 70),
          (2, 4, 4, 3, 16, 4, 9, 5), (1, 8, 2, 16, 128, 64, 3, 40), (1, 2, 1, 2, 24, 8, 70, 11),
          (1, 4, 2, 1, 48, 48, 3, 5), (1, 4, 1, 1, 256, 128, 2, 7), (1, 9, 3, 1, 64, 32, 40, 17)]


@pytest.mark.parametrize("shape", SHAPES, ids=param_id)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_decode_matches_reference(lib, shape, bits):
    dtype = [torch.bfloat16, torch.float16, torch.float32][(SHAPES.index(shape) + bits) % 3]
    args, keys, values = make(shape, bits, dtype)
    check(lib, args, keys, values, None, bits, shape[5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
def test_decode_masks_views_and_several_splits(lib, dtype):
    shape = (2, 4, 2, 2, 16, 8, 40, 9)  # 329 tokens: several splits on the emulated 4 SMs
    args, keys, values = make(shape, 4, dtype, seed=3, capacity_extra=2)
    total = keys.shape[2]
    mask = torch.ones(2, 1, 2, total, dtype=torch.bool)
    mask[0, :, :, :100] = False        # padding: whole tiles hidden
    mask[1, :, 1, 200:260] = False     # a hole inside the packed blocks
    mask[1, :, 0, :] = False           # a query that sees nothing gets zeros
    got, want, splits = check(lib, args, keys, values, mask, 4, 8)
    assert splits > 1
    assert torch.equal(got[1, :, 0], torch.zeros_like(got[1, :, 0]))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_decode_codes_at_odd_addresses_take_the_byte_paths(lib, bits):
    """Codes whose rows are not 4-byte aligned are staged byte by byte (the word-wise staging
    needs aligned words): same results."""
    shape = (1, 4, 2, 1, 64, 64, 3, 5)
    args, keys, values = make(shape, bits, torch.bfloat16, seed=9)
    q, kc, ks, kz, vc, vs, vz, kr, vr = args

    def shifted(t):
        buf = torch.zeros(t.numel() + 1, dtype=torch.uint8)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        assert view.data_ptr() % 4 != 0
        return view

    check(lib, (q, shifted(kc), ks, kz, shifted(vc), vs, vz, kr, vr), keys, values, None, bits, 64)


def test_bound_catches_a_dropped_token(lib):
    """The comparison can fail: the kernel's output over a cache with one token's value changed
    is outside the bound around the unchanged cache's reference."""
    shape = (1, 3, 1, 1, 32, 8, 6, 5)
    args, keys, values = make(shape, 4, torch.float32, seed=5)
    q, kc, ks, kz, vc, vs, vz, kr, vr = args
    changed = vr.clone()
    changed[0, 0, 2] += 4.0
    got, _ = emu_decode(lib, (q, kc, ks, kz, vc, vs, vz, kr, changed), None, 4, 8, 32 ** -0.5)
    want = ops.kv_decode_attention(*args, None, 4, 8, 32 ** -0.5, backend="reference")
    bound = kv_attention_bound(q, keys, values, None, 32 ** -0.5, want)
    assert bool(((got.double() - want.double()).abs() > bound).any())


def test_decode_refuses_what_the_plan_cannot_take(lib):
    args, _, _ = make((1, 1, 1, 1, 264, 8, 1, 1), 4, torch.float32, seed=11)
    q = args[0]
    dims = (ctypes.c_int64 * 9)(1, 1, 1, 1, 264, 8, 1, 1, 4)
    ptrs = (ctypes.c_void_p * 10)(*[t.data_ptr() for t in args], None)
    strides = (ctypes.c_int64 * 20)()
    out = torch.empty_like(q)
    err = lib.emu_kv_decode_attention(2, dims, ptrs, strides, ctypes.c_float(1.0), ctypes.c_void_p(out.data_ptr()),
                                      ctypes.byref(ctypes.c_int64()))
    assert err == 1  # cudaErrorInvalidValue


def _bits(t):
    return t if t.dtype == torch.uint8 else t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("shape,group", [((1, 1, 8, 8), 8), ((2, 3, 64, 32), 16), ((1, 2, 128, 64), 64),
                                         ((3, 1, 12, 12), 4), ((1, 1, 256, 128), 128)], ids=param_id)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=param_id)
def test_quantize_is_bit_exact(lib, shape, group, bits, dtype):
    if group % (8 // bits):
        pytest.skip("the group must hold whole bytes of codes")
    gen = torch.Generator().manual_seed(sum(shape) + bits)
    keys = (torch.randn(shape, generator=gen) * torch.linspace(0.1, 8, shape[-1]) + 0.3).to(dtype)
    values = torch.randn(shape, generator=gen).to(dtype)
    keys[..., 0, :] = 0.0                        # a constant group: scale 0
    values[..., 1, :3] = torch.finfo(dtype).tiny  # smallest normals
    want = ops.kv_quantize(keys, values, bits, group, backend="reference")
    got = [torch.full_like(t, 0x5A) if t.dtype == torch.uint8 else torch.full_like(t, float("nan")) for t in want]
    b, h, t, d = shape
    err = lib.emu_kv_quantize(
        DTYPE_CODES[dtype], ctypes.c_void_p(keys.data_ptr()), ctypes.c_void_p(values.data_ptr()),
        ctypes.c_int64(b), ctypes.c_int64(h), ctypes.c_int64(t), ctypes.c_int64(d), ctypes.c_int64(group),
        ctypes.c_int(bits), *[ctypes.c_void_p(x.data_ptr()) for x in got])
    assert err == 0
    for name, a, w in zip(("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"), got, want):
        assert torch.equal(_bits(a), _bits(w)), name
