"""The Triton kernels of lowbit::int8_prepass / int8_matmul / int8_gemv against the reference.

Every call goes through the public ops with backend="triton". The pre-pass must be bit-exact
(xq, col_flags and x_static compared bit for bit, row_scale exactly with NaN where the reference
has NaN); the products must stay within the fp32-accumulation bound derived in ``helpers.fp32_sum_tolerance``,
which ``test_tolerance_rejects_missing_terms`` shows is tight enough to catch a dropped term.
Shapes are small: on CPU the kernels run in Triton's interpreter; they still cross the kernels'
tiles (K tiles of 32 to 256, N tiles of 16 to 128, M tiles of 16 to 128).
"""

import pytest
import torch
from torch.library import opcheck

import lowbit
from lowbit.reference import int8 as ref

from conftest import skip_unless_available
from helpers import fp32_sum_tolerance


def _opcheck_utils(backend: str, device) -> tuple[str, ...]:
    """opcheck's checks for a backend. Under Triton's interpreter (CPU tensors) a kernel reads real
    data, so AOT dispatch, which runs the kernel on fake tensors, is checked on GPUs only."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    return utils[:-1] if backend == "triton" and torch.device(device).type == "cpu" else utils


DTYPES = [torch.bfloat16, torch.float16, torch.float32]
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}

# The interpreter computes NaN and Inf rows with numpy, which warns about them.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero|overflow) encountered:RuntimeWarning")


def _dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def _shape_id(shape):
    return "x".join(map(str, shape))


@pytest.fixture(params=[pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)])
def device(request):
    skip_unless_available("triton", request.param)
    return request.param


def _static_idx(k, with_static):
    """int32 [S]: a few sorted columns (first, last, one past a 128 tile) or none."""
    if not with_static:
        return torch.zeros(0, dtype=torch.int32)
    return torch.tensor(sorted({0, min(3, k - 1), min(130, k - 1), k - 1}), dtype=torch.int32)


def _activations(m, k, dtype, seed, outliers=True):
    """x [m, k] ~ N(0, 1) with outliers (|x| >= 6, including 6.0 itself) in a few columns, none of
    them in columns [64, 192): that K range holds no flagged column, so kernels skip it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    if outliers and m and k:
        cols = [c for c in (1, 3, 40, 200, 299, k - 1) if c < k and not 64 <= c < 192]
        values = torch.tensor([6.0, -7.5, 12.0, -6.0, 9.25, -20.0])
        for i, c in enumerate(cols):
            x[(i * 5) % m, c] = values[i]
        x[0, min(2, k - 1)] = 5.96875  # just under the threshold, in every dtype
    return x.to(dtype)


def _layer(n, k, dtype, static_idx, seed):
    """-> (weight int8 [n, k], weight_scale fp32 [n], static_weight [n, S] of dtype, bias [n])"""
    g = torch.Generator().manual_seed(seed + 1000)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    weight, weight_scale, static_weight = ref.quantize_weight(w, static_idx)
    return weight, weight_scale, static_weight, torch.randn(n, generator=g).to(dtype)


def _static_mask(static_idx, k):
    return ref.static_mask(static_idx, k, "cpu").to(torch.uint8)


def _to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


# ---- comparisons -----------------------------------------------------------------------------


def _assert_bits(got, want, what):
    """Same dtype, shape and bits (floats compared as integers: NaN payloads and -0.0 included)."""
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype} {list(got.shape)}"
    if want.dtype.is_floating_point:
        got, want = got.view(INT_VIEW[want.dtype]), want.view(INT_VIEW[want.dtype])
    assert torch.equal(got, want), f"{what} differs at {(got != want).nonzero()[:5].tolist()}"


def _assert_exact(got, want, what):
    """Same values, NaN where the reference has NaN (whatever its payload)."""
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype} {list(got.shape)}"
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN at other places"
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0)), f"{what} differs"


def _assert_within(got, want, tol, what):
    """NaN and +-Inf where the reference has them, the finite values within ``tol``."""
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype} {list(got.shape)}"
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN at {(got.isnan() != want.isnan()).nonzero()[:5]}"
    inf = want.isinf()
    assert torch.equal(got[inf], want[inf]), f"{what}: infinities differ"
    finite = ~(want.isnan() | inf)
    err = (got.double() - want.double()).abs()
    over = (err > tol) & finite
    assert not bool(over.any()), (f"{what}: error {err[over].max().item():.3g} over its bound at "
                                  f"{over.nonzero()[:5].tolist()}")


def _matmul_tolerance(x, xq, row_scale, col_flags, x_static, weight, weight_scale, static_weight, bias, threshold,
                      want):
    acc = xq.double() @ weight.double().T
    t_int = acc.abs() * row_scale.double().abs()[:, None] * weight_scale.double()[None, :]
    outlier = (x.abs() >= threshold) & col_flags.bool()[None, :] if threshold > 0 else torch.zeros_like(x, dtype=bool)
    x_dyn = x.double().masked_fill(~outlier, 0.0)
    t_dyn = (x_dyn.abs() @ weight.double().abs().T) * weight_scale.double()[None, :]
    t_static = x_static.double().abs() @ static_weight.double().abs().T
    t_bias = 0.0 if bias is None else bias.double().abs()[None, :]
    terms = [t_int.nan_to_num(), t_dyn.nan_to_num(), t_static.nan_to_num(), t_bias]
    return fp32_sum_tolerance(x.dtype, want, terms, [2, int(col_flags.sum()), x_static.shape[1], 0])


def _gemv_tolerance(x, weight, weight_scale, static_idx, static_weight, bias, want):
    t_main = (x.double().abs() @ weight.double().abs().T) * weight_scale.double()[None, :]
    t_static = x[:, static_idx.long()].double().abs() @ static_weight.double().abs().T
    t_bias = 0.0 if bias is None else bias.double().abs()[None, :]
    terms = [t_main.nan_to_num(), t_static.nan_to_num(), t_bias]
    return fp32_sum_tolerance(x.dtype, want, terms, [x.shape[1], static_idx.shape[0], 0])


# ---- pre-pass --------------------------------------------------------------------------------


def _check_prepass(x, static_idx, threshold, device):
    mask = _static_mask(static_idx, x.shape[1])
    want = ref.prepass(x, mask, static_idx, threshold)
    got = lowbit.ops.int8_prepass(*_to(device, x, mask, static_idx), threshold, backend="triton")
    assert all(t.device.type == device for t in got)
    _assert_bits(got[0], want[0], "xq")
    _assert_exact(got[1], want[1], "row_scale")
    _assert_bits(got[2], want[2], "col_flags")
    _assert_bits(got[3], want[3], "x_static")
    return want


PREPASS_SHAPES = [(1, 7), (3, 100), (33, 300)]


@pytest.mark.parametrize("with_static", [False, True], ids=["no_static", "static"])
@pytest.mark.parametrize("threshold", [0.0, 6.0], ids=["t0", "t6"])
@pytest.mark.parametrize("shape", PREPASS_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_prepass_matches_reference(device, dtype, shape, threshold, with_static):
    x = _activations(*shape, dtype, seed=shape[0])
    want = _check_prepass(x, _static_idx(shape[1], with_static), threshold, device)
    if threshold > 0:
        assert bool(want[2].any()), "expected flagged columns"


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_prepass_special_rows(device, dtype):
    # Rows: NaN; +Inf (an outlier at t > 0, else an Inf scale); -Inf; all zero; only outliers
    # (absmax 0); NaN and Inf in static columns only; rounding ties (absmax 127: x * 1 exactly).
    k = 70
    x = _activations(9, k, dtype, seed=5, outliers=False)
    x[0, 10] = float("nan")
    x[1, 11] = float("inf")
    x[2, 12] = float("-inf")
    x[3] = 0.0
    x[4] = 0.0
    x[4, 5], x[4, 6] = 8.0, -30.0
    x[5, 0], x[5, 69] = float("nan"), float("inf")
    x[6, 1:9] = torch.tensor([127.0, 2.5, 3.5, -2.5, -0.5, 0.5, 126.5, -1.5]).to(dtype)
    x[7, 1] = -0.0
    x[8, 20] = 6.1  # bf16: 6.09375, below 6.1 compared in fp32 (as the spec does), not in bf16
    static_idx = torch.tensor([0, 69], dtype=torch.int32)
    # 6.1 is compared in fp32; 1e-50 rounds to 0 in fp32, which turns the split off
    for threshold in (0.0, -1.0, 6.0, 6.1, 1e-50, float("nan")):
        want = _check_prepass(x, static_idx, threshold, device)
        assert bool(want[1][0].isnan()) and bool(want[1][5].isfinite())  # static NaN, Inf: no effect
        if threshold <= 0:
            assert want[0][6, 1:9].tolist() == [127, 2, 4, -2, 0, 0, 126, -2]


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_prepass_rows_wider_than_a_block(device, dtype, monkeypatch):
    # Rows walked in chunks (first the absmax, then the quantization), the last one partial.
    from lowbit.triton_kernels import int8 as kernels

    monkeypatch.setattr(kernels, "_PREPASS_MAX_BLOCK", 64)
    monkeypatch.setattr(kernels, "_PREPASS_LOOP_BLOCK", 32)
    x = _activations(5, 300, dtype, seed=6)
    x[2, 250] = float("nan")
    for threshold in (0.0, 6.0):
        _check_prepass(x, _static_idx(300, True), threshold, device)


def test_prepass_widest_row_in_registers(device):
    x = _activations(2, 16385, torch.bfloat16, seed=7)  # one past the single-block limit: walked in chunks
    _check_prepass(x, _static_idx(16385, True), 6.0, device)


@pytest.mark.parametrize("shape", [(0, 9), (3, 0)], ids=_shape_id)
def test_prepass_empty(device, shape):
    x = torch.randn(shape).to(torch.float16)
    with_static = shape[1] > 0
    _check_prepass(x, _static_idx(shape[1], with_static), 6.0, device)


# ---- matmul ----------------------------------------------------------------------------------


def _check_matmul(x, static_idx, weight, weight_scale, static_weight, bias, threshold, device):
    mask = _static_mask(static_idx, x.shape[1])
    pre = ref.prepass(x, mask, static_idx, threshold)
    args = (x, *pre, weight, weight_scale, static_weight, bias)
    want = ref.matmul(*args, threshold)
    got = lowbit.ops.int8_matmul(*_to(device, *args), threshold, backend="triton")
    assert got.device.type == device
    _assert_within(got, want, _matmul_tolerance(*args, threshold, want), "triton vs reference")
    return want


# (M, N, K): one row; ragged N tiles; 5 K tiles, the 2nd and 3rd unflagged; 2 M tiles of 128.
MATMUL_SHAPES = [(1, 7, 33), (3, 130, 300), (33, 17, 100), (150, 20, 200)]
# threshold, static columns, bias
MATMUL_VARIANTS = [
    pytest.param(0.0, False, False, id="t0"),
    pytest.param(0.0, True, True, id="t0-static-bias"),
    pytest.param(6.0, False, False, id="t6"),
    pytest.param(6.0, True, True, id="t6-static-bias"),
]


@pytest.mark.parametrize("threshold,with_static,with_bias", MATMUL_VARIANTS)
@pytest.mark.parametrize("shape", MATMUL_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_matmul_matches_reference(device, dtype, shape, threshold, with_static, with_bias):
    m, n, k = shape
    static_idx = _static_idx(k, with_static)
    weight, weight_scale, static_weight, bias = _layer(n, k, dtype, static_idx, seed=n)
    x = _activations(m, k, dtype, seed=m)
    _check_matmul(x, static_idx, weight, weight_scale, static_weight, bias if with_bias else None, threshold,
                  device)


@pytest.mark.parametrize("threshold", [0.0, 6.1], ids=["t0", "t6.1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_matmul_special_rows(device, dtype, threshold):
    # NaN row: all NaN. Inf row: an outlier at t > 0 (Inf or NaN where it meets a zero weight),
    # an Inf scale (all NaN) at t = 0. Zero row, row of outliers only: bias and outlier terms only.
    k, n = 70, 9
    static_idx = _static_idx(k, True)
    weight, weight_scale, static_weight, bias = _layer(n, k, dtype, static_idx, seed=8)
    weight[2, 11] = 0
    x = _activations(5, k, dtype, seed=8, outliers=False)
    x[0, 10] = float("nan")
    x[1, 11] = float("inf")
    x[2] = 0.0
    x[3] = 0.0
    x[3, 5], x[3, 6], x[3, 20] = 8.0, -30.0, 6.1  # 6.1: see test_prepass_special_rows
    want = _check_matmul(x, static_idx, weight, weight_scale, static_weight, bias, threshold, device)
    assert bool(want[0].isnan().all())
    assert bool(want[1].isnan().all()) if threshold == 0 else bool(want[1].isinf().any() & want[1, 2].isnan())
    assert bool(want[2:].isfinite().all())


@pytest.mark.parametrize("shape", [(0, 5, 9), (3, 0, 9), (2, 5, 0)], ids=_shape_id)
def test_matmul_empty(device, shape):
    m, n, k = shape
    weight, weight_scale, static_weight, bias = _layer(n, k, torch.bfloat16, _static_idx(k, False), seed=9)
    _check_matmul(_activations(m, k, torch.bfloat16, seed=9), _static_idx(k, False), weight, weight_scale,
                  static_weight, bias, 6.0, device)


def test_tolerance_rejects_missing_terms():
    # The bounds are tight: the reference with the outlier product, the static product or the
    # bias left out falls outside them (so a kernel that drops one fails the tests above).
    for dtype in DTYPES:
        m, n, k = 33, 17, 100
        static_idx = _static_idx(k, True)
        weight, weight_scale, static_weight, bias = _layer(n, k, dtype, static_idx, seed=n)
        x = _activations(m, k, dtype, seed=m)
        xq, row_scale, col_flags, x_static = ref.prepass(x, _static_mask(static_idx, k), static_idx, 6.0)
        args = (x, xq, row_scale, col_flags, x_static, weight, weight_scale, static_weight)
        want = ref.matmul(*args, bias, 6.0)
        tol = _matmul_tolerance(*args, bias, 6.0, want)
        wrong = {
            "no outlier product": ref.matmul(*args, bias, 0.0),
            "no static product": ref.matmul(x, xq, row_scale, col_flags, torch.zeros_like(x_static),
                                            *args[5:], bias, 6.0),
            "no bias": ref.matmul(*args, None, 6.0),
        }
        for what, y in wrong.items():
            with pytest.raises(AssertionError):
                _assert_within(y, want, tol, what)

        want = ref.gemv(x, weight, weight_scale, static_idx, static_weight, bias)
        tol = _gemv_tolerance(x, weight, weight_scale, static_idx, static_weight, bias, want)
        with pytest.raises(AssertionError):
            _assert_within(ref.gemv(x, weight, weight_scale, static_idx, static_weight, None), want, tol, "no bias")
        with pytest.raises(AssertionError):
            _assert_within(ref.gemv(x, weight, weight_scale, static_idx, static_weight.zero_(), bias), want, tol,
                           "no static product")


# ---- gemv ------------------------------------------------------------------------------------


def _check_gemv(x, static_idx, weight, weight_scale, static_weight, bias, device):
    args = (x, weight, weight_scale, static_idx, static_weight, bias)
    want = ref.gemv(*args)
    got = lowbit.ops.int8_gemv(*_to(device, *args), backend="triton")
    assert got.device.type == device
    _assert_within(got, want, _gemv_tolerance(*args, want), "triton vs reference")


# (M, N, K): decode batches of 1 to 16 rows, one of 17 (two row tiles), N over a 16/32-row block.
GEMV_SHAPES = [(1, 7, 33), (3, 130, 300), (16, 33, 100), (17, 20, 260)]


@pytest.mark.parametrize("with_static", [False, True], ids=["no_static", "static-bias"])
@pytest.mark.parametrize("shape", GEMV_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_gemv_matches_reference(device, dtype, shape, with_static):
    m, n, k = shape
    static_idx = _static_idx(k, with_static)
    weight, weight_scale, static_weight, bias = _layer(n, k, dtype, static_idx, seed=n)
    x = _activations(m, k, dtype, seed=m)
    _check_gemv(x, static_idx, weight, weight_scale, static_weight, bias if with_static else None, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_gemv_special_rows(device, dtype):
    k, n = 70, 9
    static_idx = _static_idx(k, True)
    weight, weight_scale, static_weight, bias = _layer(n, k, dtype, static_idx, seed=10)
    x = _activations(4, k, dtype, seed=10)
    x[0, 10] = float("nan")
    x[1, 11] = float("inf")
    x[2] = 0.0
    _check_gemv(x, static_idx, weight, weight_scale, static_weight, bias, device)


@pytest.mark.parametrize("shape", [(0, 5, 9), (2, 0, 9), (2, 5, 0)], ids=_shape_id)
def test_gemv_empty(device, shape):
    m, n, k = shape
    weight, weight_scale, static_weight, bias = _layer(n, k, torch.float16, _static_idx(k, False), seed=11)
    _check_gemv(_activations(m, k, torch.float16, seed=11), _static_idx(k, False), weight, weight_scale,
                static_weight, bias, device)


# ---- through the ops -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_linear_routes_to_triton(device, dtype):
    k, n = 100, 17
    static_idx = _static_idx(k, True)
    weight, weight_scale, static_weight, bias = _layer(n, k, dtype, static_idx, seed=12)
    wide = _activations(5, 2 * k, dtype, seed=12)
    x = wide[:, ::2]  # not contiguous: the op makes it so
    mask = _static_mask(static_idx, k)
    args = (weight, weight_scale, mask, static_idx, static_weight, bias)
    got = lowbit.ops.int8_linear(*_to(device, x, *args), 6.0, backend="triton")
    want = ref.linear(x.contiguous(), *args, 6.0)
    pre = ref.prepass(x.contiguous(), mask, static_idx, 6.0)
    tol = _matmul_tolerance(x.contiguous(), *pre, weight, weight_scale, static_weight, bias, 6.0, want)
    _assert_within(got, want, tol, "int8_linear triton vs reference")


def test_opcheck(device):
    k, n = 40, 5
    static_idx = _static_idx(k, True)
    weight, weight_scale, static_weight, bias = _layer(n, k, torch.bfloat16, static_idx, seed=13)
    x = _activations(3, k, torch.bfloat16, seed=13)
    mask = _static_mask(static_idx, k)
    x, mask, static_idx, weight, weight_scale, static_weight, bias = _to(
        device, x, mask, static_idx, weight, weight_scale, static_weight, bias)
    opcheck(lowbit.ops.op("int8_prepass", "triton", device), (x, mask, static_idx, 6.0),
            test_utils=_opcheck_utils("triton", device))
    pre = lowbit.ops.int8_prepass(x, mask, static_idx, 6.0, backend="triton")
    opcheck(lowbit.ops.op("int8_matmul", "triton", device),
            (x, *pre, weight, weight_scale, static_weight, bias, 6.0), test_utils=_opcheck_utils("triton", device))
    opcheck(lowbit.ops.op("int8_gemv", "triton", device), (x, weight, weight_scale, static_idx, static_weight, bias),
            test_utils=_opcheck_utils("triton", device))


@pytest.mark.gpu
def test_cuda_graph_replay():
    # No host synchronization: the whole decomposed product and the gemv capture into a graph.
    skip_unless_available("triton", "cuda")
    k, n = 300, 130
    static_idx = _static_idx(k, True)
    weight, weight_scale, static_weight, bias = _layer(n, k, torch.bfloat16, static_idx, seed=14)
    mask = _static_mask(static_idx, k)
    args = _to("cuda", weight, weight_scale, mask, static_idx, static_weight, bias)
    x = _activations(33, k, torch.bfloat16, seed=14).cuda()

    def step():
        y = lowbit.ops.int8_linear(x, *args, 6.0, backend="triton")
        g = lowbit.ops.int8_gemv(x[:4], args[0], args[1], args[3], args[4], args[5], backend="triton")
        return y, g

    eager = step()  # compiles the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.copy_(_activations(33, k, torch.bfloat16, seed=15).cuda())
    graph.replay()
    again = step()
    assert not torch.equal(eager[0], again[0])
    for got, want in zip(captured, again):
        assert torch.equal(got, want)


def test_static_columns_out_of_range_give_nan_not_a_stray_read(device):
    # The ops cannot check column indices on the GPU without a host synchronization; the kernels
    # then never read outside the row and give NaN for such a column, as the CUDA kernels do.
    x = torch.randn(3, 20, dtype=torch.bfloat16, device=device)
    idx = torch.tensor([2, 25], dtype=torch.int32, device=device)
    mask = torch.zeros(20, dtype=torch.uint8, device=device)
    _, _, _, x_static = lowbit.ops.int8_prepass(x, mask, idx, 6.0, backend="triton")
    assert torch.equal(x_static[:, 0], x[:, 2]) and bool(x_static[:, 1].isnan().all())
    weight = torch.ones(4, 20, dtype=torch.int8, device=device)
    scale = torch.ones(4, device=device)
    static_weight = torch.ones(4, 2, dtype=torch.bfloat16, device=device)
    y = lowbit.ops.int8_gemv(x, weight, scale, idx, static_weight, None, backend="triton")
    assert bool(y.isnan().all())
