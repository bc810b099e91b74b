"""csrc/cuda/int8.cu run on the CPU through the CUDA emulation (tests/cuda_emu.py): the pre-pass bit
for bit against the reference (vector and element-wise paths, statics, NaN/Inf rows, thresholds),
the weight-only GEMV against the reference GEMV within the tolerance of tests/test_int8_cuda.py (row
counts across the kernel's row tiles and past one pass of 16, odd sizes, unaligned x and weight)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from lowbit.reference import int8 as ref

from conftest import param_id

cuda_emu = pytest.importorskip("cuda_emu")
_p = cuda_emu.pointer

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
            torch.int8: torch.int8, torch.uint8: torch.uint8}


@pytest.fixture(scope="module")
def lib():
    return cuda_emu.library("int8")




def _x(shape, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _statics(in_features, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(in_features, generator=g)[:min(count, in_features)].sort().values.to(torch.int32)
    return ref.static_mask(idx, in_features, "cpu").to(torch.uint8), idx


def emu_prepass(lib, x, mask, idx, threshold):
    rows, cols = x.shape
    xq = torch.full((rows, cols), 77, dtype=torch.int8)
    row_scale = torch.full((rows,), 12345.0)
    col_flags = torch.zeros(cols, dtype=torch.uint8)
    x_static = torch.full((rows, idx.numel()), 9.0, dtype=x.dtype)
    err = lib.emu_int8_prepass(CODES[x.dtype], _p(x), _p(mask), _p(idx), ctypes.c_int64(rows), ctypes.c_int64(cols),
                               ctypes.c_int64(idx.numel()), ctypes.c_double(threshold), _p(xq), _p(row_scale),
                               _p(col_flags), _p(x_static))
    assert err == 0, f"cudaError {err}"
    return xq, row_scale, col_flags, x_static


def check_prepass(lib, x, mask, idx, threshold):
    got = emu_prepass(lib, x, mask, idx, threshold)
    want = ref.prepass(x, mask, idx, threshold)
    for name, a, e in zip(("xq", "row_scale", "col_flags", "x_static"), got, want):
        a, e = a.contiguous().view(INT_VIEW[a.dtype]), e.contiguous().view(INT_VIEW[e.dtype])
        assert torch.equal(a, e), f"{name}: {(a != e).sum().item()} elements differ"
    return got


@pytest.mark.parametrize("threshold", [0.0, 6.0], ids=lambda t: f"t{t:g}")
@pytest.mark.parametrize("statics", [0, 5], ids=lambda s: f"S{s}")
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (16, 97), (5, 1025), (4, 4104), (2, 40000)], ids=param_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_prepass_matches_reference(lib, dtype, shape, statics, threshold):
    x = _x(shape, dtype, seed=shape[0] * 31 + shape[1])
    check_prepass(lib, x, *_statics(shape[1], statics, seed=shape[1]), threshold)


@pytest.mark.parametrize("threshold", [0.0, 6.0], ids=lambda t: f"t{t:g}")
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_prepass_nan_inf_rows(lib, dtype, threshold):
    x = _x((8, 300), dtype, seed=3)
    x[0, 7] = float("nan")
    x[1, 150] = float("inf")
    x[2] = 0.0
    x[3, 299] = float("-inf")
    x[4] = 100.0
    x[5, ::2] = -0.0
    x[6, :3] = float("nan")
    check_prepass(lib, x, *_statics(300, 4, seed=4), threshold)


def test_prepass_thresholds_and_odd_offset(lib):
    row = [6.0, 6.015625, 0.0, -0.0, 1e-30, 5.99, float("nan"), 1.0, -7.0, 2.0]
    x = torch.tensor([row, row[::-1], [0.5] * 10], dtype=torch.bfloat16)
    mask, idx = _statics(10, 0)
    for threshold in (6.01, 6.0, 1e-40, 1e-50, 1e6, -1.0, float("nan"), float("inf"), 0.5):
        check_prepass(lib, x, mask, idx, threshold)
    base = _x(6 * 64 + 1, torch.float32, seed=6)
    odd = base[1:].view(6, 64)
    assert odd.data_ptr() % 16 != 0
    check_prepass(lib, odd, *_statics(64, 3, seed=7), 2.0)


def _layer(out_features, in_features, dtype, statics, seed, has_bias=False):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_features, in_features, generator=g) * 0.05).to(dtype)
    _, idx = _statics(in_features, statics, seed=seed)
    weight, weight_scale, static_weight = ref.quantize_weight(w, idx)
    bias = torch.randn(out_features, generator=g).to(dtype) if has_bias else None
    return weight, weight_scale, idx, static_weight, bias


def emu_gemv(lib, x, weight, weight_scale, idx, static_weight, bias):
    rows, in_features = x.shape
    out_features = weight.shape[0]
    y = torch.full((rows, out_features), float("nan"), dtype=x.dtype)
    err = lib.emu_int8_gemv(CODES[x.dtype], _p(x), _p(weight), _p(weight_scale), _p(idx), _p(static_weight), _p(bias),
                            ctypes.c_int64(rows), ctypes.c_int64(in_features), ctypes.c_int64(out_features),
                            ctypes.c_int64(idx.numel()), _p(y))
    assert err == 0, f"cudaError {err}"
    return y


def assert_gemv_close(y, x, weight, weight_scale, idx, static_weight, bias):
    """As tests/test_int8_cuda.py: 4 eps(dtype) times the sum of the terms' magnitudes."""
    want = ref.gemv(x, weight, weight_scale, idx, static_weight, bias)
    x_static = x[:, idx.long()].float()
    scale = (x.float().abs() @ weight.float().abs().T) * weight_scale.abs() \
        + x_static.abs() @ static_weight.float().abs().T
    if bias is not None:
        scale = scale + bias.float().abs()
    tol = 4 * torch.finfo(x.dtype).eps * scale + torch.finfo(x.dtype).tiny
    err = (y.float() - want.float()).abs()
    ok = (err <= tol) | (y.isnan() & want.isnan())
    assert bool(ok.all()), f"max excess {(err - tol).masked_fill(ok, 0).max().item():.3g}"


@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("statics", [0, 3], ids=lambda s: f"S{s}")
@pytest.mark.parametrize("rows", [1, 3, 8, 16, 17, 40], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("shape", [(1, 8), (7, 64), (33, 96), (97, 24), (5, 1000), (64, 4104), (6, 97)],
                         ids=param_id)
def test_gemv_matches_reference(lib, shape, rows, statics, has_bias):
    if shape[1] > 1000 and (rows not in (1, 16, 17) or has_bias):
        pytest.skip("kept short: the emulation runs a wide layer's threads one by one")
    dtype = DTYPES[(rows + shape[0]) % 3]
    out_features, in_features = shape
    layer = _layer(out_features, in_features, dtype, statics, seed=out_features * 7 + in_features, has_bias=has_bias)
    x = _x((rows, in_features), dtype, seed=rows, scale=1.0)
    assert_gemv_close(emu_gemv(lib, x, *layer), x, *layer)


def test_gemv_unaligned_and_nan_rows(lib):
    layer = list(_layer(16, 64, torch.bfloat16, 2, seed=19))
    base = _x(2 * 64 + 1, torch.bfloat16, seed=20, scale=1.0)
    x = base[1:].view(2, 64)
    wbase = torch.zeros(16 * 64 + 3, dtype=torch.int8)
    wbase[3:] = layer[0].reshape(-1)
    layer[0] = wbase[3:].view(16, 64)
    assert_gemv_close(emu_gemv(lib, x, *layer), x, *layer)
    x = x.clone()
    x[1, 5] = float("nan")
    y = emu_gemv(lib, x, *layer)
    assert bool(y[1].isnan().all()) and not bool(y[0].isnan().any())


def test_gemv_comparison_can_fail(lib):
    layer = _layer(8, 64, torch.float32, 0, seed=21)
    x = _x((2, 64), torch.float32, seed=22, scale=1.0)
    y = emu_gemv(lib, x, *layer)
    y[0, 3] += 1e-3 * y[0, 3].abs() + 1e-6
    with pytest.raises(AssertionError):
        assert_gemv_close(y, x, *layer)
