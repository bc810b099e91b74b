"""Call each of lowbit's CUDA and Triton ops once on small inputs, for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/gpu_sanitize.py
    python scripts/gpu_sanitize.py --dry-run    # no GPU: build the inputs, run each call on the CPU

Inputs are built on the CPU and copied to the GPU, so few of torch's own kernels run under the
sanitizer. Each output is compared with the reference run on the CPU copies: bit for bit where the
op is exact, by relative error where its additions may be ordered differently. The dry run calls
the reference backend on CPU tensors in place of each GPU backend, which checks the table and the
inputs without a GPU. Exits 1 when a call raises or disagrees with the reference.

Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1: with torch's caching allocator a read past the end
of a tensor usually lands in the same cached block, where memcheck cannot see it.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from types import SimpleNamespace

import torch

import lowbit
from lowbit.dfloat import compress
from lowbit.int8.format import quantize_linear
from lowbit.reference import int8 as ref_int8

ops = lowbit.ops

# The calls: (label, GPU backends, exact, call(inputs, backend) -> a tensor or a tuple of tensors).
# Each goes through the public wrapper in lowbit.ops, so renaming the registered ops changes nothing
# here. "exact": outputs equal the reference bit for bit; else relative error under REL_TOL.
CALLS = [
    ("pack_bits 4b 5x97", ("cuda", "triton"), True, lambda i, b: ops.pack_bits(i.values4, 4, backend=b)),
    ("pack_bits 1b 3x1001", ("cuda", "triton"), True, lambda i, b: ops.pack_bits(i.values1, 1, backend=b)),
    ("unpack_bits 4b 5x97", ("cuda", "triton"), True, lambda i, b: ops.unpack_bits(i.packed4, 4, 97, backend=b)),
    ("unpack_bits 2b 7x33", ("cuda", "triton"), True, lambda i, b: ops.unpack_bits(i.packed2, 2, 33, backend=b)),
    ("dfloat_decode bf16 window 32x2", ("cuda", "triton"), True,
     lambda i, b: ops.dfloat_decode(*i.small.stream_args(), *i.small_tail, backend=b)),
    ("dfloat_decode fp32 window 256x128", ("cuda", "triton"), True,
     lambda i, b: ops.dfloat_decode(*i.wide.stream_args(), *i.wide_tail, backend=b)),
    ("dfloat_gemv bf16 97x300 B=3 bias", ("cuda", "triton"), False,
     lambda i, b: ops.dfloat_gemv(i.gemv_x, *i.gemv_w.stream_args(), *i.gemv_w_tail, i.gemv_bias, backend=b)),
    ("int8_prepass bf16 5x1025 S=3", ("cuda", "triton"), True,
     lambda i, b: ops.int8_prepass(i.x, i.static_mask, i.q.static_idx, 6.0, backend=b)),
    ("int8_gemv bf16 3x1025 -> 97 S=3 bias", ("cuda", "triton"), False,
     lambda i, b: ops.int8_gemv(i.x[:3], i.q.weight, i.q.weight_scale, i.q.static_idx, i.q.static_weight, i.bias,
                                backend=b)),
    ("int8_matmul bf16 5x1025 -> 97 S=3 bias", ("triton",), False,
     lambda i, b: ops.int8_matmul(i.x, *i.prepassed, i.q.weight, i.q.weight_scale, i.q.static_weight, i.bias, 6.0,
                                  backend=b)),
    ("codebook_matmul 2x8g8 3x1032 -> 97 bias", ("cuda", "triton"), False,
     lambda i, b: ops.codebook_matmul(i.cb_x[:3], *i.cb_2x8, i.bias, backend=b)),
    ("codebook_matmul 2x8g8 33x1032 -> 97 bias", ("cuda", "triton"), False,
     lambda i, b: ops.codebook_matmul(i.cb_x, *i.cb_2x8, i.bias, backend=b)),
    ("codebook_matmul 1x16g4 5x1032 -> 7", ("cuda", "triton"), False,
     lambda i, b: ops.codebook_matmul(i.cb_x[:5], *i.cb_1x16, None, backend=b)),
    ("codebook_matmul 1x16g4 33x1032 -> 7", ("cuda", "triton"), False,
     lambda i, b: ops.codebook_matmul(i.cb_x, *i.cb_1x16, None, backend=b)),
    ("kv_decode_attention 4b 9/3 heads of 48, 5 blocks of 16 + 7, masked", ("cuda", "triton"), False,
     lambda i, b: ops.kv_decode_attention(i.kv_q, *i.kv_packed, i.kv_mask, 4, 16, 0.125, backend=b)),
    ("kv_decode_attention 2b 4/4 heads of 32, 3 queries, residual only", ("cuda", "triton"), False,
     lambda i, b: ops.kv_decode_attention(i.kv_q3, *i.kv_residual_only, None, 2, 8, 0.2, backend=b)),
    ("kv_quantize 4b 2x3 heads of 48, 80 tokens, groups of 16", ("cuda", "triton"), True,
     lambda i, b: ops.kv_quantize(i.kv_k, i.kv_v, 4, 16, backend=b)),
    ("kv_quantize 2b 1x3 heads of 32, 24 tokens, groups of 8, views", ("cuda", "triton"), True,
     lambda i, b: ops.kv_quantize(i.kv_k[:1, :, :24, :32], i.kv_v[1:, :, 8:32, 16:], 2, 8, backend=b)),
]
REL_TOL = 1e-2  # bf16 outputs of the same fp32 sums in another order differ by a few eps at most


def build_inputs(device: torch.device) -> SimpleNamespace:
    """The same inputs on every call (fixed seeds), built on the CPU, then moved to ``device``."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0, dtype=torch.bfloat16):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    i = SimpleNamespace()
    i.values4 = torch.randint(0, 16, (5, 97), generator=g, dtype=torch.uint8)
    i.values1 = torch.randint(0, 2, (3, 1001), generator=g, dtype=torch.uint8)
    i.packed4 = ops.pack_bits(i.values4, 4, backend="reference")
    i.packed2 = ops.pack_bits(torch.randint(0, 4, (7, 33), generator=g, dtype=torch.uint8), 2, backend="reference")
    # Tiny windows give many blocks with few codes; the default ones one wide block.
    i.small = compress(randn(1025, scale=0.02), window_bits=32, windows_per_block=2)
    i.wide = compress(randn(4096 + 5, scale=0.02, dtype=torch.float32))
    i.gemv_w = compress(randn(97, 300, scale=0.02), window_bits=64, windows_per_block=4)
    i.gemv_x, i.gemv_bias = randn(3, 300), randn(97)
    # int8: x with about 5 % outliers at threshold 6, three static columns, a 97 x 1025 weight.
    i.x = randn(5, 1025, scale=3.0)
    static_idx = torch.tensor([0, 500, 1024], dtype=torch.int32)
    i.q = quantize_linear(randn(97, 1025, scale=0.02), static_idx)
    i.static_mask = ref_int8.static_mask(i.q.static_idx, 1025, "cpu").to(torch.uint8)
    i.bias = randn(97)
    i.prepassed = ops.int8_prepass(i.x, i.static_mask, i.q.static_idx, 6.0, backend="reference")
    # codebook: 1032 input features as 129 groups of 8 (two 8-bit fp16 codebooks, fp16 scales: x
    # and codebooks differ in dtype) or 258 of 4 (one 16-bit bf16 codebook, int16 codes over the
    # whole unsigned range, fp32 scales); 33 rows of x (3 and 5 take the GEMV).
    i.cb_x = randn(33, 1032)
    i.cb_2x8 = (torch.randint(0, 256, (97, 129, 2), generator=g, dtype=torch.uint8),
                randn(2, 256, 1, 8, scale=0.5, dtype=torch.float16),
                randn(97, 1, 1, 1, scale=0.05, dtype=torch.float16))
    i.cb_1x16 = (torch.randint(-32768, 32768, (7, 258, 1), generator=g, dtype=torch.int16),
                 randn(1, 65536, 1, 4, scale=0.5), randn(7, 1, 1, 1, scale=0.05, dtype=torch.float32))

    # kv: 2 rows of 9 query / 3 KV heads of 48 over 5 packed blocks of 16 tokens and a residual of 7,
    # a padding mask; and a cache with nothing packed yet. The states quantized are also quantized
    # alone, and as views (copied by the ops).
    i.kv_k, i.kv_v = randn(2, 3, 80, 48), randn(2, 3, 80, 48)
    i.kv_q = randn(2, 9, 1, 48)
    i.kv_packed = (*ops.kv_quantize(i.kv_k, i.kv_v, 4, 16, backend="reference"), randn(2, 3, 7, 48),
                   randn(2, 3, 7, 48))
    i.kv_mask = torch.ones(2, 1, 1, 87, dtype=torch.bool)
    i.kv_mask[0, :, :, :10] = False
    empty = ops.kv_quantize(randn(1, 4, 0, 32), randn(1, 4, 0, 32), 2, 8, backend="reference")
    i.kv_q3 = randn(1, 4, 3, 32)
    i.kv_residual_only = (*empty, randn(1, 4, 6, 32), randn(1, 4, 6, 32))

    moved = SimpleNamespace()
    for name, value in vars(i).items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
        elif isinstance(value, tuple):
            value = tuple(t.to(device) for t in value)
        elif hasattr(value, "stream_args"):
            value = value.to(device)
        else:  # Int8Weight
            value = type(value)(**{k: t.to(device) for k, t in vars(value).items()})
        setattr(moved, name, value)
    for name in ("small", "wide", "gemv_w"):
        d = getattr(moved, name)
        tail = (d.numel(), d.dtype) if name != "gemv_w" else (d.shape[0],)
        setattr(moved, f"{name}_tail", (*tail, d.total_bits, d.window_bits, d.windows_per_block))
    return moved


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def disagreement(got, want, exact: bool) -> str | None:
    """None when ``got`` matches ``want`` (CPU tensors), else what differs."""
    got, want = _as_tuple(got), _as_tuple(want)
    if len(got) != len(want):
        return f"{len(got)} outputs, expected {len(want)}"
    for k, (a, e) in enumerate(zip(got, want)):
        a = a.cpu()
        if a.dtype != e.dtype or a.shape != e.shape:
            return f"output {k}: {a.dtype} {list(a.shape)}, expected {e.dtype} {list(e.shape)}"
        if exact:
            view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
            if not torch.equal(a.contiguous().view(view), e.contiguous().view(view)):
                return f"output {k}: {int((a.view(view) != e.view(view)).sum())} of {a.numel()} elements differ"
        else:
            err = float((a.float() - e.float()).norm() / e.float().norm().clamp_min(1e-30))
            if not err <= REL_TOL:
                return f"output {k}: relative error {err:.3g} > {REL_TOL}"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="no GPU: run the calls on CPU tensors")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_sanitize: no CUDA device is visible (use --dry-run without one)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    cpu, gpu = build_inputs(torch.device("cpu")), build_inputs(device)
    runs = failures = 0
    for label, backends, exact, call in CALLS:
        for backend in ("reference",) if args.dry_run else backends:
            start = time.perf_counter()
            try:
                want = call(cpu, "reference")
                got = call(gpu, backend)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                problem = disagreement(got, want, exact)
            except Exception:  # noqa: BLE001 - every call is reported, then the next one runs
                problem = "raised\n" + traceback.format_exc()
            runs += 1
            failures += problem is not None
            status = "ok" if problem is None else f"FAILED: {problem}"
            print(f"{label:<40} {backend:<10} {time.perf_counter() - start:7.2f}s  {status}", flush=True)
    print(f"gpu_sanitize: {runs} calls, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
