"""Bit packing throughput on every backend that runs on the device, against a torch copy of the
unpacked tensor."""

import pytest
import torch

import lowbit
from harness import Case, measure

BACKENDS = ("baseline", "reference", "cpu", "triton", "cuda")


def _shapes(quick: bool):
    return [(64, 512)] if quick else [(4096, 4096), (32, 1 << 20)]


@pytest.mark.parametrize("bits", (2, 4, 8), ids=lambda b: f"bits{b}")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ("pack_bits", "unpack_bits"))
@pytest.mark.parametrize("shape_index", (0, 1), ids=("shape0", "shape1"))
def test_bitpack(benchmark, device, quick, op, backend, bits, shape_index):
    shapes = _shapes(quick)
    if shape_index >= len(shapes):
        pytest.skip("quick mode runs one shape")
    rows, n = shapes[shape_index]
    if backend != "baseline":
        why = lowbit.backend.why_unavailable(backend, device)
        if why is not None:
            pytest.skip(why)
        if backend == "triton" and device.type == "cpu":
            pytest.skip("Triton's interpreter is for correctness, not speed")
    values = torch.randint(0, 1 << bits, (rows, n), dtype=torch.uint8, device=device)
    packed = lowbit.ops.pack_bits(values, bits, backend="reference")
    if op == "pack_bits":
        fn, weights = (lambda v: lowbit.ops.pack_bits(v, bits, backend=backend)), (values,)
    else:
        fn, weights = (lambda p: lowbit.ops.unpack_bits(p, bits, n, backend=backend)), (packed,)
    if backend == "baseline":
        # torch's dense op on the unpacked tensor: a copy of it, the bandwidth bound of both ops
        fn, weights = torch.clone, (values,)
        moved = 2 * values.numel()
    else:
        moved = values.numel() + packed.numel()
    case = Case(
        op=op, case=f"{op} bits={bits} {rows}x{n}", backend=backend,
        shapes={"values": [rows, n], "packed": list(packed.shape)}, dtype="uint8",
        bytes_moved=moved, extra={"bits": bits},
    )
    measure(benchmark, case, fn, device, weights=weights, rounds=5 if quick else 20)
