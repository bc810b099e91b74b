"""The Triton kernels of lowbit::codebook_matmul / codebook_dequantize / _codebook_nearest against
the reference.

Every call goes through the public ops (or the registered Triton op) with backend="triton", the
expected values from backend="reference". ``codebook_dequantize`` is elementwise arithmetic done
in the reference's order, so it must be bit-exact; ``codebook_matmul`` must stay within the fp32
accumulation bound of ``_matmul_tolerance``, which ``test_tolerance_rejects_wrong_products``
shows is tight enough to catch a dropped codebook, bias or scale, or (at small in_features) a
weight rounded to 16 bits; ``_codebook_nearest`` must pick an entry whose distance is the least
within fp32 rounding, and the lower index of exact ties. Both matmul kernels (the gemv for M <= 16, the tile kernel above)
run on every configuration, each also forced onto the other's batch sizes. Shapes are small: on
CPU the kernels run in Triton's interpreter.
"""

import pytest
import torch
from torch.library import opcheck

import lowbit
from lowbit.reference import codebook as ref

from conftest import skip_unless_available
from helpers import assert_bits_equal, param_id

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (num_codebooks, nbits, group_size): every configuration with kernels.
CONFIGS = [(c, b, g) for c in (1, 2) for b in (8, 16) for g in (4, 8)]


def _config_id(config):
    count, nbits, g = config
    return f"{count}x{nbits}-g{g}"


@pytest.fixture(params=[pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)])
def device(request):
    skip_unless_available("triton", request.param)
    return request.param


@pytest.fixture(params=["gemv", "matmul"])
def kernel(request, monkeypatch):
    """Which matmul kernel runs, whatever the batch size: "gemv" (the small-batch kernel) or
    "matmul" (the tile kernel). The launcher picks by M; this moves its threshold."""
    from lowbit.triton_kernels import codebook as kernels

    monkeypatch.setattr(kernels, "_GEMV_MAX_M", 1 << 20 if request.param == "gemv" else 0)
    return request.param


def _opcheck_utils(device) -> tuple[str, ...]:
    """opcheck's checks. Under Triton's interpreter (CPU tensors) a kernel reads real data, so AOT
    dispatch, which runs the kernel on fake tensors, is checked on GPUs only."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    return utils[:-1] if torch.device(device).type == "cpu" else utils


def _codes(out, groups, count, nbits, generator):
    """Random codes over the whole range: int16 ones include the negative values that stand for
    indices >= 32768, and the extremes (0, 2^B - 1) appear in the first row."""
    idx = torch.randint(0, 1 << nbits, (out, groups, count), generator=generator)
    if idx.numel():
        idx[0, 0, 0] = (1 << nbits) - 1
        idx[0, -1, -1] = 0
    if nbits == 8:
        return idx.to(torch.uint8)
    return torch.where(idx >= 1 << 15, idx - (1 << 16), idx).to(torch.int16)


def _layer(out, groups, config, codebook_dtype, scale_dtype, seed, bias_dtype=None):
    """-> (codes, codebooks, scales, bias or None): codewords ~ N(0, 0.5^2), scales of both signs."""
    count, nbits, g = config
    gen = torch.Generator().manual_seed(seed)
    codes = _codes(out, groups, count, nbits, gen)
    codebooks = (torch.randn(count, 1 << nbits, 1, g, generator=gen) * 0.5).to(codebook_dtype)
    sign = torch.where(torch.rand(out, 1, 1, 1, generator=gen) < 0.25, -1.0, 1.0)
    scales = (sign * (0.5 + torch.rand(out, 1, 1, 1, generator=gen))).to(scale_dtype)
    bias = None if bias_dtype is None else torch.randn(out, generator=gen).to(bias_dtype)
    return codes, codebooks, scales, bias


def _x(m, k, dtype, seed):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 7)).to(dtype)


def _to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


# ---- comparisons -----------------------------------------------------------------------------


def _matmul_tolerance(x, codes, codebooks, scales, bias, want):
    """Elementwise bound on |got - want| for y = x W^T + bias evaluated in fp32 in another order.

    With S = |x| @ (|s| * sum_c |codeword_c|)^T + |bias| (fp64): the reference rounds each weight
    C times (C - 1 additions, the scale) and the k-term dot product and bias k + 1 times; a kernel
    may instead add the C per-codebook dot products (k * C additions) and scale the result, or
    sum the codewords first. Each result errs from the exact value by at most (its roundings) *
    u * S (u = eps32 / 2), so they differ by at most (k * C + k + 2) * eps32 * S; rounding each to
    x's dtype then differs by at most one ulp of the larger, <= eps(dtype) * |value|."""
    out, groups, count = codes.shape
    k = x.shape[1]
    idx = ref.code_indices(codes)
    magnitude = sum(codebooks[c, :, 0, :].double().abs()[idx[:, :, c]] for c in range(count))
    w_abs = magnitude.reshape(out, groups * codebooks.shape[3]) * scales.double().abs().reshape(out, 1)
    s = x.double().abs() @ w_abs.T
    if bias is not None:
        s = s + bias.double().abs()
    d = (k * count + k + 2) * torch.finfo(torch.float32).eps * s
    eps = torch.finfo(x.dtype).eps if x.dtype != torch.float32 else 0.0
    return d + eps * (want.double().abs() + d) + torch.finfo(x.dtype).smallest_normal


def _assert_within(got, want, tol, what):
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype} {list(got.shape)}"
    assert bool(want.isfinite().all()), f"{what}: the reference is not finite"
    err = (got.double() - want.double()).abs()
    over = ~(err <= tol)  # NaN in got counts as over
    assert not bool(over.any()), (f"{what}: error {err[over].max().item():.3g} over its bound "
                                  f"{tol[over].min().item():.3g} at {over.nonzero()[:5].tolist()}")


def _check_matmul(x, codes, codebooks, scales, bias, device, what="triton vs reference"):
    want = lowbit.ops.codebook_matmul(x, codes, codebooks, scales, bias, backend="reference")
    got = lowbit.ops.codebook_matmul(*_to(device, x, codes, codebooks, scales, bias), backend="triton")
    assert got.device.type == device
    _assert_within(got, want, _matmul_tolerance(x, codes, codebooks, scales, bias, want), what)
    return want


# ---- matmul ----------------------------------------------------------------------------------


@pytest.mark.parametrize("codebook_dtype", [torch.float16, torch.bfloat16], ids=param_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_matmul_every_config(device, kernel, config, dtype, codebook_dtype):
    # The batch size of each kernel's own range (3 rows for the gemv, 33 for the tile kernel),
    # 3 groups: every code width, group size, codebook count and dtype pairing.
    m = 3 if kernel == "gemv" else 33
    out, groups = 7, 3
    codes, codebooks, scales, bias = _layer(out, groups, config, codebook_dtype, codebook_dtype, seed=sum(config),
                                            bias_dtype=dtype)
    _check_matmul(_x(m, groups * config[2], dtype, seed=m), codes, codebooks, scales, bias, device)


# (M, out, in_groups): one row, one output, one group; ragged tiles of both kernels; the
# gemv's largest batch; 129 groups (several K steps, the last partial).
MATMUL_SHAPES = [(1, 97, 129), (3, 1, 3), (16, 7, 1), (17, 97, 3), (33, 1, 129), (65, 97, 1)]


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape", MATMUL_SHAPES, ids=param_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_matmul_shapes(device, dtype, shape, with_bias):
    # AQLM's 2x8 with groups of 8 (and fp16 codebooks, as AQLM stores them): the launcher picks
    # the kernel by M.
    m, out, groups = shape
    codes, codebooks, scales, bias = _layer(out, groups, (2, 8, 8), torch.float16, torch.float16, seed=out,
                                            bias_dtype=dtype if with_bias else None)
    _check_matmul(_x(m, groups * 8, dtype, seed=m), codes, codebooks, scales, bias, device)


@pytest.mark.parametrize("shape", [(1, 7, 3), (33, 97, 3), (65, 7, 129)], ids=param_id)
def test_matmul_shapes_other_kernel(device, kernel, shape):
    # Each kernel on batch sizes the launcher gives the other (and its own): 1x16 codes, groups of 4.
    m, out, groups = shape
    config = (1, 16, 4) if groups <= 3 else (2, 8, 4)
    codes, codebooks, scales, bias = _layer(out, groups, config, torch.bfloat16, torch.bfloat16, seed=m,
                                            bias_dtype=torch.bfloat16)
    _check_matmul(_x(m, groups * 4, torch.bfloat16, seed=m), codes, codebooks, scales, bias, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_matmul_fp32_codebooks_and_mixed_scales(device, kernel, dtype):
    # fp32 codewords (an IEEE dot in the tile kernel whatever x is), scales of a third dtype.
    m = 5 if kernel == "gemv" else 20
    codes, codebooks, scales, bias = _layer(9, 5, (2, 8, 8), torch.float32, torch.bfloat16, seed=11, bias_dtype=dtype)
    _check_matmul(_x(m, 40, dtype, seed=11), codes, codebooks, scales, bias, device)


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_matmul_non_contiguous_x(device, kernel, dtype):
    codes, codebooks, scales, bias = _layer(7, 3, (2, 8, 8), torch.float16, torch.float16, seed=12, bias_dtype=dtype)
    m = 3 if kernel == "gemv" else 18
    wide = _x(2 * m, 48, dtype, seed=12)
    args = _to(device, codes, codebooks, scales, bias)
    triton_op = lowbit.ops.op("codebook_matmul", "triton", device)
    # Through the public op (which makes x contiguous); straight into the Triton op, rows at a
    # stride (taken as they are) and a column-major x (copied by the launcher). Views are taken
    # on the device.
    cases = {"public op, every other column": (lowbit.ops.codebook_matmul, lambda w: w[::2, 1::2]),
             "public op, every other row": (lowbit.ops.codebook_matmul, lambda w: w[::2, :24]),
             "triton op, every other row": (triton_op, lambda w: w[::2, :24]),
             "triton op, column-major": (triton_op, lambda w: w[::2].T.contiguous().T[:, :24])}
    for what, (fn, view) in cases.items():
        x = view(wide.to(device))
        assert not x.is_contiguous()
        want = ref.matmul(view(wide).contiguous(), codes, codebooks, scales, bias)
        got = fn(x, *args, backend="triton") if fn is not triton_op else fn(x, *args)
        _assert_within(got, want, _matmul_tolerance(view(wide), codes, codebooks, scales, bias, want), what)


@pytest.mark.parametrize("shape", [(0, 5, 3), (3, 0, 3), (2, 5, 0), (20, 5, 0)], ids=param_id)
def test_matmul_empty(device, shape):
    m, out, groups = shape
    codes, codebooks, scales, bias = _layer(out, groups, (2, 8, 8), torch.float16, torch.float16, seed=13,
                                            bias_dtype=torch.float16)
    x = _x(m, groups * 8, torch.float16, seed=13)
    want = _check_matmul(x, codes, codebooks, scales, bias, device)
    if groups == 0 and m and out:
        assert torch.equal(want, bias.expand(m, out))


def test_tolerance_rejects_wrong_products():
    # The bound is tight: the reference with the second codebook, the bias or the scales left out,
    # or with the weight rounded to x's dtype (instead of staying fp32), falls outside it. (The
    # bound grows with in_features k: from k of a few thousand it admits the rounded weight.)
    m, out, groups = 17, 33, 4
    for dtype in (torch.bfloat16, torch.float16):
        codes, codebooks, scales, bias = _layer(out, groups, (2, 8, 8), dtype, dtype, seed=14, bias_dtype=dtype)
        x = _x(m, groups * 8, dtype, seed=14)
        want = ref.matmul(x, codes, codebooks, scales, bias)
        tol = _matmul_tolerance(x, codes, codebooks, scales, bias, want)
        one_codebook = codebooks.clone()
        one_codebook[1] = 0
        w_rounded = ref.dequantize(codes, codebooks, scales).to(dtype).float()
        wrong = {
            "no second codebook": ref.matmul(x, codes, one_codebook, scales, bias),
            "no bias": ref.matmul(x, codes, codebooks, scales, None),
            "no scales": ref.matmul(x, codes, codebooks, torch.ones_like(scales), bias),
            "weight rounded to x's dtype": ((x.float() @ w_rounded.T) + bias.float()).to(dtype),
        }
        for what, y in wrong.items():
            with pytest.raises(AssertionError):
                _assert_within(y, want, tol, what)


# ---- dequantize ------------------------------------------------------------------------------


@pytest.mark.parametrize("codebook_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=param_id)
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_dequantize_bit_exact(device, config, codebook_dtype):
    # Odd row and group counts across the kernel's 32-row, 128-input blocks; B = 16 at few groups.
    out, groups = (97, 3) if config[1] == 16 else (33, 129 // config[2] * 2 + 1)
    codes, codebooks, scales, _ = _layer(out, groups, config, codebook_dtype, torch.float16, seed=out + groups)
    codebooks[0, 0] = -0.0  # 0 + (-0.0) is +0.0 in the reference's sum
    codes[1] = 0
    for dtype in DTYPES:
        want = lowbit.ops.codebook_dequantize(codes, codebooks, scales, dtype, backend="reference")
        got = lowbit.ops.codebook_dequantize(*_to(device, codes, codebooks, scales), dtype, backend="triton")
        assert got.device.type == device
        assert_bits_equal(got, want, f"W in {param_id(dtype)}")


@pytest.mark.parametrize("shape", [(1, 1), (7, 1), (1, 129), (0, 3), (5, 0)], ids=param_id)
def test_dequantize_shapes(device, shape):
    out, groups = shape
    codes, codebooks, scales, _ = _layer(out, groups, (2, 8, 4), torch.bfloat16, torch.float32, seed=15)
    for dtype in DTYPES:
        want = lowbit.ops.codebook_dequantize(codes, codebooks, scales, dtype, backend="reference")
        got = lowbit.ops.codebook_dequantize(*_to(device, codes, codebooks, scales), dtype, backend="triton")
        assert_bits_equal(got, want, f"W in {param_id(dtype)}")


# ---- nearest ---------------------------------------------------------------------------------


def _distances(points, weights, codebook):
    """fp64 [P, E]: sum_t w (p_t - c_t)^2, and the fp32 evaluation bound of each: (g + 4) * u *
    sum_t |w| (p_t - c_t)^2 per distance (the difference, the square, the weighting and g - 1
    additions, each with its error carried)."""
    p, c = points.double(), codebook.double()
    w = torch.ones_like(p) if weights is None else weights.double()
    terms = w[:, None, :] * (p[:, None, :] - c[None, :, :]).square()
    g = points.shape[1]
    return terms.sum(-1), (g + 4) * torch.finfo(torch.float32).eps / 2 * terms.abs().sum(-1)


def _check_nearest(points, weights, codebook, device):
    want = lowbit.ops.codebook_nearest(points, codebook, weights, backend="reference")
    got = lowbit.ops.codebook_nearest(*_to(device, points, codebook, weights), backend="triton").cpu()
    assert got.dtype == torch.int32 and got.shape == want.shape
    assert bool(((got >= 0) & (got < codebook.shape[0])).all()), "index out of range"
    d, err = _distances(points, weights, codebook)
    rows = torch.arange(points.shape[0])
    got_d, want_d = d[rows, got.long()], d[rows, want.long()]
    # Both are within fp32 rounding of their exact distance, and the kernel's fp32 value of its
    # pick is at most that of the true least one.
    slack = err[rows, got.long()] + err[rows, want.long()]
    bad = ~(got_d - want_d <= slack)
    assert not bool(bad.any()), (f"chosen entries farther than fp32 rounding allows at points "
                                 f"{bad.nonzero()[:5].flatten().tolist()}")
    return got, want


@pytest.mark.parametrize("with_weights", [True, False], ids=["weights", "no_weights"])
@pytest.mark.parametrize("shape", [(1, 1, 8), (5, 7, 3), (33, 300, 8), (9, 600, 4)], ids=param_id)
def test_nearest_matches_reference(device, shape, with_weights):
    # (points, entries, g): one entry; any width (the op takes any, the encoder 4 or 8); entry
    # tiles of 256 crossed, the last one partial.
    p, e, g = shape
    gen = torch.Generator().manual_seed(p * e)
    points = torch.randn(p, g, generator=gen)
    codebook = torch.randn(e, g, generator=gen)
    weights = torch.rand(p, g, generator=gen) + 0.1 if with_weights else None
    got, want = _check_nearest(points, weights, codebook, device)
    assert (got == want).float().mean() > 0.9  # random data: near ties are rare


def test_nearest_ties_go_to_the_lower_index(device):
    # Entries 3, 259 and 300 are equal (259 in the same lane of the next 256-entry tile, 300 in
    # another lane), 5 and 6 mirror images of each other about 0: the distances to them tie
    # exactly, in fp32 as in fp64.
    gen = torch.Generator().manual_seed(16)
    codebook = torch.randn(400, 8, generator=gen) * 4 + 10
    codebook[259] = codebook[3]
    codebook[300] = codebook[3]
    codebook[5] = torch.linspace(-1, 1, 8)
    codebook[6] = -codebook[5]
    points = torch.cat([codebook[3:4] + 0.25, torch.zeros(1, 8), codebook[3:4]])
    weights = torch.tensor([2.0, 1.0, 3.0]).repeat_interleave(8).reshape(3, 8)
    for w in (weights, None):
        got, want = _check_nearest(points, w, codebook, device)
        assert got.tolist() == want.tolist() == [3, 5, 3]


def test_nearest_nan_as_the_reference(device):
    # torch's argmin takes the first NaN for the least: a NaN entry wins for every point, and a
    # point with a NaN (all its distances NaN) gets entry 0.
    codebook = torch.randn(300, 4, generator=torch.Generator().manual_seed(17))
    codebook[270, 1] = float("nan")
    codebook[280, 2] = float("nan")
    points = torch.randn(3, 4)
    points[1, 0] = float("nan")
    for book, expected in ((codebook, [270, 0, 270]), (codebook[:260], None)):
        want = lowbit.ops.codebook_nearest(points, book, backend="reference")
        got = lowbit.ops.codebook_nearest(points.to(device), book.to(device), backend="triton").cpu()
        assert got.tolist() == want.tolist()
        assert expected is None or want.tolist() == expected
    assert want[1] == 0


def test_nearest_empty(device):
    points = torch.zeros(0, 8)
    got = lowbit.ops.codebook_nearest(points.to(device), torch.randn(3, 8).to(device), backend="triton")
    assert got.shape == (0,) and got.dtype == torch.int32


# ---- through torch.library -------------------------------------------------------------------


def test_opcheck_matmul(device, kernel):
    codes, codebooks, scales, bias = _layer(5, 3, (2, 8, 8), torch.float16, torch.bfloat16, seed=17,
                                            bias_dtype=torch.bfloat16)
    m = 3 if kernel == "gemv" else 17
    x = _x(m, 24, torch.bfloat16, seed=17)
    x, codes, codebooks, scales, bias = _to(device, x, codes, codebooks, scales, bias)
    for b in (bias, None):
        opcheck(lowbit.ops.op("codebook_matmul", "triton", device), (x, codes, codebooks, scales, b),
                test_utils=_opcheck_utils(device))


def test_opcheck_dequantize_and_nearest(device):
    codes, codebooks, scales, _ = _to(device, *_layer(5, 3, (1, 16, 4), torch.bfloat16, torch.float32, seed=18))
    utils = _opcheck_utils(device)
    opcheck(lowbit.ops.op("codebook_dequantize", "triton", device), (codes, codebooks, scales, torch.float16),
            test_utils=utils)
    points, codebook = torch.randn(6, 8).to(device), torch.randn(10, 8).to(device)
    weights = torch.rand(6, 8).to(device)
    opcheck(lowbit.ops.op("_codebook_nearest", "triton", device), (points, weights, codebook), test_utils=utils)
    opcheck(lowbit.ops.op("_codebook_nearest", "triton", device), (points, None, codebook), test_utils=utils)


def test_checks_run_in_the_triton_op(device):
    codes, codebooks, scales, _ = _layer(5, 3, (2, 8, 8), torch.float16, torch.float16, seed=19)
    codes, codebooks, scales = _to(device, codes, codebooks, scales)
    triton_op = lowbit.ops.op("codebook_matmul", "triton", device)
    with pytest.raises(ValueError, match="in_groups"):
        triton_op(torch.randn(2, 23, device=device), codes, codebooks, scales, None)
    with pytest.raises(ValueError, match="codebooks must have shape"):
        triton_op(torch.randn(2, 24, device=device), codes.to(torch.int16), codebooks, scales, None)
    with pytest.raises(ValueError, match="1 to 65536 entries"):
        lowbit.ops.codebook_nearest(torch.randn(2, 8, device=device), torch.zeros(0, 8, device=device),
                                    backend="triton")


@pytest.mark.gpu
def test_cuda_graph_replay():
    # No host synchronization: both matmul kernels and the dequantization capture into a graph.
    skip_unless_available("triton", "cuda")
    codes, codebooks, scales, bias = _to("cuda", *_layer(130, 64, (2, 8, 8), torch.float16, torch.float16, seed=20,
                                                           bias_dtype=torch.float16))
    x = _x(33, 512, torch.float16, seed=20).cuda()

    def step():
        big = lowbit.ops.codebook_matmul(x, codes, codebooks, scales, bias, backend="triton")
        small = lowbit.ops.codebook_matmul(x[:4], codes, codebooks, scales, bias, backend="triton")
        return big, small, lowbit.ops.codebook_dequantize(codes, codebooks, scales, torch.float16, backend="triton")

    eager = step()  # compiles the kernels outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.copy_(_x(33, 512, torch.float16, seed=21).cuda())
    graph.replay()
    again = step()
    assert not torch.equal(eager[0], again[0])
    for got, want in zip(captured, again):
        assert torch.equal(got, want)
