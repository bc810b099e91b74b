"""lowbit::kv_decode_attention: the C++ kernel against the reference (dequantize in fp32, then
attention) within the derived bound of tests/helpers.py, over grouped-query shapes, every bit
width and dtype, masks, strided cache views, every ISA build; opcheck and bad arguments."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lowbit import ops
from lowbit.reference import kv as ref

from conftest import param_id, skip_unless_available
from helpers import kv_attention_bound

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (batch, query heads, kv heads, queries, head_dim, group, packed blocks, residual tokens)
SHAPES = [(1, 1, 1, 1, 8, 8, 0, 3), (2, 6, 2, 1, 32, 8, 5, 0), (1, 9, 3, 1, 64, 32, 7, 17),
          (2, 4, 4, 3, 16, 4, 9, 5), (1, 8, 2, 16, 128, 64, 3, 40), (1, 2, 1, 2, 24, 8, 70, 11),
          (1, 4, 2, 1, 48, 48, 3, 5),
          # 16-byte rows for the AVX-512 table paths at 2 and 4 bits: pairs of them, an odd count, a
          # single one per group, two groups per head.
          (1, 9, 3, 1, 64, 64, 4, 70), (1, 3, 1, 2, 192, 96, 3, 5), (2, 9, 3, 1, 128, 128, 2, 3)]


@pytest.fixture(autouse=True)
def _native():
    skip_unless_available("cpu", "cpu")


def make(shape, bits, dtype, seed=0, capacity_extra=0):
    """Query, a layer's packed blocks (views into buffers with capacity_extra more blocks, as the
    cache keeps them) and residual window, and the fp32 keys and values they stand for."""
    b, hq, hkv, length, d, g, nb, r = shape
    gen = torch.Generator().manual_seed(seed)
    k = (torch.randn(b, hkv, nb * g, d, generator=gen) * 2 + 0.5).to(dtype)
    v = torch.randn(b, hkv, nb * g, d, generator=gen).to(dtype)
    kc, ks, kz = ref.quantize_keys(k, bits, g)
    vc, vs, vz = ref.quantize_values(v, bits, g)
    if capacity_extra:
        def roomy(t, per_block):
            big = t.new_zeros((*t.shape[:2], t.shape[2] + capacity_extra * per_block, *t.shape[3:]))
            big[:, :, :t.shape[2]] = t
            return big[:, :, :t.shape[2]]
        kc, ks, kz = (roomy(t, 1) for t in (kc, ks, kz))
        vc, vs, vz = (roomy(t, g) for t in (vc, vs, vz))
    kr = torch.randn(b, hkv, r, d, generator=gen).to(dtype)
    vr = torch.randn(b, hkv, r, d, generator=gen).to(dtype)
    q = torch.randn(b, hq, length, d, generator=gen).to(dtype)
    keys = torch.cat([ref.dequantize_keys(kc, ks, kz, bits, g, torch.float32), kr.float()], dim=2)
    values = torch.cat([ref.dequantize_values(vc, vs, vz, bits, g, torch.float32), vr.float()], dim=2)
    return (q, kc, ks, kz, vc, vs, vz, kr, vr), keys, values


def check(args, keys, values, mask, bits, group, scaling=None):
    q = args[0]
    scaling = scaling if scaling is not None else q.shape[-1] ** -0.5
    got = ops.kv_decode_attention(*args, mask, bits, group, scaling, backend="cpu")
    want = ops.kv_decode_attention(*args, mask, bits, group, scaling, backend="reference")
    assert got.dtype == q.dtype and got.shape == q.shape and got.is_contiguous()
    bound = kv_attention_bound(q, keys, values, mask, scaling, want)
    diff = (got.double() - want.double()).abs()
    assert bool((diff <= bound).all()), f"max excess {(diff - bound).max().item():.3g}"
    return got, want


@pytest.mark.parametrize("shape", SHAPES, ids=param_id)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_matches_reference(shape, bits, dtype):
    args, keys, values = make(shape, bits, dtype)
    check(args, keys, values, None, bits, shape[5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=param_id)
def test_masks_padding_broadcast_and_fully_masked_rows(dtype):
    shape = (2, 4, 2, 2, 16, 8, 6, 9)
    args, keys, values = make(shape, 4, dtype, seed=1)
    b, hq, _, length, _, g, nb, r = shape
    total = nb * g + r
    mask = torch.ones(b, 1, length, total, dtype=torch.bool)
    mask[0, :, :, :13] = False      # left padding of row 0
    mask[1, :, 1, -1] = False       # a causal edge
    check(args, keys, values, mask, 4, g)
    check(args, keys, values, mask[:1], 4, g)  # broadcast over the batch
    per_head = torch.rand(b, hq, length, total, generator=torch.Generator().manual_seed(2)) > 0.3
    check(args, keys, values, per_head, 4, g)
    per_head[1, 2, 0] = False  # a query that sees nothing gets zeros
    got, _ = check(args, keys, values, per_head, 4, g)
    assert torch.equal(got[1, 2, 0], torch.zeros_like(got[1, 2, 0]))


def test_strided_cache_views_and_a_transposed_query():
    shape = (2, 6, 3, 1, 32, 8, 6, 4)
    args, keys, values = make(shape, 2, torch.bfloat16, seed=3, capacity_extra=5)
    assert not args[1].is_contiguous()
    q = args[0].transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, L, D] with L outermost
    check((q, *args[1:]), keys, values, None, 2, 8)


def test_long_context_splits():
    """More tokens than one split takes: the splits' partial softmaxes are merged."""
    shape = (1, 9, 3, 1, 64, 32, 80, 37)
    args, keys, values = make(shape, 4, torch.bfloat16, seed=4)
    check(args, keys, values, None, 4, 32)


def test_bound_catches_a_dropped_residual_and_a_lost_zero():
    shape = (1, 4, 2, 1, 16, 8, 4, 6)
    args, keys, values = make(shape, 4, torch.float32, seed=5)
    q = args[0]
    want = ops.kv_decode_attention(*args, None, 4, 8, 0.25, backend="reference")
    bound = kv_attention_bound(q, keys, values, None, 0.25, want)
    kr, vr = args[7], args[8]
    no_residual = (*args[:7], kr[:, :, :0], vr[:, :, :0])
    wrong1 = ref.attention(q, keys[:, :, :32], values[:, :, :32], None, 0.25)
    wrong2 = ops.kv_decode_attention(*args[:6], torch.zeros_like(args[6]), kr, vr, None, 4, 8, 0.25,
                                     backend="reference")
    for wrong in (wrong1, wrong2):
        assert bool(((wrong.double() - want.double()).abs() > bound).any())
    assert ops.kv_decode_attention(*no_residual, None, 4, 8, 0.25, backend="cpu").shape == q.shape


def test_opcheck():
    args, _, _ = make((1, 4, 2, 2, 16, 8, 3, 5), 4, torch.bfloat16, seed=6)
    mask = torch.ones(1, 1, 2, 29, dtype=torch.bool)
    for m in (None, mask):
        torch.library.opcheck(torch.ops.lowbit.kv_decode_attention.default, (*args, m, 4, 8, 0.25))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_arguments_name_the_argument(backend):
    args, _, _ = make((1, 4, 2, 1, 16, 8, 3, 5), 4, torch.float32, seed=7)
    bad = [
        ((args[0].to(torch.int32), *args[1:]), None, 4, TypeError, "query"),
        ((*args[:2], args[2].half(), *args[3:]), None, 4, (TypeError, ValueError), "k_scale"),
        ((*args[:4], args[4][:, :, :-1], *args[5:]), None, 4, ValueError, "v_codes"),
        (args, torch.ones(1, 1, 1, 7, dtype=torch.bool), 4, ValueError, "mask"),
        (args, None, 3, ValueError, "bits"),
    ]
    for a, mask, bits, error, name in bad:
        with pytest.raises(error, match=name):
            ops.kv_decode_attention(*a, mask, bits, 8, 0.25, backend=backend)


def _host_isas():
    flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    avx2 = {"avx2", "fma", "f16c"} <= flags
    return {"generic": True, "avx2": avx2, "avx512": avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags}


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_every_isa_build(isa):
    """Each ISA build (LOWBIT_CPU_ISA, read once, in a fresh process) matches the reference."""
    if not _host_isas()[isa]:
        pytest.skip(f"this CPU has no {isa}")
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, "tests")
        from test_kv_ops import make, check
        for shape, bits, dtype in [((1, 9, 3, 1, 64, 32, 7, 17), 2, torch.bfloat16),
                                   ((2, 4, 4, 3, 16, 4, 9, 5), 8, torch.float32),
                                   ((1, 2, 1, 2, 24, 8, 70, 11), 4, torch.float16)]:
            args, keys, values = make(shape, bits, dtype)
            check(args, keys, values, None, bits, shape[5])
        print("OK")
    """)
    env = {**os.environ, "LOWBIT_CPU_ISA": isa}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr


# -- lowbit::kv_quantize ------------------------------------------------------------------------------
def _as_bits(t):
    return t if t.dtype == torch.uint8 else t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("shape,group", [((1, 1, 8, 8), 8), ((2, 3, 64, 32), 16), ((1, 2, 128, 64), 64),
                                         ((3, 1, 12, 12), 4)], ids=param_id)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_quantize_is_bit_exact_with_the_reference(shape, group, bits, dtype):
    if group % (8 // bits):
        pytest.skip("the group must hold whole bytes of codes")
    gen = torch.Generator().manual_seed(sum(shape) + bits)
    keys = (torch.randn(shape, generator=gen) * torch.linspace(0.1, 8, shape[-1]) + 0.3).to(dtype)
    values = torch.randn(shape, generator=gen).to(dtype)
    got = ops.kv_quantize(keys, values, bits, group, backend="cpu")
    want = ops.kv_quantize(keys, values, bits, group, backend="reference")
    for name, a, b in zip(("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(_as_bits(a), _as_bits(b)), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=param_id)
def test_quantize_edges_constant_groups_zeros_subnormals_and_the_range_top(dtype):
    """Constant groups (scale 0), signed zeros, subnormals, and groups near the dtype's largest value:
    every code and scale as the reference's, and every element within half a step."""
    info = torch.finfo(dtype)
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(1, 4, 16, 8, generator=g)
    keys[0, 0] = 0.375                              # constant
    keys[0, 1] = torch.tensor(-0.0)                 # negative zeros
    keys[0, 2] = torch.randn(16, 8, generator=g) * info.smallest_normal  # subnormals
    keys[0, 3] = torch.linspace(-info.max * 0.45, info.max * 0.45, 128).reshape(16, 8)  # range within fp32
    keys = keys.to(dtype)
    for bits in (2, 4, 8):
        got = ops.kv_quantize(keys, keys, bits, 8, backend="cpu")
        want = ops.kv_quantize(keys, keys, bits, 8, backend="reference")
        for a, b in zip(got, want):
            assert torch.equal(_as_bits(a), _as_bits(b))
        back = ref.dequantize_keys(*got[:3], bits, 8, torch.float32)
        step = got[1].float().repeat_interleave(8, dim=2)
        assert bool(((back - keys.float()).abs() <= step * 0.5 * (1 + 2.0 ** -20) + keys.float().abs() * 2.0 ** -23).all())


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_quantize_refuses_bad_arguments(backend):
    k = torch.randn(1, 2, 16, 8)
    for args, error, name in [((k.int(), k, 4, 8), TypeError, "keys"), ((k, k[:, :1], 4, 8), ValueError, "values"),
                              ((k[:, :, :12], k[:, :, :12], 4, 8), ValueError, "tokens"), ((k, k, 3, 8), ValueError, "bits"),
                              ((k, k, 2, 6), ValueError, "group")]:
        with pytest.raises(error, match=name):
            ops.kv_quantize(*args, backend=backend)


def test_quantize_opcheck():
    k = torch.randn(1, 2, 16, 8).to(torch.bfloat16)
    torch.library.opcheck(torch.ops.lowbit.kv_quantize.default, (k, k * 2, 4, 8))


# -- the Triton kernel (interpreted on CPU tensors; compiled on a GPU) -------------------------------------
@pytest.fixture(params=[pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)])
def triton_device(request):
    skip_unless_available("triton", request.param)
    return request.param


@pytest.mark.parametrize("shape", SHAPES, ids=param_id)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_triton_matches_reference(shape, bits, triton_device):
    args, keys, values = make(shape, bits, torch.float32 if bits != 4 else torch.bfloat16, seed=11)
    args = [t.to(triton_device) for t in args]
    keys, values = keys.to(triton_device), values.to(triton_device)
    q = args[0]
    scaling = q.shape[-1] ** -0.5
    got = ops.kv_decode_attention(*args, None, bits, shape[5], scaling, backend="triton")
    want = ops.kv_decode_attention(*args, None, bits, shape[5], scaling, backend="reference")
    bound = kv_attention_bound(q.cpu(), keys.cpu(), values.cpu(), None, scaling, want.cpu())
    assert got.dtype == q.dtype and bool(((got.double().cpu() - want.double().cpu()).abs() <= bound).all())


def test_triton_masks_and_long_contexts(triton_device):
    shape = (2, 4, 2, 2, 16, 8, 40, 9)
    args, keys, values = make(shape, 4, torch.float32, seed=12)
    args = [t.to(triton_device) for t in args]
    b, hq, _, length, _, g, nb, r = shape
    total = nb * g + r
    mask = torch.rand(b, hq, length, total, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[1, 2, 0] = False
    mask = mask.to(triton_device)
    for m in (mask, mask[:1, :1], None):
        want = ops.kv_decode_attention(*args, m, 4, g, 0.25, backend="reference").cpu()
        got = ops.kv_decode_attention(*args, m, 4, g, 0.25, backend="triton").cpu()
        bound = kv_attention_bound(args[0].cpu(), keys, values, None if m is None else m.cpu(), 0.25, want)
        assert bool(((got.double() - want.double()).abs() <= bound).all())
    got = ops.kv_decode_attention(*args, mask, 4, g, 0.25, backend="triton")
    assert torch.equal(got[1, 2, 0], torch.zeros_like(got[1, 2, 0]))  # a query that sees nothing
    # The registered Triton op's schema (the interpreter runs kernels on real data only: fake-tensor
    # checks of the Triton op run on GPUs).
    triton_op = ops.op("kv_decode_attention", "triton", triton_device)
    utils = ("test_schema", "test_autograd_registration") + (("test_faketensor",) if triton_device == "cuda" else ())
    torch.library.opcheck(triton_op, (*args, mask, 4, g, 0.25), test_utils=utils)


@pytest.mark.parametrize("shape,group", [((1, 2, 16, 8), 8), ((2, 1, 12, 12), 4), ((1, 1, 16, 48), 16)], ids=param_id)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_triton_quantize_is_bit_exact_with_the_reference(shape, group, bits, dtype, triton_device):
    if group % (8 // bits):
        pytest.skip("the group must hold whole bytes of codes")
    gen = torch.Generator().manual_seed(sum(shape) + bits)
    keys = (torch.randn(shape, generator=gen) * torch.linspace(0.1, 8, shape[-1]) + 0.3).to(dtype)
    values = torch.randn(shape, generator=gen).to(dtype)
    got = ops.kv_quantize(keys.to(triton_device), values.to(triton_device), bits, group, backend="triton")
    want = ops.kv_quantize(keys, values, bits, group, backend="reference")
    for name, a, b in zip(("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"), got, want):
        assert a.device.type == triton_device and a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(_as_bits(a.cpu()), _as_bits(b)), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=param_id)
def test_triton_quantize_edges(dtype, triton_device):
    """Constant groups, negative zeros, subnormals, a range near the dtype's largest value, and a
    non-contiguous input: every byte as the reference's. (Triton's interpreter converts bfloat16
    subnormals to fp32 wrongly, so on CPU tensors the bfloat16 case
    scales its tiny values up until their scales and differences are normal.)"""
    info = torch.finfo(dtype)
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(1, 4, 16, 8, generator=g)
    keys[0, 0] = 0.375
    keys[0, 1] = torch.tensor(-0.0)
    interpreted_bf16 = dtype == torch.bfloat16 and triton_device == "cpu"
    keys[0, 2] = torch.randn(16, 8, generator=g) * info.smallest_normal * (2 ** 10 if interpreted_bf16 else 1)
    keys[0, 3] = torch.linspace(-info.max * 0.45, info.max * 0.45, 128).reshape(16, 8)
    keys = keys.to(dtype)
    values = keys.transpose(1, 2).contiguous().transpose(1, 2).flip(-1)  # [1, 4, 16, 8], strided
    for bits in (2, 4, 8):
        got = ops.kv_quantize(keys.to(triton_device), values.to(triton_device), bits, 8, backend="triton")
        want = ops.kv_quantize(keys, values, bits, 8, backend="reference")
        for a, b in zip(got, want):
            assert torch.equal(_as_bits(a.cpu()), _as_bits(b))


def test_triton_quantize_checks_and_schema(triton_device):
    k = torch.randn(1, 2, 16, 8, device=triton_device)
    with pytest.raises(ValueError, match="tokens"):
        ops.kv_quantize(k[:, :, :12], k[:, :, :12], 4, 8, backend="triton")
    with pytest.raises(ValueError, match="bits"):
        ops.kv_quantize(k, k, 3, 8, backend="triton")
    empty = ops.kv_quantize(k[:, :, :0], k[:, :, :0], 4, 8, backend="triton")
    assert [tuple(t.shape) for t in empty] == [(1, 2, 0, 8, 4), (1, 2, 0, 8), (1, 2, 0, 8), (1, 2, 0, 4), (1, 2, 0, 1),
                                               (1, 2, 0, 1)]
    triton_op = ops.op("kv_quantize", "triton", triton_device)
    utils = ("test_schema", "test_autograd_registration") + (("test_faketensor",) if triton_device == "cuda" else ())
    torch.library.opcheck(triton_op, (k.bfloat16(), k.bfloat16() * 2, 4, 8), test_utils=utils)
