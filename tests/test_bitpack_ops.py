"""lowbit::pack_bits / lowbit::unpack_bits on every backend, against the reference."""

import pytest
import torch
from torch.library import opcheck

import lowbit
from lowbit.reference import bitpack as ref

from conftest import skip_unless_available


def _opcheck_utils(backend: str, device) -> tuple[str, ...]:
    """opcheck's checks for a backend. Under Triton's interpreter (CPU tensors) a kernel reads real
    data, so AOT dispatch, which runs the kernel on fake tensors, is checked on GPUs only."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    return utils[:-1] if backend == "triton" and torch.device(device).type == "cpu" else utils


BITS = (1, 2, 4, 8)
SHAPES = [(1,), (7,), (97,), (3, 1025), (2, 3, 5), (1, 4099), (0,), (4, 0), (0, 9)]

def _values(shape, bits, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Full-byte values: bits above `bits` must be dropped, identically on every backend.
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device)


def test_reference_layout_by_hand():
    # 2-bit values 1, 2, 3, 0 | 1  -> byte 0 = 0b00_11_10_01, byte 1 = 0b01
    v = torch.tensor([1, 2, 3, 0, 1], dtype=torch.uint8)
    assert ref.pack_bits(v, 2).tolist() == [0b00111001, 0b01]
    # 4-bit: low nibble first
    assert ref.pack_bits(torch.tensor([0xA, 0x5, 0xF], dtype=torch.uint8), 4).tolist() == [0x5A, 0x0F]
    # 1-bit: bit i of the byte is value i
    bitsv = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1], dtype=torch.uint8)
    assert ref.pack_bits(bitsv, 1).tolist() == [0x81, 0x01]
    # Only the low bits are stored.
    assert ref.pack_bits(torch.tensor([0xFF, 0x04], dtype=torch.uint8), 2).tolist() == [0b0011]


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"bits{b}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pack_matches_reference(backend_device, bits, shape):
    backend, device = backend_device
    values = _values(shape, bits, device)
    expected = ref.pack_bits(values.cpu(), bits)
    packed = lowbit.ops.pack_bits(values, bits, backend=backend)
    assert packed.device.type == device
    assert packed.shape == expected.shape
    assert torch.equal(packed.cpu(), expected)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"bits{b}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_unpack_inverts_pack(backend_device, bits, shape):
    backend, device = backend_device
    values = _values(shape, bits, device, seed=1)
    packed = ref.pack_bits(values.cpu(), bits).to(device)
    unpacked = lowbit.ops.unpack_bits(packed, bits, shape[-1], backend=backend)
    assert torch.equal(unpacked.cpu(), values.cpu() & ((1 << bits) - 1))


@pytest.mark.parametrize("bits", (2, 4), ids=lambda b: f"bits{b}")
def test_non_contiguous_input(backend_device, bits):
    backend, device = backend_device
    base = _values((33, 20), bits, device, seed=2)
    view = base.t()  # [20, 33], strides (1, 20)
    assert not view.is_contiguous()
    packed = lowbit.ops.pack_bits(view, bits, backend=backend)
    assert torch.equal(packed.cpu(), ref.pack_bits(view.cpu().contiguous(), bits))
    strided_packed = torch.stack([packed, packed], dim=-1)[..., 0]
    assert not strided_packed.is_contiguous()
    unpacked = lowbit.ops.unpack_bits(strided_packed, bits, 33, backend=backend)
    assert torch.equal(unpacked.cpu(), view.cpu() & ((1 << bits) - 1))
    assert torch.equal(base, _values((33, 20), bits, device, seed=2)), "input was modified"


@pytest.mark.parametrize("op", ["pack", "unpack"])
def test_opcheck(backend_device, op):
    backend, device = backend_device
    values = _values((5, 19), 4, device, seed=3)
    if op == "pack":
        opcheck(lowbit.ops.op("pack_bits", backend, device), (values, 4), test_utils=_opcheck_utils(backend, device))
    else:
        packed = ref.pack_bits(values.cpu(), 4).to(device)
        opcheck(lowbit.ops.op("unpack_bits", backend, device), (packed, 4, 19), test_utils=_opcheck_utils(backend, device))


def test_opcheck_native_ops():
    skip_unless_available("cpu", "cpu")
    values = _values((6, 11), 2, "cpu")
    opcheck(torch.ops.lowbit.pack_bits.default, (values, 2))
    opcheck(torch.ops.lowbit.unpack_bits.default, (ref.pack_bits(values, 2), 2, 11))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def roundtrip(v):
        return lowbit.ops.unpack_bits(lowbit.ops.pack_bits(v, 2), 2, v.shape[-1]) + 1

    compiled = torch.compile(roundtrip, fullgraph=True)
    values = _values((8, 37), 2, "cpu", seed=4)
    assert torch.equal(compiled(values), (values & 3) + 1)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_bad_arguments_name_the_argument(backend):
    skip_unless_available(backend, "cpu")
    v = torch.zeros(4, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="bits must be one of"):
        lowbit.ops.pack_bits(v, 3, backend=backend)
    with pytest.raises(TypeError, match=r"values must be a uint8 tensor, got torch.int32"):
        lowbit.ops.pack_bits(v.int(), 4, backend=backend)
    with pytest.raises(ValueError, match="values must have at least one dimension"):
        lowbit.ops.pack_bits(torch.tensor(3, dtype=torch.uint8), 4, backend=backend)
    with pytest.raises(ValueError, match=r"packed has 8 bytes .* 8 values of 4 bits take 4"):
        lowbit.ops.unpack_bits(v, 4, 8, backend=backend)
    with pytest.raises(ValueError, match="n must be >= 0"):
        lowbit.ops.unpack_bits(v, 4, -1, backend=backend)


def test_native_op_checks_its_own_arguments():
    skip_unless_available("cpu", "cpu")
    with pytest.raises(ValueError, match="bits must be one of 1, 2, 4, 8, got 5"):
        torch.ops.lowbit.pack_bits(torch.zeros(3, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="packed has 3 bytes"):
        torch.ops.lowbit.unpack_bits(torch.zeros(3, dtype=torch.uint8), 2, 4)
