"""lowbit::codebook_matmul on the CUDA backend (csrc/cuda/codebook.cu), against the reference.

The kernels and the reference sum the same products in fp32, in other orders and groupings: the
reference rounds each weight (codewords summed in codebook order, then scaled) and then sums its k
products and the bias; the kernels multiply x by each codebook's codeword exactly (tensor cores,
operands split into bf16 terms where their dtypes differ) and sum those k * C products, then scale
and add the bias. With u = eps32 / 2 and S = |x| @ (|scales| * sum_c |codeword_c|)^T + |bias| (in
fp64), the reference errs by at most (k + C + 1) u S, the kernels by (k C + 2) u S (the dropped
split terms weigh under u each), so the two differ by at most (k C + k + 2) eps32 S for C <= 2;
rounding both to x's dtype adds at most eps(dtype) (|want| + that). A test checks that this bound
still catches one input group left out.
"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import lowbit
from lowbit.reference import codebook as ref

from conftest import param_id, run_in_cuda_graph, skip_unless_available

pytestmark = pytest.mark.gpu

X_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
BOOK_DTYPES = [torch.float16, torch.bfloat16]
# (num_codebooks, nbits, group_size): every configuration with kernels.
CONFIGS = [(c, b, g) for c in (1, 2) for b in (8, 16) for g in (4, 8)]
# (rows, out_features, in_groups, bias): rows 1..16 take the GEMV, more the tiled GEMM; odd sizes
# leave partial row tiles (8, 16, 64, 128), partial rounds of the codes and groups past in_features.
SHAPES = [(1, 7, 3, True), (2, 97, 1, False), (7, 1, 129, True), (16, 97, 129, False), (4, 4096, 3, False),
          (3, 97, 512, True), (17, 7, 3, True), (64, 97, 3, False), (300, 1, 1, True), (40, 97, 512, False),
          (17, 4096, 1, True)]


@pytest.fixture(autouse=True)
def _cuda_backend():
    skip_unless_available("cuda", "cuda")


def config_id(config) -> str:
    c, b, g = config
    return f"{c}x{b}g{g}"


def shape_id(shape) -> str:
    rows, out, groups, bias = shape
    return f"M{rows}-N{out}-G{groups}-{'bias' if bias else 'nobias'}"


def make_layer(out_features, in_groups, config, book_dtype, scale_dtype, seed):
    """-> (codes, codebooks, scales) on the CPU: uniform codes (int16 ones over the whole unsigned
    range, so half of them negative), N(0, 0.25) codebooks, scales in +-[0.01, 0.11]."""
    c, nbits, g = config
    gen = torch.Generator().manual_seed(seed)
    if nbits == 8:
        codes = torch.randint(0, 256, (out_features, in_groups, c), generator=gen, dtype=torch.uint8)
    else:
        codes = torch.randint(-32768, 32768, (out_features, in_groups, c), generator=gen, dtype=torch.int16)
    codebooks = (torch.randn(c, 1 << nbits, 1, g, generator=gen) * 0.5).to(book_dtype)
    sign = torch.randint(0, 2, (out_features, 1, 1, 1), generator=gen) * 2 - 1
    scales = ((torch.rand(out_features, 1, 1, 1, generator=gen) * 0.1 + 0.01) * sign).to(scale_dtype)
    return codes, codebooks, scales


def make_x(rows, in_features, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, in_features, generator=gen).to(dtype)


def tolerance(x, codes, codebooks, scales, bias, want) -> torch.Tensor:
    """The bound of the module docstring, elementwise (fp64), from CPU tensors."""
    out, groups, count = codes.shape
    k = x.shape[1]
    idx = ref.code_indices(codes)
    magnitude = torch.zeros(out, groups, codebooks.shape[-1], dtype=torch.float64)
    for c in range(count):
        magnitude += codebooks[c, :, 0, :].double().abs()[idx[:, :, c]]
    magnitude = (magnitude * scales.reshape(out, 1, 1).double().abs()).reshape(out, -1)
    s = x.double().abs() @ magnitude.T
    if bias is not None:
        s = s + bias.double().abs()
    d = (k * count + k + 2) * torch.finfo(torch.float32).eps * s
    return d + torch.finfo(x.dtype).eps * (want.double().abs() + d) + torch.finfo(x.dtype).tiny


def violations(got, want, tol) -> torch.Tensor:
    """Where |got - want| > tol (NaN matching NaN and equal infinities are fine)."""
    got, want = got.double(), want.double()
    ok = ((got - want).abs() <= tol) | (got == want) | (got.isnan() & want.isnan())
    return ~ok


def assert_close_to_reference(y, x, codes, codebooks, scales, bias):
    """y (any device) against the reference on CPU copies of the inputs."""
    x, codes, codebooks, scales = (t.cpu() for t in (x, codes, codebooks, scales))
    bias = None if bias is None else bias.cpu()
    want = lowbit.ops.codebook_matmul(x, codes, codebooks, scales, bias, backend="reference")
    assert y.dtype == want.dtype == x.dtype and y.shape == want.shape, (y.dtype, y.shape, want.shape)
    got = y.cpu()
    tol = tolerance(x, codes, codebooks, scales, bias, want)
    bad = violations(got, want, tol)
    if bool(bad.any()):
        first = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{int(bad.sum())} of {bad.numel()} outputs off; first at {first}: got "
                             f"{got[first].item()!r}, want {want[first].item()!r}, tolerance {tol[first].item():.3g}")


def run_cuda(x, codes, codebooks, scales, bias):
    """The CUDA backend on GPU copies of CPU tensors -> its output (on the GPU)."""
    cuda = [t.cuda() for t in (x, codes, codebooks, scales)]
    y = lowbit.ops.codebook_matmul(*cuda, None if bias is None else bias.cuda(), backend="cuda")
    assert y.device.type == "cuda"
    return y


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("book_dtype", BOOK_DTYPES, ids=param_id)
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=param_id)
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_matmul_matches_reference(config, x_dtype, book_dtype, shape):
    rows, out, groups, has_bias = shape
    seed = rows * 1009 + out * 13 + groups
    codes, codebooks, scales = make_layer(out, groups, config, book_dtype, book_dtype, seed)
    x = make_x(rows, groups * config[2], x_dtype, seed + 1)
    bias = torch.randn(out, generator=torch.Generator().manual_seed(seed + 2)).to(x_dtype) if has_bias else None
    assert_close_to_reference(run_cuda(x, codes, codebooks, scales, bias), x, codes, codebooks, scales, bias)


@pytest.mark.parametrize("rows", [5, 20], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("scale_dtype", X_DTYPES, ids=param_id)
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=param_id)
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_matmul_fp32_codebooks_and_any_scales(config, x_dtype, scale_dtype, rows):
    # fp32 codebooks: 16- or 32-byte codewords (two 8-bit fp32 codebooks of 8 keep 4 copies in
    # shared memory, not 8), three bf16 terms per value.
    codes, codebooks, scales = make_layer(33, 7, config, torch.float32, scale_dtype, seed=rows)
    x = make_x(rows, 7 * config[2], x_dtype, seed=rows + 1)
    bias = torch.randn(33, generator=torch.Generator().manual_seed(3)).to(x_dtype)
    assert_close_to_reference(run_cuda(x, codes, codebooks, scales, bias), x, codes, codebooks, scales, bias)


@pytest.mark.parametrize("rows", [1, 16, 17, 300], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                    (torch.bfloat16, torch.float16)],
                         ids=lambda d: f"x{param_id(d[0])}-cb{param_id(d[1])}")
@pytest.mark.parametrize("config", [(2, 8, 8), (1, 16, 8)], ids=config_id)
def test_matmul_llama_shape(config, dtypes, rows):
    # AQLM's two configurations on a 4096 x 4096 layer: many row tiles, full rounds of the codes.
    x_dtype, book_dtype = dtypes
    codes, codebooks, scales = make_layer(4096, 512, config, book_dtype, torch.float16, seed=rows + 7)
    x = make_x(rows, 4096, x_dtype, seed=rows + 8)
    assert_close_to_reference(run_cuda(x, codes, codebooks, scales, None), x, codes, codebooks, scales, None)


def test_tolerance_catches_a_dropped_group():
    # The bound is tight enough to see one input group (of 64) left out of the sum.
    codes, codebooks, scales = make_layer(97, 64, (2, 8, 8), torch.float16, torch.float16, seed=11)
    x = make_x(16, 512, torch.float16, seed=12)
    y = run_cuda(x, codes, codebooks, scales, None).cpu()
    assert_close_to_reference(y, x, codes, codebooks, scales, None)
    dropped = x.clone()
    dropped[:, 8 * 40:8 * 41] = 0
    want = lowbit.ops.codebook_matmul(dropped, codes, codebooks, scales, None, backend="reference")
    assert bool(violations(y, want, tolerance(x, codes, codebooks, scales, None, want)).any())


@pytest.mark.parametrize("rows", [3, 40], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=param_id)
def test_matmul_nan_row(x_dtype, rows):
    codes, codebooks, scales = make_layer(20, 16, (2, 8, 8), torch.float16, torch.float16, seed=13)
    x = make_x(rows, 128, x_dtype, seed=14)
    x[1, 77] = float("nan")
    y = run_cuda(x, codes, codebooks, scales, None).cpu()
    others = [m for m in range(rows) if m != 1]
    assert bool(y[1].isnan().all()) and not bool(y[others].isnan().any())


@pytest.mark.parametrize("rows", [2, 33], ids=lambda m: f"M{m}")
def test_matmul_odd_offsets_and_views(rows):
    # x at an odd offset and transposed, codes at an odd byte offset (no 8-byte code loads),
    # codebooks at an odd offset: the glue copies x and the codebooks, the kernels read the codes
    # as they lie.
    codes, codebooks, scales = make_layer(24, 64, (2, 8, 4), torch.bfloat16, torch.bfloat16, seed=15)
    base = make_x(rows * 256 + 1, 1, torch.bfloat16, seed=16).reshape(-1).cuda()
    x = base[1:].view(rows, 256)
    cbase = torch.zeros(codes.numel() + 1, dtype=torch.uint8, device="cuda")
    cbase[1:] = codes.reshape(-1).cuda()
    codes_view = cbase[1:].view(codes.shape)
    bbase = torch.zeros(codebooks.numel() + 1, dtype=codebooks.dtype, device="cuda")
    bbase[1:] = codebooks.reshape(-1).cuda()
    books_view = bbase[1:].view(codebooks.shape)
    assert x.data_ptr() % 16 != 0 and codes_view.data_ptr() % 8 != 0 and books_view.data_ptr() % 16 != 0
    y = torch.ops.lowbit.codebook_matmul(x, codes_view, books_view, scales.cuda(), None)
    assert_close_to_reference(y, x, codes, codebooks, scales, None)
    xt = make_x(256, rows, torch.bfloat16, seed=17).cuda().T
    assert not xt.is_contiguous()
    y = torch.ops.lowbit.codebook_matmul(xt, codes_view, books_view, scales.cuda(), None)
    assert_close_to_reference(y, xt, codes, codebooks, scales, None)


def test_matmul_empty_shapes():
    codes, codebooks, scales = make_layer(5, 0, (1, 8, 8), torch.float16, torch.float16, seed=18)
    bias = torch.randn(5, generator=torch.Generator().manual_seed(19)).half()
    for rows in (2, 20):
        y = run_cuda(torch.zeros(rows, 0, dtype=torch.float16), codes, codebooks, scales, bias)
        assert torch.equal(y.cpu(), bias.expand(rows, 5))  # x W^T = 0: the bias alone
    codes, codebooks, scales = make_layer(0, 4, (2, 16, 4), torch.bfloat16, torch.bfloat16, seed=20)
    assert run_cuda(make_x(3, 16, torch.bfloat16, 21), codes, codebooks, scales, None).shape == (3, 0)
    codes, codebooks, scales = make_layer(6, 4, (2, 8, 4), torch.bfloat16, torch.bfloat16, seed=22)
    assert run_cuda(make_x(0, 16, torch.bfloat16, 23), codes, codebooks, scales, None).shape == (0, 6)


@pytest.mark.parametrize("rows", [4, 40], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("config", [(2, 8, 8), (1, 16, 4)], ids=config_id)
def test_matmul_in_cuda_graph(config, rows):
    # No host synchronization (the first call's attribute and occupancy queries are host-side and
    # happen in the eager warm-up): capture and replay give the eager result.
    codes, codebooks, scales = (t.cuda() for t in make_layer(64, 40, config, torch.float16, torch.float16, seed=24))
    x = make_x(rows, 40 * config[2], torch.bfloat16, seed=25).cuda()
    bias = torch.randn(64, generator=torch.Generator().manual_seed(26)).to(torch.bfloat16).cuda()
    y = run_in_cuda_graph(lambda: lowbit.ops.codebook_matmul(x, codes, codebooks, scales, bias, backend="cuda"))
    assert_close_to_reference(y, x, codes, codebooks, scales, bias)


@pytest.mark.parametrize("rows", [3, 20], ids=lambda m: f"M{m}")
def test_matmul_opcheck(rows):
    codes, codebooks, scales = (t.cuda() for t in make_layer(12, 5, (2, 8, 8), torch.float16, torch.float16, seed=27))
    x = make_x(rows, 40, torch.float16, seed=28).cuda()
    bias = torch.randn(12, generator=torch.Generator().manual_seed(29)).half().cuda()
    opcheck(torch.ops.lowbit.codebook_matmul.default, (x, codes, codebooks, scales, bias))
    opcheck(torch.ops.lowbit.codebook_matmul.default, (x, codes, codebooks, scales, None))


def test_native_checks_its_arguments():
    native = torch.ops.lowbit.codebook_matmul
    codes, codebooks, scales = (t.cuda() for t in make_layer(8, 4, (2, 8, 8), torch.float16, torch.float16, seed=30))
    x = make_x(2, 32, torch.float16, seed=31).cuda()
    bias = torch.zeros(8, dtype=torch.float16, device="cuda")
    with pytest.raises(TypeError, match="x must be bfloat16"):
        native(x.double(), codes, codebooks, scales, bias)
    with pytest.raises(ValueError, match="x must be 2-D"):
        native(x.reshape(-1), codes, codebooks, scales, bias)
    with pytest.raises(ValueError, match="x's last dimension"):
        native(x[:, :-8], codes, codebooks, scales, bias)
    with pytest.raises(TypeError, match="codes must be uint8"):
        native(x, codes.int(), codebooks, scales, bias)
    with pytest.raises(ValueError, match="num_codebooks"):
        native(x, torch.cat([codes, codes[:, :, :1]], 2), codebooks, scales, bias)
    with pytest.raises(ValueError, match="codebooks must have shape"):
        native(x, codes, codebooks[:, :128], scales, bias)
    with pytest.raises(ValueError, match="codebooks must have shape"):
        native(x, codes.view(torch.int16)[:, :2], codebooks, scales, bias)  # 16-bit codes need 2^16 entries
    with pytest.raises(TypeError, match="codebooks must be bfloat16"):
        native(x, codes, codebooks.double(), scales, bias)
    with pytest.raises(ValueError, match="scales must have shape"):
        native(x, codes, codebooks, scales[:-1], bias)
    with pytest.raises(TypeError, match="bias must be"):
        native(x, codes, codebooks, scales, bias.float())
    with pytest.raises(ValueError, match="bias must have shape"):
        native(x, codes, codebooks, scales, bias[:-1])
    with pytest.raises(ValueError):
        native(x, codes.cpu(), codebooks, scales, bias)
