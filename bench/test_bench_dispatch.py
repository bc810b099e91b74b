"""What lowbit adds to every call: the public op against the registered op it resolves to, and a
module's batch-1 forward of a small layer against ``nn.Linear`` (where the kernel's work is tiny,
so what remains is dispatch). Timed interleaved, one call per round, medians.

Targets: a public op at most 10 µs above its registered op; ``Int8Linear`` / ``DFloatLinear``
forward of a 64 x 64 layer at batch 1 at most 3x ``nn.Linear``'s.
"""

import pytest
import torch
from torch import nn

import harness
import lowbit
from harness import Case, measure_interleaved


def _case(op: str, case: str, backend: str, shapes: dict, dtype: str) -> Case:
    return Case(op=op, case=case, backend=backend, shapes=shapes, dtype=dtype, bytes_moved=0)


def test_public_op_overhead(benchmark, device, quick):
    values = torch.randint(0, 4, (3, 11), dtype=torch.uint8, device=device)
    registered = lowbit.ops.op("pack_bits", None, device)
    case = "pack_bits 3x11 bits=2"
    records = measure_interleaved(benchmark, [
        (_case("pack_bits", case, "baseline", {"values": [3, 11]}, "uint8"), lambda: registered(values, 2)),
        (_case("pack_bits", case, "public", {"values": [3, 11]}, "uint8"), lambda: lowbit.ops.pack_bits(values, 2)),
    ], device, rounds=200 if quick else 3000)
    base, public = (r["median_s"] for r in records)
    harness.FACTS.append({"fact": "public_op_overhead_us", "op": "pack_bits", "registered": str(registered),
                          "registered_us": base * 1e6, "public_us": public * 1e6,
                          "overhead_us": (public - base) * 1e6, "target_us": 10.0})


@pytest.mark.parametrize("module", ["Int8Linear", "DFloatLinear"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=lambda d: str(d).removeprefix("torch."))
def test_module_batch1_overhead(benchmark, device, quick, module, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(64, 64).to(device=device, dtype=dtype)
    layer = getattr(lowbit.nn, module).from_linear(linear)
    x = torch.randn(1, 64, device=device, dtype=dtype)
    case = f"{module} 64x64 batch 1 {dtype}"
    shapes = {"x": [1, 64], "weight": [64, 64]}
    name = str(dtype).removeprefix("torch.")
    with torch.inference_mode():
        records = measure_interleaved(benchmark, [
            (_case(module, case, "baseline", shapes, name), lambda: linear(x)),
            (_case(module, case, "module", shapes, name), lambda: layer(x)),
        ], device, rounds=200 if quick else 3000)
    base, ours = (r["median_s"] for r in records)
    harness.FACTS.append({"fact": "module_batch1_ratio", "module": module, "dtype": name,
                          "nn_linear_us": base * 1e6, "module_us": ours * 1e6, "ratio": ours / base, "target": 3.0})
