"""The codebook family's CPU ops (csrc/cpu/codebook.cpp, csrc/bindings/codebook.cpp) against the
reference (lowbit.reference.codebook): the product on every path (FMAs, lookup tables, AVX512-BF16
dot products, AMX tiles, decoded tiles into the dense GEMM; each forced on each ISA build) within the derived bound of
helpers.codebook_bound, the dequantization bit for bit, the encoder's nearest-codeword search, every
ISA build the host runs, and the argument checks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.library import opcheck

from lowbit import ops
from lowbit.reference import codebook as ref

from conftest import param_id, skip_unless_available
from helpers import assert_bits_equal, codebook_bound

CONFIGS = [(2, 8, 8), (1, 8, 8), (1, 16, 8), (2, 8, 4), (1, 8, 4), (2, 16, 4)]  # (codebooks, bits, group)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(autouse=True)
def _native():
    skip_unless_available("cpu", "cpu")


def layer(out, groups, config, codebook_dtype=torch.float16, seed=0):
    """Random codes (the whole code range), codebooks and scales of one configuration."""
    count, bits, g = config
    gen = torch.Generator().manual_seed(seed)
    if bits == 8:
        codes = torch.randint(0, 256, (out, groups, count), generator=gen, dtype=torch.uint8)
    else:
        codes = torch.randint(-32768, 32768, (out, groups, count), generator=gen, dtype=torch.int32).to(torch.int16)
    books = (torch.randn(count, 1 << bits, 1, g, generator=gen) * 0.5).to(codebook_dtype)
    scales = (torch.rand(out, 1, 1, 1, generator=gen) + 0.5).to(codebook_dtype)
    return codes, books, scales


def check_product(x, codes, books, scales, bias, backend="cpu"):
    got = ops.codebook_matmul(x, codes, books, scales, bias, backend=backend)
    want = ref.matmul(x, codes, books, scales, bias)
    assert got.dtype == x.dtype and got.shape == want.shape
    bound = codebook_bound(x, codes, books, scales, bias, want)
    diff = (got.double() - want.double()).abs()
    assert bool((diff <= bound).all()), f"max excess {(diff - bound).max().item():.3g}"
    return got


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "%dx%d-g%d" % c)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 17, 32, 33, 300])
def test_matmul_matches_reference(config, dtype, rows):
    groups = 3 if config[1] == 16 else 33
    codes, books, scales = layer(97, groups, config)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, groups * config[2], generator=g).to(dtype)
    bias = torch.randn(97, generator=g).to(dtype)
    check_product(x, codes, books, scales, bias)
    check_product(x, codes, books, scales, None)


@pytest.mark.parametrize("shape", [(1, 1), (7, 1), (300, 2), (1, 129), (513, 64)], ids=param_id)
@pytest.mark.parametrize("rows", [1, 2, 65])
def test_matmul_odd_shapes_and_bf16_codebooks(shape, rows):
    out, groups = shape
    codes, books, scales = layer(out, groups, (2, 8, 8), torch.bfloat16)
    x = torch.randn(rows, groups * 8, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    check_product(x, codes, books, scales, None)


def test_matmul_noncontiguous_input_and_empty_batches():
    codes, books, scales = layer(33, 16, (2, 8, 8))
    x = torch.randn(128, 6, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).T  # [6, 128] strided
    assert not x.is_contiguous()
    check_product(x, codes, books, scales, None)
    check_product(x[:, ::1].contiguous()[:0], codes, books, scales, None)
    assert ops.codebook_matmul(x[:0], codes, books, scales, backend="cpu").shape == (0, 33)


def test_bound_catches_a_dropped_codebook_and_a_missed_scale():
    """The tolerance is tight enough to see a kernel that forgot a codebook or a row's scale."""
    codes, books, scales = layer(64, 32, (2, 8, 8), torch.float32)
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(4))
    want = ref.matmul(x, codes, books, scales, None)
    bound = codebook_bound(x, codes, books, scales, None, want)
    dropped = books.clone()
    dropped[1] = 0
    for wrong in (ref.matmul(x, codes, dropped, scales, None), ref.matmul(x, codes, books, scales * 1.001, None)):
        assert bool(((wrong.double() - want.double()).abs() > bound).any())


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "%dx%d-g%d" % c)
@pytest.mark.parametrize("dtype", DTYPES, ids=param_id)
def test_dequantize_is_bit_exact(config, dtype):
    codes, books, scales = layer(37, 5, config, torch.bfloat16 if dtype == torch.float16 else torch.float16)
    got = ops.codebook_dequantize(codes, books, scales, dtype, backend="cpu")
    assert_bits_equal(got, ref.dequantize(codes, books, scales).to(dtype), "dequantize")


def test_sixteen_bit_codes_are_unsigned():
    """AQLM's int16 codes: -1 names entry 65535, -32768 entry 32768."""
    codes, books, scales = layer(2, 1, (1, 16, 8), torch.float32)
    codes[0, 0, 0], codes[1, 0, 0] = -1, -32768
    w = ops.codebook_dequantize(codes, books, scales, torch.float32, backend="cpu")
    assert torch.equal(w[0], books[0, 65535, 0] * scales[0, 0, 0, 0])
    assert torch.equal(w[1], books[0, 32768, 0] * scales[1, 0, 0, 0])


# -- the encoder's search ---------------------------------------------------------------------
def _distances(points, weights, book):
    w = torch.ones_like(points) if weights is None else weights
    return (w.double()[:, None, :] * (points.double()[:, None, :] - book.double()[None]).square()).sum(-1)


@pytest.mark.parametrize("entries", [1, 7, 256, 1500])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("g", [4, 8])
def test_nearest_finds_the_least_weighted_distance(entries, weighted, g):
    gen = torch.Generator().manual_seed(5)
    points, book = torch.randn(333, g, generator=gen), torch.randn(entries, g, generator=gen)
    weights = torch.rand(333, g, generator=gen) if weighted else None
    got = ops.codebook_nearest(points, book, weights, backend="cpu")
    assert got.dtype == torch.int32 and got.shape == (333,)
    d = _distances(points, weights, book)
    best = d.min(1).values
    # fp32 evaluation: within a few fp32 roundings of the least distance.
    chosen = d.gather(1, got.long()[:, None])[:, 0]
    assert bool((chosen <= best * (1 + 64 * torch.finfo(torch.float32).eps) + 1e-30).all())
    assert (got == ref.nearest(points, weights, book)).float().mean() > 0.99


def test_nearest_breaks_ties_toward_the_lower_index_and_handles_many_entries():
    book = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 0]]).repeat(300, 1)
    points = torch.tensor([[1.0, 0, 0, 0], [0.1, 0, 0, 0], [0.9, 0, 0, 0]])
    assert ops.codebook_nearest(points, book, backend="cpu").tolist() == [0, 1, 0]
    big = torch.randn(65536, 8, generator=torch.Generator().manual_seed(6))
    pick = torch.tensor([0, 1023, 1024, 40000, 65535])
    assert ops.codebook_nearest(big[pick].clone(), big, backend="cpu").tolist() == pick.tolist()


def test_nearest_with_non_finite_inputs_chooses_as_the_reference():
    """A NaN distance (a NaN point or weight, inf against inf) is the minimum, the first one, as
    torch.argmin makes it; nothing reads out of range."""
    gen = torch.Generator().manual_seed(8)
    points, book = torch.randn(40, 8, generator=gen), torch.randn(2000, 8, generator=gen)
    points[3, 2] = float("nan")
    points[7, 0] = float("inf")
    book[1500, 0] = float("inf")
    weights = torch.rand(40, 8, generator=gen)
    weights[11, 5] = float("nan")
    for w in (None, weights):
        assert torch.equal(ops.codebook_nearest(points, book, w, backend="cpu"), ref.nearest(points, w, book))


# -- every ISA build, opcheck, argument checks ------------------------------------------------
def _host_isas():
    flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    avx2 = {"avx2", "fma", "f16c"} <= flags
    return {"generic": True, "avx2": avx2, "avx512": avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags}


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_cpu_kernels_on_every_isa(isa):
    """Each ISA build of the kernels (forced through LOWBIT_CPU_ISA in a fresh process, read once)
    gives the same results as the host's own: the lookup tables, the decoded tiles, the search."""
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, "tests")
        from lowbit import ops
        from lowbit.reference import codebook as ref
        from helpers import codebook_bound
        from test_codebook_ops import layer
        for config, rows in [((2, 8, 8), 1), ((2, 8, 8), 3), ((1, 8, 4), 2), ((2, 8, 8), 40), ((1, 16, 8), 5)]:
            codes, books, scales = layer(67, 3 if config[1] == 16 else 40, config)
            x = torch.randn(rows, codes.shape[1] * config[2], generator=torch.Generator().manual_seed(7))
            for dtype in (torch.bfloat16, torch.float32):
                got = ops.codebook_matmul(x.to(dtype), codes, books, scales, backend="cpu")
                want = ref.matmul(x.to(dtype), codes, books, scales, None)
                bound = codebook_bound(x.to(dtype), codes, books, scales, None, want)
                assert bool(((got.double() - want.double()).abs() <= bound).all()), (config, rows, dtype)
            w = ops.codebook_dequantize(codes, books, scales, torch.bfloat16, backend="cpu")
            assert torch.equal(w, ref.dequantize(codes, books, scales).bfloat16()), config
        p, b = torch.randn(100, 8), torch.randn(300, 8)
        print("NEAREST", (ops.codebook_nearest(p, b, backend="cpu") == ref.nearest(p, None, b)).float().mean().item())
    """)
    env = {**os.environ, "LOWBIT_CPU_ISA": isa}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not _host_isas()[isa]:
        assert result.returncode != 0 and f"LOWBIT_CPU_ISA={isa}, but this CPU has no {isa}" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.split("NEAREST")[1]) > 0.99


def _host_has(*flags):
    have = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    return set(flags) <= have


PRODUCT_PATHS = {  # path: whether this host runs it (else forcing it must raise)
    "fma": True, "lut": True, "tiled": True, "auto": True,
    "dot": _host_has("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"),
    "amx": _host_has("amx_tile", "amx_bf16"),
}


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
@pytest.mark.parametrize("path", sorted(PRODUCT_PATHS))
def test_every_product_path(path, isa):
    """Each path of the CPU product (forced through LOWBIT_CPU_CODEBOOK in a fresh process, read
    once) on each ISA build: every configuration it takes, rows at its edges, odd shapes, bias, and a
    layer large enough for the decode table (the AMX and dot kernels read W through it from
    2^20 groups on, summing the fp32 codebooks below) stays within the derived bound. A path the host
    or the input cannot run raises, naming the variable."""
    if not _host_isas()[isa]:
        pytest.skip(f"this CPU has no {isa}")
    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, "tests")
        from lowbit import ops
        from lowbit.reference import codebook as ref
        from helpers import codebook_bound
        from test_codebook_ops import CONFIGS, layer
        path = sys.argv[1]
        bf16_only = path in ("dot", "amx")
        most = {"dot": 4, "lut": 4}.get(path, 70)
        cases = [(config, out, groups, rows) for config in CONFIGS for (out, groups) in [(37, 5), (9, 40)]
                 for rows in (1, 2, 3, 4, 5, 9, 33, 70)]
        cases += [((2, 8, 8), 2048, 512, rows) for rows in (1, 4, 5)]  # 2^20 groups: with the table
        done = 0
        for config, out, groups, rows in cases:
            if config[1] == 16:
                groups = min(groups, 3)
            if rows > most or (path == "lut" and config[1] == 16) or (bf16_only and config == (2, 16, 4)):
                continue
            codes, books, scales = layer(out, groups, config)
            gen = torch.Generator().manual_seed(rows)
            x = torch.randn(rows, groups * config[2], generator=gen)
            bias = torch.randn(out, generator=gen)
            for dtype in ((torch.bfloat16,) if bf16_only else (torch.bfloat16, torch.float16, torch.float32)):
                b = bias.to(dtype) if rows % 2 else None
                got = ops.codebook_matmul(x.to(dtype), codes, books, scales, b, backend="cpu")
                want = ref.matmul(x.to(dtype), codes, books, scales, b)
                bound = codebook_bound(x.to(dtype), codes, books, scales, b, want)
                assert got.dtype == dtype
                assert bool(((got.double() - want.double()).abs() <= bound).all()), (config, out, groups, rows, dtype)
                done += 1
        # What the path cannot take raises, naming the variable.
        codes, books, scales = layer(8, 3, (1, 16, 8))
        refused = 0
        for x in (torch.randn(5, 24), torch.randn(1, 24).to(torch.float16)):
            try:
                ops.codebook_matmul(x, codes, books, scales, backend="cpu")
            except ValueError as e:
                assert "LOWBIT_CPU_CODEBOOK=" + path in str(e), e
                refused += 1
        print("DONE", done, "REFUSED", refused)
    """)
    env = {**os.environ, "LOWBIT_CPU_ISA": isa, "LOWBIT_CPU_CODEBOOK": path}
    result = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True, text=True, timeout=600,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not PRODUCT_PATHS[path] or (path in ("dot", "amx") and isa != "avx512"):  # kernels of the AVX-512 build
        assert result.returncode != 0 and f"LOWBIT_CPU_CODEBOOK={path} needs" in result.stderr, result.stderr[-2000:]
        return
    assert result.returncode == 0, result.stderr[-3000:]
    done, refused = (int(v) for v in result.stdout.split()[1::2])
    assert done > 0
    # lut refuses 16-bit codes, dot and amx fp32 and fp16 x; the others take everything.
    assert refused == {"lut": 2, "dot": 2, "amx": 2}.get(path, 0)


def test_opcheck():
    codes, books, scales = layer(9, 4, (2, 8, 8))
    x = torch.randn(3, 32).bfloat16()
    bias = torch.randn(9).bfloat16()
    for rows in (x[:2], x):
        opcheck(torch.ops.lowbit.codebook_matmul.default, (rows, codes, books, scales, bias))
    opcheck(torch.ops.lowbit.codebook_dequantize.default, (codes, books, scales, torch.bfloat16))
    opcheck(torch.ops.lowbit._codebook_nearest.default, (torch.randn(5, 8), None, torch.randn(3, 8)))


BAD = {
    "codes dtype": (lambda c, b, s: (c.float(), b, s), TypeError, "codes must be uint8"),
    "codes rank": (lambda c, b, s: (c[:, :, 0], b, s), ValueError, "codes must be 3-D"),
    "three codebooks": (lambda c, b, s: (c.repeat(1, 1, 2)[:, :, :3], b, s), ValueError, "num_codebooks"),
    "entries": (lambda c, b, s: (c, b[:, :128], s), ValueError, "codebooks must have shape"),
    "group size": (lambda c, b, s: (c, torch.zeros(2, 256, 1, 5), s), ValueError, "group_size"),
    "out group": (lambda c, b, s: (c, b.reshape(2, 256, 2, 4), s), ValueError, "out_group_size"),
    "codebook dtype": (lambda c, b, s: (c, b.double(), s), TypeError, "codebooks must be"),
    "scales shape": (lambda c, b, s: (c, b, s[:-1]), ValueError, "scales must have shape"),
    "16-bit codes, 8-bit book": (lambda c, b, s: (c.to(torch.int16), b, s), ValueError, "65536"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_weights_are_refused_naming_the_argument(case, backend):
    codes, books, scales = layer(6, 4, (2, 8, 8))
    make, error, words = BAD[case]
    c, b, s = make(codes, books, scales)
    with pytest.raises(error, match=words):
        ops.codebook_matmul(torch.zeros(2, 32), c, b, s, backend=backend)
    with pytest.raises(error, match=words):
        ops.codebook_dequantize(c, b, s, backend=backend)


def test_bad_inputs_are_refused_naming_the_argument():
    codes, books, scales = layer(6, 4, (2, 8, 8))
    with pytest.raises(ValueError, match="x's last dimension must be in_groups"):
        ops.codebook_matmul(torch.zeros(2, 31), codes, books, scales)
    with pytest.raises(TypeError, match="x must be bfloat16"):
        ops.codebook_matmul(torch.zeros(2, 32, dtype=torch.float64), codes, books, scales)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.codebook_matmul(torch.zeros(2, 32), codes, books, scales, torch.zeros(5))
    with pytest.raises(TypeError, match="bias must be"):
        ops.codebook_matmul(torch.zeros(2, 32), codes, books, scales, torch.zeros(6, dtype=torch.bfloat16))
    # The native op's own checks, without the Python ones in front.
    with pytest.raises(ValueError, match="x's last dimension"):
        torch.ops.lowbit.codebook_matmul(torch.zeros(2, 31), codes, books, scales, None)
    with pytest.raises(ValueError, match="codebook must have 1 to 65536 entries"):
        ops.codebook_nearest(torch.zeros(2, 8), torch.zeros(0, 8))
    with pytest.raises(ValueError, match="weights must be"):
        ops.codebook_nearest(torch.zeros(2, 8), torch.zeros(3, 8), torch.zeros(2, 4))
