"""lowbit::kv_decode_attention and lowbit::kv_quantize on the CUDA backend (csrc/cuda/kv.cu).

Decode attention is held against the reference (dequantize in fp32, then attention) within the
derived bound of tests/helpers.py (kv_attention_bound: fp32 sums in any order, one rounding to the
query's dtype); a test shows that the bound catches one dropped token. The shapes reach every
configuration of the kernels: 1, 2 or 4 query rows per warp (up to 16 rows per CTA, more in
several query tiles), head_dim up to 32, 64, 128, 256 and odd ones (48, 24, 8), groups from 4 to
128, packed blocks without a residual window and the reverse, an empty context, masks that hide
whole tiles, batches, and contexts long enough to be split and merged. Quantize is compared bit
for bit with the reference.
"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from lowbit import ops
from lowbit.reference import kv as ref

from conftest import param_id, run_in_cuda_graph, skip_unless_available
from helpers import kv_attention_bound
from test_kv_ops import make

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (batch, query heads, kv heads, queries, head_dim, group, packed blocks, residual tokens)
SHAPES = [
    (1, 1, 1, 1, 8, 8, 0, 3),        # residual only, one row
    (2, 6, 2, 1, 32, 8, 5, 0),       # packed only, 3 rows per KV head
    (1, 9, 3, 1, 64, 32, 7, 17),     # SmolLM2's grouping
    (2, 4, 4, 3, 16, 4, 9, 5),       # several queries, groups of 4
    (1, 8, 2, 16, 128, 64, 3, 40),   # 64 query rows: 4 query tiles
    (1, 2, 1, 2, 24, 8, 70, 11),     # head_dim 24: a partial lane chunk
    (1, 4, 2, 1, 48, 48, 3, 5),      # head_dim 48, one group per token
    (3, 8, 1, 1, 48, 16, 4, 33),     # 8 rows over one KV head, batch 3
    (1, 4, 1, 1, 256, 128, 2, 7),    # head_dim 256: shared memory past 48 KB
    (1, 32, 8, 1, 128, 64, 6, 0),    # 32/8 heads of 128
    (2, 2, 2, 64, 64, 16, 5, 9),     # 64 queries of one head each
]


@pytest.fixture(autouse=True)
def _cuda_backend():
    skip_unless_available("cuda", "cuda")


def run(args, mask, bits, group, scaling, backend="cuda"):
    cuda = [t.cuda() for t in args]
    return ops.kv_decode_attention(*cuda, None if mask is None else mask.cuda(), bits, group, scaling,
                                   backend=backend)


def assert_within_bound(got, args, keys, values, mask, bits, group, scaling):
    """got (any device) against the reference on the CPU copies, within the derived bound."""
    q = args[0]
    want = ops.kv_decode_attention(*args, mask, bits, group, scaling, backend="reference")
    assert got.dtype == q.dtype and got.shape == q.shape and got.is_contiguous()
    bound = kv_attention_bound(q, keys, values, mask, scaling, want)
    diff = (got.cpu().double() - want.double()).abs()
    bad = ~(diff <= bound)
    if bool(bad.any()):
        first = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{int(bad.sum())} of {bad.numel()} outputs off; first at {first}: got "
                             f"{got.cpu()[first].item()!r}, want {want[first].item()!r}, bound {bound[first].item():.3g}")
    return want


@pytest.mark.parametrize("shape", SHAPES, ids=param_id)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_decode_matches_reference(shape, bits, dtype):
    if shape[5] % (8 // bits):
        pytest.skip("the group must hold whole bytes of codes")
    args, keys, values = make(shape, bits, dtype, seed=sum(shape) + bits)
    scaling = shape[4] ** -0.5
    assert_within_bound(run(args, None, bits, shape[5], scaling), args, keys, values, None, bits, shape[5], scaling)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
def test_decode_masks(dtype):
    """Left padding that hides whole tiles, a causal edge, a mask broadcast over the batch, per-head
    masks, and a query that sees nothing (zeros)."""
    shape = (2, 4, 2, 2, 48, 16, 12, 37)
    args, keys, values = make(shape, 4, dtype, seed=1)
    b, hq, _, length, _, g, nb, r = shape
    total = nb * g + r
    mask = torch.ones(b, 1, length, total, dtype=torch.bool)
    mask[0, :, :, :150] = False       # the first four tiles of row 0 and part of the fifth
    mask[1, :, 1, -1] = False
    for m in (mask, mask[:1]):
        assert_within_bound(run(args, m, 4, g, 0.2), args, keys, values, m, 4, g, 0.2)
    per_head = torch.rand(b, hq, length, total, generator=torch.Generator().manual_seed(2)) > 0.3
    per_head[:, :, :, 64:128] = False  # a whole tile hidden from every query
    per_head[1, 2, 0] = False          # a query that sees nothing
    got = run(args, per_head, 4, g, 0.2)
    assert_within_bound(got, args, keys, values, per_head, 4, g, 0.2)
    assert torch.equal(got[1, 2, 0].cpu(), torch.zeros_like(got[1, 2, 0].cpu()))


@pytest.mark.parametrize("shape", [(1, 4, 1, 1, 128, 64, 128, 100), (2, 12, 2, 1, 64, 32, 100, 31)], ids=param_id)
def test_decode_long_context_is_split_and_merged(shape):
    """Thousands of tokens over few KV heads: many splits whose partial softmaxes are merged."""
    args, keys, values = make(shape, 4, torch.bfloat16, seed=3)
    scaling = shape[4] ** -0.5
    assert_within_bound(run(args, None, 4, shape[5], scaling), args, keys, values, None, 4, shape[5], scaling)
    b, hq, _, length = shape[:4]
    total = keys.shape[2]
    mask = torch.zeros(b, hq, length, total, dtype=torch.bool)
    mask[..., -5:] = True  # every split but the last sees nothing
    assert_within_bound(run(args, mask, 4, shape[5], scaling), args, keys, values, mask, 4, shape[5], scaling)


def test_decode_empty_contexts_and_shapes():
    for shape in [(2, 4, 2, 1, 32, 8, 0, 0), (1, 2, 1, 3, 16, 8, 0, 0)]:
        args, _, _ = make(shape, 4, torch.bfloat16, seed=4)
        got = run(args, None, 4, 8, 0.25)
        assert got.shape == args[0].shape and torch.equal(got.cpu(), torch.zeros_like(got.cpu()))
    args, _, _ = make((1, 2, 1, 1, 16, 8, 2, 3), 4, torch.float16, seed=5)
    assert run((args[0][:0], *(t[:0] for t in args[1:])), None, 4, 8, 0.25).shape == (0, 2, 1, 16)


def test_decode_strided_cache_views_and_a_transposed_query():
    shape = (2, 6, 3, 1, 32, 8, 6, 4)
    args, keys, values = make(shape, 2, torch.bfloat16, seed=6, capacity_extra=5)
    cuda = [t.cuda() for t in args]
    views = [t[:, :, :args[i + 1].shape[2]] for i, t in enumerate(
        torch.cat([c, torch.zeros_like(c)], dim=2) for c in cuda[1:])]
    assert not views[0].is_contiguous()
    q = cuda[0].transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, L, D] with L outermost
    got = torch.ops.lowbit.kv_decode_attention(q, *views, None, 2, 8, 0.3)
    assert_within_bound(got, args, keys, values, None, 2, 8, 0.3)


def test_bound_catches_a_dropped_token():
    shape = (1, 4, 2, 1, 64, 16, 6, 5)
    args, keys, values = make(shape, 4, torch.float32, seed=7)
    got = run(args, None, 4, 16, 0.125).cpu()
    want = assert_within_bound(got, args, keys, values, None, 4, 16, 0.125)
    total = keys.shape[2]
    dropped = torch.ones(1, 1, 1, total, dtype=torch.bool)
    dropped[..., 50] = False  # one packed token
    wrong = ops.kv_decode_attention(*args, dropped, 4, 16, 0.125, backend="reference")
    bound = kv_attention_bound(args[0], keys, values, None, 0.125, want)
    assert bool(((got.double() - wrong.double()).abs() > bound).any())


def test_decode_in_cuda_graph():
    shape = (1, 9, 3, 1, 64, 32, 40, 17)
    args, keys, values = make(shape, 4, torch.bfloat16, seed=8)
    cuda = [t.cuda() for t in args]
    mask = torch.ones(1, 1, 1, keys.shape[2], dtype=torch.bool, device="cuda")
    mask[..., :20] = False
    got = run_in_cuda_graph(lambda: ops.kv_decode_attention(*cuda, mask, 4, 32, 0.125, backend="cuda"))
    assert_within_bound(got, args, keys, values, mask.cpu(), 4, 32, 0.125)


def test_decode_opcheck():
    args, _, _ = make((1, 4, 2, 2, 16, 8, 3, 5), 4, torch.bfloat16, seed=9)
    cuda = [t.cuda() for t in args]
    mask = torch.ones(1, 1, 2, 29, dtype=torch.bool, device="cuda")
    for m in (None, mask):
        opcheck(torch.ops.lowbit.kv_decode_attention.default, (*cuda, m, 4, 8, 0.25))


def test_decode_native_checks_its_arguments():
    args, _, _ = make((1, 4, 2, 1, 16, 8, 3, 5), 4, torch.float32, seed=10)
    cuda = [t.cuda() for t in args]
    native = torch.ops.lowbit.kv_decode_attention
    with pytest.raises(TypeError, match="query"):
        native(cuda[0].double(), *cuda[1:], None, 4, 8, 0.25)
    with pytest.raises(TypeError, match="k_scale"):
        native(*cuda[:2], cuda[2].half(), *cuda[3:], None, 4, 8, 0.25)
    with pytest.raises(ValueError, match="v_codes"):
        native(*cuda[:4], cuda[4][:, :, :-1], *cuda[5:], None, 4, 8, 0.25)
    with pytest.raises(ValueError, match="mask"):
        native(*cuda, torch.ones(1, 1, 1, 7, dtype=torch.bool, device="cuda"), 4, 8, 0.25)
    with pytest.raises(ValueError, match="bits"):
        native(*cuda, None, 3, 8, 0.25)
    with pytest.raises(ValueError, match="k_residual is on"):
        native(*cuda[:7], cuda[7].cpu(), cuda[8], None, 4, 8, 0.25)
    big, _, _ = make((1, 1, 1, 1, 264, 8, 1, 1), 4, torch.float32, seed=11)
    with pytest.raises(ValueError, match="head_dim must be at most 256"):
        native(*(t.cuda() for t in big), None, 4, 8, 0.25)
    # The op's default choice runs such a head on Triton instead.
    got = ops.kv_decode_attention(*(t.cuda() for t in big), None, 4, 8, 0.25)
    want = ops.kv_decode_attention(*big, None, 4, 8, 0.25, backend="reference")
    assert torch.allclose(got.cpu(), want, rtol=1e-4, atol=1e-5)


# -- lowbit::kv_quantize ------------------------------------------------------------------------------
def _as_bits(t):
    t = t.cpu()
    return t if t.dtype == torch.uint8 else t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def assert_quantize_matches(keys, values, bits, group):
    got = ops.kv_quantize(keys.cuda(), values.cuda(), bits, group, backend="cuda")
    want = ops.kv_quantize(keys, values, bits, group, backend="reference")
    for name, a, b in zip(("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"), got, want):
        assert a.is_cuda and a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(_as_bits(a), _as_bits(b)), name


@pytest.mark.parametrize("shape,group", [((1, 1, 8, 8), 8), ((2, 3, 64, 32), 16), ((1, 2, 128, 64), 64),
                                         ((3, 1, 12, 12), 4), ((1, 2, 256, 128), 128), ((2, 1, 48, 48), 48),
                                         ((1, 8, 600, 64), 8)], ids=param_id)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_quantize_is_bit_exact_with_the_reference(shape, group, bits, dtype):
    if group % (8 // bits):
        pytest.skip("the group must hold whole bytes of codes")
    gen = torch.Generator().manual_seed(sum(shape) + bits)
    keys = (torch.randn(shape, generator=gen) * torch.linspace(0.1, 8, shape[-1]) + 0.3).to(dtype)
    values = torch.randn(shape, generator=gen).to(dtype)
    assert_quantize_matches(keys, values, bits, group)


@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_quantize_edges(dtype):
    """Constant groups (scale 0), negative zeros, subnormals (bfloat16's are fp32 subnormals: no
    flush to zero), a range near the dtype's largest value, and non-contiguous values."""
    info = torch.finfo(dtype)
    g = torch.Generator().manual_seed(12)
    keys = torch.randn(1, 4, 16, 8, generator=g)
    keys[0, 0] = 0.375
    keys[0, 1] = torch.tensor(-0.0)
    keys[0, 2] = torch.randn(16, 8, generator=g) * info.smallest_normal
    keys[0, 3] = torch.linspace(-info.max * 0.45, info.max * 0.45, 128).reshape(16, 8)
    keys = keys.to(dtype)
    values = keys.transpose(1, 2).contiguous().transpose(1, 2).flip(-1)
    for bits in (2, 4, 8):
        assert_quantize_matches(keys, values, bits, 8)


def test_quantize_in_cuda_graph_and_opcheck():
    gen = torch.Generator().manual_seed(13)
    keys = torch.randn(2, 3, 64, 32, generator=gen).to(torch.bfloat16).cuda()
    values = torch.randn(2, 3, 64, 32, generator=gen).to(torch.bfloat16).cuda()
    got = run_in_cuda_graph(lambda: ops.kv_quantize(keys, values, 4, 16, backend="cuda"))
    want = ops.kv_quantize(keys.cpu(), values.cpu(), 4, 16, backend="reference")
    for a, b in zip(got, want):
        assert torch.equal(_as_bits(a), _as_bits(b))
    opcheck(torch.ops.lowbit.kv_quantize.default, (keys, values, 4, 16))
    empty = ops.kv_quantize(keys[:, :, :0], values[:, :, :0], 4, 16, backend="cuda")
    assert [t.shape[2] for t in empty] == [0, 0, 0, 0, 0, 0]


def test_quantize_native_checks_its_arguments():
    k = torch.randn(1, 2, 16, 8, device="cuda")
    native = torch.ops.lowbit.kv_quantize
    for args, error, name in [((k.int(), k, 4, 8), TypeError, "keys"), ((k, k[:, :1], 4, 8), ValueError, "values"),
                              ((k, k.cpu(), 4, 8), ValueError, "values"),
                              ((k[:, :, :12], k[:, :, :12], 4, 8), ValueError, "tokens"),
                              ((k, k, 3, 8), ValueError, "bits"), ((k, k, 2, 6), ValueError, "group")]:
        with pytest.raises(error, match=name):
            native(*args)


def test_decode_reads_what_quantize_wrote():
    """The two CUDA ops together, as the cache runs them: quantize on the GPU, attend on the GPU."""
    gen = torch.Generator().manual_seed(14)
    k = torch.randn(1, 2, 128, 64, generator=gen).to(torch.bfloat16)
    v = torch.randn(1, 2, 128, 64, generator=gen).to(torch.bfloat16)
    q = torch.randn(1, 8, 1, 64, generator=gen).to(torch.bfloat16)
    kr, vr = k[:, :, :9].clone(), v[:, :, :9].clone()
    packed = ops.kv_quantize(k.cuda(), v.cuda(), 4, 32, backend="cuda")
    got = ops.kv_decode_attention(q.cuda(), *packed, kr.cuda(), vr.cuda(), None, 4, 32, 0.125, backend="cuda")
    args = (q, *ref.quantize_keys(k, 4, 32), *ref.quantize_values(v, 4, 32), kr, vr)
    keys = torch.cat([ref.dequantize_keys(*args[1:4], 4, 32, torch.float32), kr.float()], dim=2)
    values = torch.cat([ref.dequantize_values(*args[4:7], 4, 32, torch.float32), vr.float()], dim=2)
    assert_within_bound(got, args, keys, values, None, 4, 32, 0.125)
