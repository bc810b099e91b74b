"""The int8 ops on the CPU backend against the reference, and the op contract's checks."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lowbit
from lowbit import ops
from lowbit.reference import int8 as ref

from conftest import param_id, skip_unless_available



@pytest.fixture(autouse=True)
def _needs_cpu_kernels():
    skip_unless_available("cpu", "cpu")


DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DTYPE_IDS = ["bf16", "fp16", "fp32"]


def _layer(rows, k, n, dtype, static=(), seed=0, outliers=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k, generator=g) * 2).to(dtype)
    if outliers and rows and k > 9:
        x[rows // 2, 9] = 40.0
        x[:, 1] = -7.5  # a whole outlier column
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    idx = torch.tensor(static, dtype=torch.int32)
    wq, ws, kept = ref.quantize_weight(w, idx)
    mask = ref.static_mask(idx, k, "cpu").to(torch.uint8)
    return x, w, bias, idx, mask, wq, ws, kept


def _equal(a, b):
    if a.dtype == torch.int8:
        return torch.equal(a, b)
    return torch.equal(a.float().nan_to_num(7.0, 8.0, 9.0), b.float().nan_to_num(7.0, 8.0, 9.0))


def _close(y, r, dtype):
    """fp32 accumulation in another order (about 1e-5 relative), then one rounding to dtype (one
    unit in its last place)."""
    rtol = max(torch.finfo(dtype).eps, 1e-5)
    scale = r.float().nan_to_num(0, 0, 0).abs().max().item() if r.numel() else 0.0
    torch.testing.assert_close(y.float(), r.float(), rtol=rtol, atol=1e-5 * scale + 1e-6, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 16), (37, 300), (256, 1024), (0, 64), (5, 0)])
@pytest.mark.parametrize("static", [(), (0, 2, 31)], ids=["nostatic", "static"])
@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_prepass_matches_reference(dtype, shape, static, threshold):
    rows, k = shape
    static = tuple(c for c in static if c < k)
    x, _, _, idx, mask, *_ = _layer(rows, k, 8, dtype, static)
    got = ops.int8_prepass(x, mask, idx, threshold, backend="cpu")
    want = ref.prepass(x, mask, idx, threshold)
    for name, a, b in zip(("xq", "row_scale", "col_flags", "x_static"), got, want):
        assert _equal(a, b), name


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_prepass_of_special_values_matches_reference(dtype):
    """NaN, infinities, signed zeros, subnormals of the dtype and values on the threshold, scattered
    over full and partial 16-feature steps (the AVX-512 build runs 16 at a time), equal the
    reference bit for bit."""
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(7, 53, generator=g) * 3).to(dtype)
    tiny = torch.finfo(dtype).smallest_normal / 4
    specials = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, tiny, -tiny, 6.0, -6.0, 127.0]
    for i, value in enumerate(specials):
        x[i % 7, (i * 5) % 53] = value
    x[6] = tiny  # a row of subnormals only
    idx = torch.tensor([4, 50], dtype=torch.int32)
    mask = ref.static_mask(idx, 53, "cpu").to(torch.uint8)
    for threshold in (6.0, 0.0):
        got = ops.int8_prepass(x, mask, idx, threshold, backend="cpu")
        for name, a, b in zip(("xq", "row_scale", "col_flags", "x_static"), got, ref.prepass(x, mask, idx, threshold)):
            assert _equal(a, b), (name, threshold)


def test_prepass_rounds_half_to_even_at_fp32_steps():
    # 127 / absmax as one fp32 division, then rint: values that land on .5 go to the even side.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]])
    xq, scale, _, _ = ops.int8_prepass(x, torch.zeros(6, dtype=torch.uint8), torch.zeros(0, dtype=torch.int32), 0.0,
                                       backend="cpu")
    assert xq.tolist() == [[127, 0, 2, 2, 0, -2]]
    assert scale.item() == 1.0


def test_nan_and_inf_rows_stay_in_their_rows():
    x, w, bias, idx, mask, wq, ws, kept = _layer(6, 64, 10, torch.bfloat16, (3,))
    bad = x.clone()
    bad[1, 5] = float("nan")
    bad[4, 7] = float("inf")
    y_bad = ops.int8_linear(bad, wq, ws, mask, idx, kept, bias, 6.0, backend="cpu")
    y = ops.int8_linear(x, wq, ws, mask, idx, kept, bias, 6.0, backend="cpu")
    assert y_bad[1].isnan().all()  # like nn.Linear: a NaN input gives a NaN row
    assert not y_bad[4].isfinite().any()
    for r in (0, 2, 3, 5):
        assert torch.equal(y_bad[r], y[r])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 16, 8), (37, 300, 91), (300, 512, 129)])
@pytest.mark.parametrize("static", [(), (0, 2, 11)], ids=["nostatic", "static"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matmul_and_linear_match_reference(dtype, shape, static, bias):
    rows, k, n = shape
    x, _, b, idx, mask, wq, ws, kept = _layer(rows, k, n, dtype, static)
    b = b if bias else None
    pre = ref.prepass(x, mask, idx, 6.0)
    assert pre[2].any()  # the inputs hold outliers, so the 16-bit side product is exercised
    want = ref.matmul(x, *pre, wq, ws, kept, b, 6.0)
    _close(ops.int8_matmul(x, *pre, wq, ws, kept, b, 6.0, backend="cpu"), want, dtype)
    _close(ops.int8_linear(x, wq, ws, mask, idx, kept, b, 6.0, backend="cpu"), want, dtype)


def test_matmul_uses_every_term():
    """The reference's terms each change the result, so the comparisons above can fail."""
    x, _, b, idx, mask, wq, ws, kept = _layer(9, 64, 16, torch.float32, (3,))
    pre = ref.prepass(x, mask, idx, 6.0)
    y = ops.int8_matmul(x, *pre, wq, ws, kept, b, 6.0, backend="cpu")
    no_flags = ops.int8_matmul(x, pre[0], pre[1], torch.zeros_like(pre[2]), pre[3], wq, ws, kept, b, 6.0, backend="cpu")
    no_static = ops.int8_matmul(x, *pre, wq, ws, torch.zeros_like(kept), b, 6.0, backend="cpu")
    no_bias = ops.int8_matmul(x, *pre, wq, ws, kept, None, 6.0, backend="cpu")
    for other in (no_flags, no_static, no_bias):
        assert (other - y).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("static", [(), (4, 40)], ids=["nostatic", "static"])
def test_gemv_matches_reference(dtype, rows, static):
    # 203 input features: 25 steps of 8 and a tail of 3; 33 outputs: 8 tiles of 4 and a tail of 1.
    x, _, b, idx, mask, wq, ws, kept = _layer(rows, 203, 33, dtype, static)
    want = ref.gemv(x, wq, ws, idx, kept, b)
    got = ops.int8_gemv(x, wq, ws, idx, kept, b, backend="cpu")
    _close(got, want, dtype)


def test_weight_quantization_keeps_static_columns_exactly():
    w = torch.randn(8, 20, dtype=torch.bfloat16)
    w[:, 3] *= 100  # a column that would dominate the row scales
    idx = torch.tensor([3], dtype=torch.int32)
    q, scale, kept = ref.quantize_weight(w, idx)
    assert torch.equal(kept[:, 0], w[:, 3]) and (q[:, 3] == 0).all()
    assert torch.allclose(scale, w.float().masked_fill(torch.arange(20) == 3, 0).abs().amax(1) / 127)
    assert (q.abs() <= 127).all() and (q.abs().amax(1) == 127).all()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck(backend):
    x, _, b, idx, mask, wq, ws, kept = _layer(5, 32, 12, torch.bfloat16, (1,))
    pre = ops.int8_prepass(x, mask, idx, 6.0, backend=backend)
    torch.library.opcheck(ops.op("int8_prepass", backend, "cpu"), (x, mask, idx, 6.0))
    torch.library.opcheck(ops.op("int8_matmul", backend, "cpu"), (x, *pre, wq, ws, kept, b, 6.0))
    torch.library.opcheck(ops.op("int8_gemv", backend, "cpu"), (x, wq, ws, idx, kept, b))
    torch.library.opcheck(ops.op("int8_linear", backend, "cpu"), (x, wq, ws, mask, idx, kept, b, 6.0))


def test_checks_name_the_argument():
    x, _, b, idx, mask, wq, ws, kept = _layer(4, 32, 12, torch.bfloat16, (1,))
    with pytest.raises(TypeError, match="x must be"):
        ops.int8_prepass(x.to(torch.int32), mask, idx, 6.0)
    with pytest.raises(ValueError, match="static_mask"):
        ops.int8_prepass(x, mask[:-1], idx, 6.0)
    with pytest.raises(ValueError, match="weight must be int8"):
        ops.int8_linear(x, wq[:, :-1], ws, mask, idx, kept, b, 6.0)
    with pytest.raises(TypeError, match="weight_scale"):
        ops.int8_linear(x, wq, ws.double(), mask, idx, kept, b, 6.0)
    with pytest.raises(TypeError, match="bias"):
        ops.int8_gemv(x, wq, ws, idx, kept, b.float())
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.int8_gemv(x[None], wq, ws, idx, kept, b)


def test_auto_picks_cpu():
    assert lowbit.backend.resolve("int8_linear", None, torch.device("cpu")) == "cpu"
    assert lowbit.backend.resolve("int8_prepass", None, torch.device("cpu")) == "cpu"


def test_threshold_compares_in_fp32():
    # 6.09375 is 6.1 rounded to bf16: below 6.1 in fp32, so not an outlier.
    x = torch.tensor([[6.09375, 6.125, 1.0, -6.125]], dtype=torch.bfloat16)
    none = torch.zeros(4, dtype=torch.uint8), torch.zeros(0, dtype=torch.int32)
    for backend in ("reference", "cpu"):
        _, _, flags, _ = ops.int8_prepass(x, *none, 6.1, backend=backend)
        assert flags.tolist() == [0, 1, 0, 1], backend


def _gemm_paths():
    """The CPU int8 GEMM's paths this host can run (each is forced in turn)."""
    from lowbit.ops.int8 import GEMM_PATHS

    x = torch.zeros(1, 32, dtype=torch.int8)
    runs = []
    for path in GEMM_PATHS:
        try:
            torch.ops.lowbit._int8_gemm(x, x, path)
        except ValueError:
            continue
        runs.append(path)
    return runs


# (13, 8195, 21): two K blocks of the AVX2 kernel, a 1-row tile, a 5-column panel; (40, 64, 20): rows
# split across tasks (few panels); (6, 16, 8): one full 6-row tile; (9, 4133, 70): the packed kernel's
# 32-step transposes and their tail; (8, 37, 7) and (1, 97, 17): the few-rows kernel (<= 8 rows), its
# 16-feature steps and tail.
# AMX: (33, 4097, 129) a 16-row tail block, a 1-feature K tail, a 1-column panel; (64, 1100, 96) whole
# 32 x 32 blocks stored straight into acc after three K chunks; (70, 2048, 1030) three blocks of panels
# (tasks), the last panel 6 columns wide; (1, 97, 17) one row padded to a tile.
@pytest.mark.parametrize("shape", [(9, 80, 11), (1, 97, 17), (33, 4097, 129), (4, 1, 3), (7, 2, 9), (6, 16, 8),
                                   (13, 8195, 21), (40, 64, 20), (9, 4133, 70), (8, 37, 7), (64, 1100, 96),
                                   (70, 2048, 1030)], ids=param_id)
@pytest.mark.parametrize("worst", [False, True], ids=["random", "all127"])
def test_cpu_gemm_paths_are_exact_and_repack_a_modified_weight(worst, shape):
    """Every CPU GEMM path this host runs (lowbit's AMX kernel, oneDNN where exact here, lowbit's
    AVX2 kernel, torch._int_mm) gives the exact product, also for the all-127 worst case that saturates int16
    pair sums in oneDNN on AVX2 hosts without VNNI; a weight changed in place is packed again."""
    skip_unless_available("cpu", "cpu")
    m, k, n = shape
    g = torch.Generator().manual_seed(3)
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    if worst:
        xq.fill_(127)
        w[: (n + 1) // 2] = 127
        w[(n + 1) // 2:] = -127
    paths = _gemm_paths()
    assert "int_mm" in paths and ("avx2" in paths) == _host_isas()["avx2"]
    assert "amx" not in paths or _host_isas()["amx"]
    def check(path):
        got, want = torch.ops.lowbit._int8_gemm(xq, w, path).double(), xq.double() @ w.double().T
        if got.dtype == torch.float64 and torch.ops.lowbit._int8_gemm(xq[:1], w, path).dtype == torch.float32:
            # oneDNN returns fp32 (u8 inputs with a zero point, compensated in fp32): exact below 2^24,
            # within an fp32 rounding or two above
            assert ((got - want).abs() <= want.abs() * 2**-22).all(), path
        else:
            assert torch.equal(got, want), path

    for path in ["auto", *paths]:
        check(path)
        w[0, 0] = -w[0, 0] - 1 if w[0, 0] != 127 else 5  # in place: the packed copy must not be reused
        check(path)


def test_cpu_gemm_refuses_an_unknown_path():
    skip_unless_available("cpu", "cpu")
    x = torch.zeros(1, 32, dtype=torch.int8)
    with pytest.raises(ValueError, match="path must be one of auto, amx, onednn, avx2, int_mm"):
        torch.ops.lowbit._int8_gemm(x, x, "fast")


@pytest.mark.parametrize("path", ["int_mm", "avx2", "onednn", "amx"])
def test_int8_linear_on_every_forced_gemm_path(path):
    """Int8Linear's CPU kernel on each GEMM path, forced through LOWBIT_CPU_INT8_GEMM in a fresh
    process (the choice is read once), against the reference within the fp32 tolerance."""
    skip_unless_available("cpu", "cpu")
    if path not in _gemm_paths():
        pytest.skip(f"the {path} GEMM cannot run on this host")
    code = textwrap.dedent("""
        import torch, lowbit
        from lowbit.reference import int8 as ref
        g = torch.Generator().manual_seed(0)
        lin = torch.nn.Linear(97, 35).bfloat16()
        m = lowbit.nn.Int8Linear.from_linear(lin)
        x = (torch.randn(19, 97, generator=g) * 2).bfloat16()
        x[3, 7] = 40.0
        want = ref.linear(x, m.weight, m.weight_scale, m.static_mask, m.static_idx, m.static_weight, m.bias, 6.0)
        got = m(x)
        err = (got.float() - want.float()).abs().max().item()
        scale = want.float().abs().max().item()
        print("ERR", err / scale)
    """)
    env = {**os.environ, "LOWBIT_CPU_INT8_GEMM": path}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    # bf16 outputs of the same fp32 sums in another order: a few bf16 ulps of the largest output.
    assert float(result.stdout.split("ERR")[1]) < 4 * 2**-8


def _host_isas() -> dict:
    flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    avx2 = {"avx2", "fma", "f16c"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    return {"generic": True, "avx2": avx2, "avx512": avx512, "amx": avx512 and {"amx_tile", "amx_int8"} <= flags}


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_cpu_kernels_on_every_isa(isa):
    """The int8 CPU kernels (pre-pass, the decomposed product with its epilogue, the weight-only
    product) on each ISA build this host runs, forced through LOWBIT_CPU_ISA in a fresh process
    (read once), against the reference; an ISA the host lacks is refused by name."""
    skip_unless_available("cpu", "cpu")
    code = textwrap.dedent("""
        import torch
        from lowbit import ops
        from lowbit.reference import int8 as ref
        g = torch.Generator().manual_seed(0)
        for rows, k, n in [(1, 4101, 37), (4, 64, 5), (3, 7, 1), (19, 97, 35)]:
            w = torch.randn(n, k, generator=g).bfloat16()
            idx = torch.tensor([0], dtype=torch.int32)
            wq, ws, kept = ref.quantize_weight(w, idx)
            mask = ref.static_mask(idx, k, "cpu").to(torch.uint8)
            x = torch.randn(rows, k, generator=g).bfloat16()
            x[0, -1] = 40.0  # an outlier
            b = torch.randn(n, generator=g).bfloat16()
            pre, want_pre = ops.int8_prepass(x, mask, idx, 6.0, backend="cpu"), ref.prepass(x, mask, idx, 6.0)
            assert all(torch.equal(p, q) for p, q in zip(pre, want_pre)), "prepass"
            for name, got, want in [
                ("gemv", ops.int8_gemv(x, wq, ws, idx, kept, b, backend="cpu"), ref.gemv(x, wq, ws, idx, kept, b)),
                ("linear", ops.int8_linear(x, wq, ws, mask, idx, kept, b, 6.0, backend="cpu"),
                 ref.linear(x, wq, ws, mask, idx, kept, b, 6.0))]:
                print("ERR", name, ((got.float() - want.float()).abs().max() / want.float().abs().max()).item())
    """)
    env = {**os.environ, "LOWBIT_CPU_ISA": isa}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if not _host_isas()[isa]:
        assert result.returncode != 0 and f"LOWBIT_CPU_ISA={isa}, but this CPU has no {isa}" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    errors = [float(part.split()[1]) for part in result.stdout.split("ERR")[1:]]
    # bf16 outputs of fp32 sums in another order: a few bf16 ulps of the largest output.
    assert len(errors) == 8 and max(errors) < 4 * 2**-8, result.stdout


def test_cpu_isa_refuses_an_unknown_name():
    skip_unless_available("cpu", "cpu")
    code = "import torch, lowbit; from lowbit import ops; x = torch.zeros(1, 8); " \
           "ops.int8_gemv(x, torch.zeros(2, 8, dtype=torch.int8), torch.ones(2), torch.zeros(0, dtype=torch.int32), " \
           "torch.zeros(2, 0), None, backend='cpu')"
    env = {**os.environ, "LOWBIT_CPU_ISA": "fast"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "LOWBIT_CPU_ISA must be generic, avx2 or avx512, got 'fast'" in result.stderr


@pytest.mark.parametrize("threshold", [6.01, 1e-40, 1e-50, -1.0, float("nan"), float("inf")])
def test_unusual_thresholds_match_reference(threshold):
    row = [6.0, 6.015625, 0.0, -0.0, 1e-30, 5.99, 1.0, -7.0, 2.0, float("inf")]
    x = torch.tensor([row, row[::-1], [0.5] * 10], dtype=torch.float32)
    none = torch.zeros(10, dtype=torch.uint8), torch.zeros(0, dtype=torch.int32)
    got = ops.int8_prepass(x, *none, threshold, backend="cpu")
    for name, a, b in zip(("xq", "row_scale", "col_flags", "x_static"), got, ref.prepass(x, *none, threshold)):
        assert _equal(a, b), name


def test_native_ops_refuse_bad_arguments():
    x, _, b, idx, mask, wq, ws, kept = _layer(4, 32, 12, torch.bfloat16, (1,))
    with pytest.raises(ValueError, match="static_idx must hold columns"):
        torch.ops.lowbit.int8_prepass(x, mask, torch.tensor([32], dtype=torch.int32), 6.0)
    with pytest.raises(ValueError, match="static_idx must hold columns"):
        torch.ops.lowbit.int8_gemv(x, wq, ws, torch.tensor([-1], dtype=torch.int32), kept, b)
    pre = ops.int8_prepass(x, mask, idx, 6.0)
    acc = torch.zeros(4, 12, dtype=torch.int32)
    epilogue = torch.ops.lowbit._int8_epilogue
    with pytest.raises(ValueError, match="row_scale must have shape"):
        epilogue(acc[:3], pre[1], ws, None, None, pre[3], kept, b)
    with pytest.raises(TypeError, match="acc must be int32 or float32"):
        epilogue(acc.double(), pre[1], ws, None, None, pre[3], kept, b)
    with pytest.raises(ValueError, match="come together"):
        epilogue(acc, pre[1], ws, torch.zeros(4, 1), None, pre[3], kept, b)
    with pytest.raises(ValueError, match="dyn_w must have shape"):
        epilogue(acc, pre[1], ws, torch.zeros(4, 1), torch.zeros(2, 12), pre[3], kept, b)


def test_cpu_matmul_follows_changing_outlier_columns():
    x, _, b, idx, mask, wq, ws, kept = _layer(6, 64, 10, torch.float32, (), outliers=False)
    for col in (3, 40, 3):  # the kept weight columns must follow the flagged ones
        xc = x.clone()
        xc[2, col] = 30.0
        pre = ref.prepass(xc, mask, idx, 6.0)
        want = ref.matmul(xc, *pre, wq, ws, kept, b, 6.0)
        _close(ops.int8_matmul(xc, *pre, wq, ws, kept, b, 6.0, backend="cpu"), want, torch.float32)


_FUSED_CASES = """
import sys, torch
from lowbit import ops
from lowbit.reference import int8 as ref
g = torch.Generator().manual_seed(7)
out = []
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for rows, k, n, static in [(1, 300, 70, 0), (33, 4097, 129, 2), (64, 1100, 96, 0), (70, 2048, 1030, 3)]:
        w = torch.randn(n, k, generator=g).to(dtype)
        idx = torch.arange(static, dtype=torch.int32) * 5
        wq, ws, kept = ref.quantize_weight(w, idx)
        mask = ref.static_mask(idx, k, "cpu").to(torch.uint8)
        x = torch.randn(rows, k, generator=g).to(dtype)
        x[0, -1], x[-1, 3] = 40.0, -25.0  # outliers
        b = torch.randn(n, generator=g).to(dtype)
        out.append(ops.int8_linear(x, wq, ws, mask, idx, kept, b, 6.0, backend="cpu"))
        out.append(ops.int8_linear(x, wq, ws, mask, idx, kept, None, 0.0, backend="cpu"))
torch.save(out, sys.argv[1])
"""


def test_amx_gemm_with_its_fused_epilogue_gives_the_bits_of_the_separate_one(tmp_path):
    """Where the int8 GEMM runs on AMX, its epilogue runs on each block as the GEMM finishes it;
    the outputs (outliers, static columns, bias, every dtype, odd shapes) equal bit for bit those
    of the exact int32 accumulator (torch._int_mm) followed by the separate epilogue."""
    skip_unless_available("cpu", "cpu")
    if "amx" not in _gemm_paths():
        pytest.skip("this host runs no AMX int8")
    outputs = {}
    for path in ("amx", "int_mm"):
        file = tmp_path / f"{path}.pt"
        env = {**os.environ, "LOWBIT_CPU_INT8_GEMM": path}
        result = subprocess.run([sys.executable, "-c", _FUSED_CASES, str(file)], env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        outputs[path] = torch.load(file)
    assert len(outputs["amx"]) == 24
    for fused, separate in zip(outputs["amx"], outputs["int_mm"]):
        assert fused.dtype == separate.dtype and torch.equal(fused, separate)
