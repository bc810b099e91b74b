"""lowbit::int8_prepass and lowbit::int8_gemv on the CUDA backend (csrc/cuda/int8.cu), against the
reference.

The pre-pass is exact (a max, one fp32 division and multiplication, round half to even), so its four
outputs are compared bit for bit (integer views) with the reference run on the same CUDA tensors. The
GEMV is compared with the reference GEMV on CPU copies (fp32 accumulation, one cast to x's dtype):
the two differ only in the order of the fp32 additions and, through that, in the final rounding, so
the tolerance per output is a small multiple of the output dtype's eps times the sum of the products'
magnitudes (|x| @ |w|^T * |weight_scale| + |x_static| @ |static_weight|^T + |bias|).
"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import lowbit
from lowbit.reference import int8 as ref

from conftest import param_id, run_in_cuda_graph, skip_unless_available

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
            torch.int8: torch.int8, torch.uint8: torch.uint8}
# (rows, in_features): odd sizes take the kernel's element-wise path, multiples of 8 / 4 the vector
# one; 40000 needs more than one pass over a row with 16-bit x (32768 elements per pass) and fp32.
PREPASS_SHAPES = [(1, 1), (3, 7), (16, 97), (5, 1025), (33, 4096), (4, 4104), (2, 40000), (0, 16), (3, 0)]


@pytest.fixture(autouse=True)
def _cuda_backend():
    skip_unless_available("cuda", "cuda")


def _x(shape, dtype, seed, scale=3.0) -> torch.Tensor:
    """randn * scale: with scale 3 about 5 % of the elements reach |x| >= 6 (outliers at t = 6)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).cuda()


def _statics(in_features: int, count: int, seed: int = 0):
    """-> (static_mask uint8 [in], static_idx int32 [S]) on the GPU, S = min(count, in)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(in_features, generator=g)[:min(count, in_features)].sort().values.to(torch.int32)
    mask = ref.static_mask(idx, in_features, "cpu").to(torch.uint8)
    return mask.cuda(), idx.cuda()


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (name, actual.dtype, actual.shape)
    a = actual.cpu().contiguous().view(INT_VIEW[actual.dtype]).reshape(-1)
    e = expected.cpu().contiguous().view(INT_VIEW[expected.dtype]).reshape(-1)
    if not torch.equal(a, e):
        bad = (a != e).nonzero().flatten()
        raise AssertionError(f"{name}: {bad.numel()} of {a.numel()} elements differ, first at {bad[:8].tolist()}: "
                             f"{a[bad[:8]].tolist()} != {e[bad[:8]].tolist()}")


def check_prepass(x, static_mask, static_idx, threshold):
    out = lowbit.ops.int8_prepass(x, static_mask, static_idx, threshold, backend="cuda")
    expected = lowbit.ops.int8_prepass(x, static_mask, static_idx, threshold, backend="reference")
    for name, a, e in zip(("xq", "row_scale", "col_flags", "x_static"), out, expected):
        assert a.device.type == "cuda", name
        assert_bits_equal(a, e, name)
    return out


# ---- pre-pass --------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.0, 6.0], ids=lambda t: f"t{t:g}")
@pytest.mark.parametrize("statics", [0, 5], ids=lambda s: f"S{s}")
@pytest.mark.parametrize("shape", PREPASS_SHAPES, ids=param_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_prepass_matches_reference(dtype, shape, statics, threshold):
    x = _x(shape, dtype, seed=shape[0] * 31 + shape[1])
    check_prepass(x, *_statics(shape[1], statics, seed=shape[1]), threshold)


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_prepass_large(dtype):
    x = _x((4096, 4096), dtype, seed=1)
    xq, row_scale, col_flags, x_static = check_prepass(x, *_statics(4096, 20, seed=2), 6.0)
    assert 0 < int(col_flags.sum()) < 4096 and x_static.shape == (4096, 20)


@pytest.mark.parametrize("threshold", [0.0, 6.0], ids=lambda t: f"t{t:g}")
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_prepass_nan_inf_rows(dtype, threshold):
    # NaN gives its row a NaN scale and zeros; Inf is an outlier at t = 6, an int element (an Inf
    # scale, so zeros) at t = 0; rows of zeros, of outliers only, of -0.0; other rows unaffected.
    x = _x((8, 300), dtype, seed=3)
    x[0, 7] = float("nan")
    x[1, 150] = float("inf")
    x[2] = 0.0
    x[3, 299] = float("-inf")
    x[4] = 100.0
    x[5, ::2] = -0.0
    x[6, :3] = float("nan")
    xq, row_scale, _, _ = check_prepass(x, *_statics(300, 4, seed=4), threshold)
    assert bool(row_scale[0].isnan()) and not bool(row_scale[7].isnan())


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_prepass_threshold_in_fp32(dtype):
    # |x| is compared with the threshold in fp32, not in x's dtype: 6.01 is not 6.0 (as it is in
    # bf16), 5.99 rounds to 6.0 in bf16 and is then an outlier at 6.0; 1e-50 is 0 in fp32, which
    # turns the split off, while 1e-40 (an fp32 subnormal) leaves only zeros out.
    row = [6.0, 6.015625, 0.0, -0.0, 1e-30, 5.99, float("nan"), 1.0, -7.0, 2.0]
    x = torch.tensor([row, row[::-1], [0.5] * 10], dtype=dtype, device="cuda")
    mask, idx = _statics(10, 0)
    for threshold in (6.01, 6.0, 1e-40, 1e-50, 1e6, -1.0, float("nan"), float("inf"), 0.5):
        check_prepass(x, mask, idx, threshold)


def test_prepass_static_columns_unsorted_and_repeated():
    x = _x((4, 32), torch.bfloat16, seed=5)
    idx = torch.tensor([5, 3, 3, 31, 0], dtype=torch.int32, device="cuda")
    mask = ref.static_mask(idx.cpu(), 32, "cpu").to(torch.uint8).cuda()
    check_prepass(x, mask, idx, 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=param_id)
def test_prepass_x_at_odd_offset(dtype):
    base = _x(6 * 64 + 1, dtype, seed=6)
    x = base[1:].view(6, 64)
    assert x.data_ptr() % 16 != 0
    check_prepass(x, *_statics(64, 3, seed=7), 2.0)


def test_prepass_non_contiguous_x():
    x = _x((64, 40), torch.float16, seed=8).T
    check_prepass(x, *_statics(64, 2, seed=9), 6.0)


def test_prepass_in_cuda_graph():
    # No host synchronization in the op: it can be captured, and its replay gives the eager result.
    x = _x((16, 1000), torch.bfloat16, seed=10)
    mask, idx = _statics(1000, 6, seed=11)
    out = run_in_cuda_graph(lambda: lowbit.ops.int8_prepass(x, mask, idx, 6.0, backend="cuda"))
    expected = ref.prepass(x, mask, idx, 6.0)
    for name, a, e in zip(("xq", "row_scale", "col_flags", "x_static"), out, expected):
        assert_bits_equal(a, e, name)


def test_prepass_opcheck():
    x = _x((5, 40), torch.float16, seed=12)
    mask, idx = _statics(40, 3, seed=13)
    opcheck(torch.ops.lowbit.int8_prepass.default, (x, mask, idx, 6.0))


def test_prepass_native_checks_its_arguments():
    native = torch.ops.lowbit.int8_prepass
    x = _x((3, 16), torch.bfloat16, seed=14)
    mask, idx = _statics(16, 2)
    with pytest.raises(TypeError, match="x must be bfloat16"):
        native(x.to(torch.float64), mask, idx, 6.0)
    with pytest.raises(ValueError, match="x must be 2-D"):
        native(x.reshape(-1), mask, idx, 6.0)
    with pytest.raises(ValueError, match="static_mask must have shape"):
        native(x, mask[:-1], idx, 6.0)
    with pytest.raises(TypeError, match="static_idx must be a 1-D int32"):
        native(x, mask, idx.long(), 6.0)
    with pytest.raises(ValueError, match="static_idx is on"):
        native(x, mask, idx.cpu(), 6.0)


# ---- GEMV ------------------------------------------------------------------------------------------


def _layer(out_features, in_features, dtype, statics, seed, has_bias=False):
    """-> (weight, weight_scale, static_idx, static_weight, bias) on the GPU, quantized by the reference."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_features, in_features, generator=g) * 0.05).to(dtype)
    _, idx = _statics(in_features, statics, seed=seed)
    weight, weight_scale, static_weight = ref.quantize_weight(w, idx.cpu())
    bias = torch.randn(out_features, generator=g).to(dtype).cuda() if has_bias else None
    return weight.cuda(), weight_scale.cuda(), idx, static_weight.cuda(), bias


def assert_gemv_close(y, x, weight, weight_scale, static_idx, static_weight, bias) -> None:
    """y [M, out] of x's dtype against the reference GEMV on CPU copies. Tolerance: 4 eps(dtype) times
    the sum of the magnitudes of the terms of each output."""
    x, weight, weight_scale, static_idx, static_weight = (
        t.cpu() for t in (x, weight, weight_scale, static_idx, static_weight))
    bias = None if bias is None else bias.cpu()
    expected = ref.gemv(x, weight, weight_scale, static_idx, static_weight, bias)
    assert y.dtype == expected.dtype == x.dtype and y.shape == expected.shape
    x_static = x[:, static_idx.long()].float()
    scale = ((x.float().abs() @ weight.float().abs().T) * weight_scale.abs()
             + x_static.abs() @ static_weight.float().abs().T)
    if bias is not None:
        scale = scale + bias.float().abs()
    tol = 4 * torch.finfo(x.dtype).eps * scale + torch.finfo(x.dtype).tiny
    y, expected = y.float().cpu(), expected.float()
    err = (y - expected).abs()
    ok = (err <= tol) | (y.isnan() & expected.isnan())
    worst = int((err - tol).nan_to_num(nan=float("inf")).masked_fill(ok, -float("inf")).flatten().argmax())
    assert bool(ok.all()), (f"|y - expected| = {err.flatten()[worst].item():.3g} > tol "
                            f"{tol.flatten()[worst].item():.3g} at {divmod(worst, y.shape[1])}")


GEMV_SHAPES = [(1, 8), (7, 64), (33, 96), (97, 24), (5, 1000), (64, 4104), (300, 16), (6, 97)]


@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("statics", [0, 3], ids=lambda s: f"S{s}")
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 16], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("shape", GEMV_SHAPES, ids=param_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_gemv_matches_reference(dtype, shape, rows, statics, has_bias):
    out_features, in_features = shape
    layer = _layer(out_features, in_features, dtype, statics, seed=out_features * 7 + in_features, has_bias=has_bias)
    x = _x((rows, in_features), dtype, seed=rows, scale=1.0)
    y = lowbit.ops.int8_gemv(x, *layer, backend="cuda")
    assert y.device.type == "cuda"
    assert_gemv_close(y, x, *layer)


@pytest.mark.parametrize("rows", [17, 40], ids=lambda m: f"M{m}")
def test_gemv_batches_over_16(rows):
    layer = _layer(40, 128, torch.bfloat16, 2, seed=15, has_bias=True)
    x = _x((rows, 128), torch.bfloat16, seed=16, scale=1.0)
    assert_gemv_close(lowbit.ops.int8_gemv(x, *layer, backend="cuda"), x, *layer)


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_gemv_llama_shape(dtype):
    layer = _layer(4096, 4096, dtype, 8, seed=17, has_bias=False)
    for rows in (1, 16):
        x = _x((rows, 4096), dtype, seed=18 + rows, scale=1.0)
        assert_gemv_close(lowbit.ops.int8_gemv(x, *layer, backend="cuda"), x, *layer)


def test_gemv_x_and_weight_at_odd_offsets():
    layer = list(_layer(16, 64, torch.bfloat16, 2, seed=19))
    base = _x(2 * 64 + 1, torch.bfloat16, seed=20, scale=1.0)
    x = base[1:].view(2, 64)
    assert x.data_ptr() % 16 != 0
    assert_gemv_close(lowbit.ops.int8_gemv(x, *layer, backend="cuda"), x, *layer)
    wbase = torch.zeros(16 * 64 + 3, dtype=torch.int8, device="cuda")
    wbase[3:] = layer[0].reshape(-1)
    layer[0] = wbase[3:].view(16, 64)
    assert_gemv_close(torch.ops.lowbit.int8_gemv(x, *layer), x, *layer)


def test_gemv_nan_row():
    layer = _layer(8, 64, torch.bfloat16, 0, seed=21)
    x = _x((3, 64), torch.bfloat16, seed=22, scale=1.0)
    x[1, 5] = float("nan")
    y = lowbit.ops.int8_gemv(x, *layer, backend="cuda")
    assert bool(y[1].isnan().all()) and not bool(y[[0, 2]].isnan().any())


def test_gemv_empty_shapes():
    layer = _layer(5, 0, torch.float16, 0, seed=23, has_bias=True)
    x = torch.zeros(2, 0, dtype=torch.float16, device="cuda")
    y = lowbit.ops.int8_gemv(x, *layer, backend="cuda")
    assert torch.equal(y.cpu(), layer[-1].cpu().expand(2, 5))  # x @ W^T = 0: the bias alone
    layer = _layer(0, 8, torch.float16, 0, seed=24)
    assert lowbit.ops.int8_gemv(torch.zeros(2, 8, dtype=torch.float16, device="cuda"), *layer,
                                backend="cuda").shape == (2, 0)
    layer = _layer(4, 8, torch.float16, 0, seed=25)
    assert lowbit.ops.int8_gemv(torch.zeros(0, 8, dtype=torch.float16, device="cuda"), *layer,
                                backend="cuda").shape == (0, 4)


def test_gemv_in_cuda_graph():
    layer = _layer(64, 256, torch.bfloat16, 2, seed=26, has_bias=True)
    x = _x((4, 256), torch.bfloat16, seed=27, scale=1.0)
    assert_gemv_close(run_in_cuda_graph(lambda: lowbit.ops.int8_gemv(x, *layer, backend="cuda")), x, *layer)


def test_gemv_opcheck():
    layer = _layer(12, 40, torch.float16, 2, seed=28, has_bias=True)
    x = _x((3, 40), torch.float16, seed=29, scale=1.0)
    opcheck(torch.ops.lowbit.int8_gemv.default, (x, *layer))


def test_gemv_native_checks_its_arguments():
    native = torch.ops.lowbit.int8_gemv
    weight, weight_scale, idx, static_weight, bias = _layer(8, 32, torch.bfloat16, 2, seed=30, has_bias=True)
    x = _x((2, 32), torch.bfloat16, seed=31, scale=1.0)
    with pytest.raises(ValueError, match="weight must be int8"):
        native(x, weight.float(), weight_scale, idx, static_weight, bias)
    with pytest.raises(ValueError, match="weight must be int8"):
        native(x, weight[:, :-1], weight_scale, idx, static_weight, bias)
    with pytest.raises(TypeError, match="weight_scale must be"):
        native(x, weight, weight_scale.half(), idx, static_weight, bias)
    with pytest.raises(ValueError, match="static_weight must have shape"):
        native(x, weight, weight_scale, idx, static_weight[:, :1], bias)
    with pytest.raises(TypeError, match="bias must be"):
        native(x, weight, weight_scale, idx, static_weight, bias.float())
    with pytest.raises(ValueError, match="weight is on"):
        native(x, weight.cpu(), weight_scale, idx, static_weight, bias)
