"""The op contract: the schema and fake (meta) implementation of every lowbit kernel.

Each public op ``lowbit::<name>`` takes a trailing ``str backend`` argument and is registered for
the CPU and CUDA dispatch keys with one router, which picks the implementation under the rule in
``lowbit.backend`` and runs it. Implementations per backend:

- ``reference``: ``lowbit.reference.<family>`` (plain PyTorch, the spec);
- ``triton``: ``lowbit.triton_kernels.<family>``, imported on first use;
- ``cpu`` / ``cuda``: the private op ``lowbit::_<name>_native``, whose schema is defined here and
  whose kernels ``lowbit._C`` registers per device (csrc/bindings.cpp, csrc/bindings_cuda.cpp).

Argument checks run in the router and in the fake, so every backend, eager or traced by
``torch.compile``, refuses bad input with the same message. The module-level functions are the
Python API: ``lowbit.ops.pack_bits(values, bits, backend=None)``.
"""

from __future__ import annotations

import importlib
import inspect

import torch

from lowbit import _native, backend as _backend
from lowbit.errors import FormatError
from lowbit.reference import bitpack as _ref_bitpack
from lowbit.reference import dfloat as _ref_dfloat
from lowbit.reference import int8 as _ref_int8

_lib = torch.library.Library("lowbit", "DEF")


def _triton(family: str):
    return importlib.import_module(f"lowbit.triton_kernels.{family}")


def _define(name: str, args: str, returns: str, fake, check, impls: dict, native=("cpu", "cuda")) -> None:
    """Define ``lowbit::name`` (public, with backend) and ``lowbit::_name_native``.

    ``fake`` and ``check`` take the public op's arguments, ``backend`` last with a default, so
    they serve both ops.
    """
    _lib.define(f"{name}({args}, str backend=\"auto\") -> {returns}")
    if native:
        _lib.define(f"_{name}_native({args}) -> {returns}")
    signature = inspect.signature(fake)
    arity = len(signature.parameters)

    def bind(args, kwargs) -> list:
        if not kwargs and len(args) == arity:  # the dispatcher's usual call: nothing to bind
            return list(args)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return list(bound.arguments.values())

    def checked_fake(*args, **kwargs):
        check(*args, **kwargs)
        return fake(*args, **kwargs)

    torch.library.register_fake(f"lowbit::{name}", checked_fake, lib=_lib)
    for backend_name, fn in impls.items():
        _backend.register(name, backend_name, fn)
    if native:
        torch.library.register_fake(f"lowbit::_{name}_native", checked_fake, lib=_lib)
        native_op = getattr(torch.ops.lowbit, f"_{name}_native")

        def run_native(*args):
            try:
                return native_op(*args)
            except ValueError as exc:  # the kernels report corrupted data as "corrupted ...: why"
                if str(exc).startswith("corrupted "):
                    raise FormatError(str(exc)) from None
                raise

        for device in native:  # devices for which lowbit._C registers a kernel
            _backend.register(name, device, run_native)

    def route(*args, **kwargs):
        *args, backend = bind(args, kwargs)
        args = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
        check(*args)
        return _backend.implementation(name, backend, args[0].device)(*args)

    _lib.impl(name, route, "CPU")
    _lib.impl(name, route, "CUDA")


# ---------------------------------------------------------------------------------------------
# Bit packing: uint8 values of 1, 2, 4 or 8 bits, packed along the last dimension.


def _check_bits(bits: int) -> None:
    if bits not in _ref_bitpack.SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {_ref_bitpack.SUPPORTED_BITS}, got {bits}")


def _check_pack(values: torch.Tensor, bits: int, backend: str = "auto") -> None:
    _check_bits(bits)
    if values.dtype != torch.uint8:
        raise TypeError(f"values must be a uint8 tensor, got {values.dtype}")
    if values.dim() == 0:
        raise ValueError("values must have at least one dimension, got a 0-dim tensor")


def _check_unpack(packed: torch.Tensor, bits: int, n: int, backend: str = "auto") -> None:
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {packed.dtype}")
    if packed.dim() == 0:
        raise ValueError("packed must have at least one dimension, got a 0-dim tensor")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    expected = _ref_bitpack.packed_length(n, bits)
    if packed.shape[-1] != expected:
        raise ValueError(
            f"packed has {packed.shape[-1]} bytes in its last dimension; {n} values of {bits} bits "
            f"take {expected}"
        )


def _fake_pack(values: torch.Tensor, bits: int, backend: str = "auto") -> torch.Tensor:
    nbytes = _ref_bitpack.packed_length(values.shape[-1], bits)
    return values.new_empty((*values.shape[:-1], nbytes))


def _fake_unpack(packed: torch.Tensor, bits: int, n: int, backend: str = "auto") -> torch.Tensor:
    return packed.new_empty((*packed.shape[:-1], n))


_define(
    "pack_bits",
    "Tensor values, int bits",
    "Tensor",
    _fake_pack,
    _check_pack,
    {
        "reference": _ref_bitpack.pack_bits,
        "triton": lambda values, bits: _triton("bitpack").pack_bits(values, bits),
    },
)
_define(
    "unpack_bits",
    "Tensor packed, int bits, int n",
    "Tensor",
    _fake_unpack,
    _check_unpack,
    {
        "reference": _ref_bitpack.unpack_bits,
        "triton": lambda packed, bits, n: _triton("bitpack").unpack_bits(packed, bits, n),
    },
)


def pack_bits(values: torch.Tensor, bits: int, *, backend: str | None = None) -> torch.Tensor:
    """Pack uint8 values of ``bits`` bits (1, 2, 4 or 8) along the last dimension.

    values: uint8 [..., n] -> uint8 [..., ceil(n * bits / 8)]. Only the low ``bits`` bits of each
    value are kept. The layout is in docs/formats.md ("Packed integers").
    """
    return torch.ops.lowbit.pack_bits(values, bits, _backend.requested(backend))


def unpack_bits(packed: torch.Tensor, bits: int, n: int, *, backend: str | None = None) -> torch.Tensor:
    """Inverse of ``pack_bits``: uint8 [..., ceil(n * bits / 8)] -> uint8 [..., n]."""
    return torch.ops.lowbit.unpack_bits(packed, bits, n, _backend.requested(backend))


# ---------------------------------------------------------------------------------------------
# dfloat: lossless floats, Huffman-coded symbols + raw bits (docs/formats.md, "dfloat").
# The stream tensors: codes uint8 [padded bytes], raw uint8 [n * raw_bytes], gaps uint8
# [ceil(windows / 2)] (4-bit packed), block_starts int64 [blocks + 1], table int16 [4096].

# Limits of the format (a GPU thread decodes one window; a block's windows share a thread block).
MAX_WINDOW_BITS = 1 << 20
MAX_WINDOWS_PER_BLOCK = 1024

_DFLOAT_STREAM = (
    "Tensor codes, Tensor raw, Tensor gaps, Tensor block_starts, Tensor table, int total_bits, "
    "int window_bits, int windows_per_block"
)


def _check_dfloat_stream(n, dtype, codes, raw, gaps, block_starts, table, total_bits, window_bits,
                         windows_per_block) -> None:
    """Shape and dtype checks that need no data (so they also run on fake tensors)."""
    if dtype not in _ref_dfloat.LAYOUTS:
        raise TypeError(f"dtype must be one of bfloat16, float16, float32, got {dtype}")
    for name, t, want in (("codes", codes, torch.uint8), ("raw", raw, torch.uint8), ("gaps", gaps, torch.uint8),
                          ("block_starts", block_starts, torch.int64), ("table", table, torch.int16)):
        if t.dtype != want or t.dim() != 1:
            raise FormatError(f"{name} must be a 1-D {want} tensor, got {t.dtype} with shape {list(t.shape)}")
    if not (32 <= window_bits <= MAX_WINDOW_BITS and window_bits % 32 == 0
            and 1 <= windows_per_block <= MAX_WINDOWS_PER_BLOCK):
        raise FormatError(f"window_bits must be a multiple of 32 in [32, {MAX_WINDOW_BITS}] and windows_per_block "
                          f"in [1, {MAX_WINDOWS_PER_BLOCK}], got {window_bits} and {windows_per_block}")
    windows = -(-total_bits // window_bits)
    blocks = -(-windows // windows_per_block)
    checks = (
        ("raw", raw.numel(), n * _ref_dfloat.LAYOUTS[dtype][2]),
        ("gaps", gaps.numel(), -(-windows // 2)),
        ("block_starts", block_starts.numel(), blocks + 1),
        ("table", table.numel(), 1 << _ref_dfloat.MAX_CODE_LEN),
    )
    for name, got, want in checks:
        if got != want:
            raise FormatError(f"{name} has {got} elements, expected {want} for {n} values in {total_bits} code bits")
    if total_bits < 0 or codes.numel() < -(-total_bits // 8) + 8:
        raise FormatError(f"codes has {codes.numel()} bytes; {total_bits} code bits need {-(-total_bits // 8) + 8} "
                          "with the padding")
    if total_bits < n or total_bits > n * _ref_dfloat.MAX_CODE_LEN:
        raise FormatError(f"total_bits = {total_bits} is impossible for {n} values")


def _check_dfloat_decode(codes, raw, gaps, block_starts, table, n, dtype, total_bits, window_bits,
                         windows_per_block, backend="auto"):
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_dfloat_stream(n, dtype, codes, raw, gaps, block_starts, table, total_bits, window_bits, windows_per_block)
    devices = {t.device for t in (codes, raw, gaps, block_starts, table)}
    if len(devices) != 1:
        raise ValueError(f"the stream tensors must be on one device, got {sorted(map(str, devices))}")


def _fake_dfloat_decode(codes, raw, gaps, block_starts, table, n, dtype, total_bits, window_bits,
                        windows_per_block, backend="auto"):
    return codes.new_empty((n,), dtype=dtype)


_define(
    "dfloat_decode",
    "Tensor codes, Tensor raw, Tensor gaps, Tensor block_starts, Tensor table, int n, ScalarType dtype, "
    "int total_bits, int window_bits, int windows_per_block",
    "Tensor",
    _fake_dfloat_decode,
    _check_dfloat_decode,
    {
        "reference": _ref_dfloat.decode,
        "triton": lambda *args: _triton("dfloat").decode(*args),
    },
)


def _check_dfloat_gemv(x, codes, raw, gaps, block_starts, table, out_features, total_bits, window_bits,
                       windows_per_block, bias=None, backend="auto"):
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [batch, in_features], got shape {list(x.shape)}")
    if out_features < 0:
        raise ValueError(f"out_features must be >= 0, got {out_features}")
    n = out_features * x.shape[1]
    _check_dfloat_stream(n, x.dtype, codes, raw, gaps, block_starts, table, total_bits, window_bits,
                         windows_per_block)
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{out_features}] of {x.dtype}, got {list(bias.shape)} of {bias.dtype}")
    tensors = (x, codes, raw, gaps, block_starts, table) + ((bias,) if bias is not None else ())
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"x and the weight's tensors must be on one device, got {sorted(map(str, devices))}")


def _fake_dfloat_gemv(x, codes, raw, gaps, block_starts, table, out_features, total_bits, window_bits,
                      windows_per_block, bias=None, backend="auto"):
    return x.new_empty((x.shape[0], out_features))


_define(
    "dfloat_gemv",
    "Tensor x, " + _DFLOAT_STREAM.replace("int total_bits", "int out_features, int total_bits") + ", Tensor? bias",
    "Tensor",
    _fake_dfloat_gemv,
    _check_dfloat_gemv,
    {
        "reference": _ref_dfloat.gemv,
        "triton": lambda *args: _triton("dfloat").gemv(*args),
    },
    native=("cuda",),
)


def _define_native(name: str, args: str, returns: str, fake) -> None:
    """A native-only op ``lowbit::_name_native`` (no routing): the C++ encoder's steps."""
    _lib.define(f"_{name}_native({args}) -> {returns}")
    torch.library.register_fake(f"lowbit::_{name}_native", fake, lib=_lib)


def _fake_dfloat_histogram(x):
    return x.new_empty((_ref_dfloat.NUM_SYMBOLS,), dtype=torch.int64)


def _fake_dfloat_encode(x, lengths, codewords, total_bits, window_bits, windows_per_block):
    windows = -(-total_bits // window_bits)
    padded = -(-(-(-total_bits // 8) + 8) // 8) * 8
    u8 = dict(dtype=torch.uint8)
    return (x.new_empty((padded,), **u8), x.new_empty((x.numel() * _ref_dfloat.LAYOUTS[x.dtype][2],), **u8),
            x.new_empty((-(-windows // 2),), **u8),
            x.new_empty((-(-windows // windows_per_block) + 1,), dtype=torch.int64))


_define_native("dfloat_histogram", "Tensor x", "Tensor", _fake_dfloat_histogram)
_define_native(
    "dfloat_encode",
    "Tensor x, Tensor lengths, Tensor codewords, int total_bits, int window_bits, int windows_per_block",
    "(Tensor codes, Tensor raw, Tensor gaps, Tensor block_starts)",
    _fake_dfloat_encode,
)


def _dfloat_encode_reference(x, lengths, codewords, total_bits, window_bits, windows_per_block):
    symbols, raw = _ref_dfloat.split_fields(x)
    codes, gaps, block_starts, bits = _ref_dfloat.encode_stream(symbols, lengths, window_bits, windows_per_block)
    if bits != total_bits:
        raise ValueError(f"total_bits = {total_bits} but the codes take {bits} bits")
    return codes, raw, gaps, block_starts


# The encoder's steps run on CPU tensors, by the same backend rule (reference or cpu).
for _name, _ref_fn in (
    ("dfloat_histogram", lambda x: _ref_dfloat.histogram(_ref_dfloat.split_fields(x)[0])),
    ("dfloat_encode", _dfloat_encode_reference),
):
    _backend.register(_name, "reference", _ref_fn)
    _backend.register(_name, "cpu", getattr(torch.ops.lowbit, f"_{_name}_native"))


def dfloat_decode(codes, raw, gaps, block_starts, table, n, dtype, total_bits, window_bits, windows_per_block,
                  *, backend=None) -> torch.Tensor:
    """Decode a dfloat stream to a flat float tensor [n] of ``dtype``, bit-exact.

    A stream whose codes disagree with its gaps and block starts raises ``FormatError`` on every
    backend (on CUDA this costs one host synchronization, skipped while capturing a CUDA graph).
    """
    return torch.ops.lowbit.dfloat_decode(codes, raw, gaps, block_starts, table, n, dtype, total_bits,
                                          window_bits, windows_per_block, _backend.requested(backend))


def dfloat_gemv(x, codes, raw, gaps, block_starts, table, out_features, total_bits, window_bits,
                windows_per_block, bias=None, *, backend=None) -> torch.Tensor:
    """x [B, in] @ W.T (+ bias) -> [B, out], W [out, in] read from its dfloat stream without
    materializing it (fused backends); fp32 accumulation.

    The fused kernels never synchronize with the host: a corrupted stream gives an all-NaN output
    there, while the reference raises ``FormatError``. Stored forms are checked (checksum) when
    loaded, so this only concerns streams built by hand.
    """
    return torch.ops.lowbit.dfloat_gemv(x, codes, raw, gaps, block_starts, table, out_features, total_bits,
                                        window_bits, windows_per_block, bias, _backend.requested(backend))


# ---------------------------------------------------------------------------------------------
# int8: LLM.int8() decomposition (docs/formats.md, "int8"; spec in lowbit.reference.int8).

INT8_DTYPES = _ref_int8.DTYPES
# The int32 accumulator holds any sum of in_features products of two int8 in [-127, 127].
INT8_MAX_IN_FEATURES = (2**31 - 1) // (127 * 127)


def _check_devices(what: str, tensors) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{what} must be on one device, got {sorted(map(str, devices))}")


def _check_tensor(name: str, t: torch.Tensor, dtypes, shape) -> None:
    if t.dtype not in dtypes:
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be {want}, got {t.dtype}")
    if list(t.shape) != list(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def _check_int8_x(x: torch.Tensor) -> None:
    if x.dtype not in INT8_DTYPES:
        raise TypeError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [rows, in_features], got shape {list(x.shape)}")
    if x.shape[1] > INT8_MAX_IN_FEATURES:
        raise ValueError(f"in_features must be at most {INT8_MAX_IN_FEATURES} (int32 accumulation), got {x.shape[1]}")


def _check_int8_static(x, static_mask, static_idx) -> None:
    _check_tensor("static_mask", static_mask, (torch.uint8,), [x.shape[1]])
    if static_idx.dtype != torch.int32 or static_idx.dim() != 1:
        raise TypeError(f"static_idx must be a 1-D int32 tensor, got {static_idx.dtype} of shape "
                        f"{list(static_idx.shape)}")


def _check_int8_weight(x, weight, weight_scale, static_weight, bias, static_count: int) -> None:
    if weight.dtype != torch.int8 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be int8 [out_features, {x.shape[1]}], got {weight.dtype} of shape "
                         f"{list(weight.shape)}")
    out_features = weight.shape[0]
    _check_tensor("weight_scale", weight_scale, (torch.float32,), [out_features])
    _check_tensor("static_weight", static_weight, (x.dtype,), [out_features, static_count])
    if bias is not None:
        _check_tensor("bias", bias, (x.dtype,), [out_features])


def _check_int8_prepass(x, static_mask, static_idx, threshold, backend="auto"):
    _check_int8_x(x)
    _check_int8_static(x, static_mask, static_idx)
    _check_devices("x, static_mask and static_idx", (x, static_mask, static_idx))


def _fake_int8_prepass(x, static_mask, static_idx, threshold, backend="auto"):
    m, k = x.shape
    return (x.new_empty((m, k), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32),
            x.new_empty((k,), dtype=torch.uint8), x.new_empty((m, static_idx.shape[0])))


def _check_int8_matmul(x, xq, row_scale, col_flags, x_static, weight, weight_scale, static_weight, bias, threshold,
                       backend="auto"):
    _check_int8_x(x)
    m, k = x.shape
    _check_tensor("xq", xq, (torch.int8,), [m, k])
    _check_tensor("row_scale", row_scale, (torch.float32,), [m])
    _check_tensor("col_flags", col_flags, (torch.uint8,), [k])
    if x_static.dtype != x.dtype or x_static.dim() != 2 or x_static.shape[0] != m:
        raise ValueError(f"x_static must be {x.dtype} [{m}, S], got {x_static.dtype} of shape {list(x_static.shape)}")
    _check_int8_weight(x, weight, weight_scale, static_weight, bias, x_static.shape[1])
    _check_devices("x, the pre-pass outputs and the weight's tensors",
                   (x, xq, row_scale, col_flags, x_static, weight, weight_scale, static_weight, bias))


def _fake_int8_matmul(x, xq, row_scale, col_flags, x_static, weight, weight_scale, static_weight, bias, threshold,
                      backend="auto"):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _check_int8_linear(x, weight, weight_scale, static_mask, static_idx, static_weight, bias, threshold,
                       backend="auto"):
    _check_int8_x(x)
    _check_int8_static(x, static_mask, static_idx)
    _check_int8_weight(x, weight, weight_scale, static_weight, bias, static_idx.shape[0])
    _check_devices("x and the weight's tensors",
                   (x, weight, weight_scale, static_mask, static_idx, static_weight, bias))


def _fake_int8_linear(x, weight, weight_scale, static_mask, static_idx, static_weight, bias, threshold,
                      backend="auto"):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _check_int8_gemv(x, weight, weight_scale, static_idx, static_weight, bias, backend="auto"):
    _check_int8_x(x)
    if static_idx.dtype != torch.int32 or static_idx.dim() != 1:
        raise TypeError(f"static_idx must be a 1-D int32 tensor, got {static_idx.dtype} of shape "
                        f"{list(static_idx.shape)}")
    _check_int8_weight(x, weight, weight_scale, static_weight, bias, static_idx.shape[0])
    _check_devices("x and the weight's tensors", (x, weight, weight_scale, static_idx, static_weight, bias))


def _fake_int8_gemv(x, weight, weight_scale, static_idx, static_weight, bias, backend="auto"):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _int8_linear_via(prepass_backend: str, matmul_backend: str):
    """The composite ``int8_linear``: the pre-pass then the GEMM, on the named backends."""
    def run(x, weight, weight_scale, static_mask, static_idx, static_weight, bias, threshold):
        xq, row_scale, col_flags, x_static = torch.ops.lowbit.int8_prepass(x, static_mask, static_idx, threshold,
                                                                             prepass_backend)
        return torch.ops.lowbit.int8_matmul(x, xq, row_scale, col_flags, x_static, weight, weight_scale,
                                            static_weight, bias, threshold, matmul_backend)
    return run


def _int8_matmul_cpu(*args):
    from lowbit.int8 import cpu_gemm  # imported on first use: it probes oneDNN

    return cpu_gemm.matmul(*args)


_INT8_WEIGHT = "Tensor weight, Tensor weight_scale"
_define(
    "int8_prepass",
    "Tensor x, Tensor static_mask, Tensor static_idx, float threshold",
    "(Tensor xq, Tensor row_scale, Tensor col_flags, Tensor x_static)",
    _fake_int8_prepass,
    _check_int8_prepass,
    {
        "reference": _ref_int8.prepass,
        "triton": lambda *args: _triton("int8").prepass(*args),
    },
)
_define(
    "int8_matmul",
    "Tensor x, Tensor xq, Tensor row_scale, Tensor col_flags, Tensor x_static, " + _INT8_WEIGHT
    + ", Tensor static_weight, Tensor? bias, float threshold",
    "Tensor",
    _fake_int8_matmul,
    _check_int8_matmul,
    {
        "reference": _ref_int8.matmul,
        "triton": lambda *args: _triton("int8").matmul(*args),
        "cpu": _int8_matmul_cpu,
    },
    native=(),
)
_define(
    "int8_gemv",
    "Tensor x, " + _INT8_WEIGHT + ", Tensor static_idx, Tensor static_weight, Tensor? bias",
    "Tensor",
    _fake_int8_gemv,
    _check_int8_gemv,
    {
        "reference": _ref_int8.gemv,
        "triton": lambda *args: _triton("int8").gemv(*args),
    },
)
# The GEMM is a Triton kernel on GPUs (tl.dot on int8); the backend picks the pre-pass's kernel.
_define(
    "int8_linear",
    "Tensor x, " + _INT8_WEIGHT + ", Tensor static_mask, Tensor static_idx, Tensor static_weight, Tensor? bias, "
    "float threshold",
    "Tensor",
    _fake_int8_linear,
    _check_int8_linear,
    {
        "reference": _ref_int8.linear,
        "cpu": _int8_linear_via("cpu", "cpu"),
        "cuda": _int8_linear_via("cuda", "auto"),  # the GEMM: Triton, else the reference
        "triton": _int8_linear_via("triton", "triton"),
    },
    native=(),
)


def int8_prepass(x, static_mask, static_idx, threshold, *, backend=None):
    """The activation pre-pass, one read of x [M, K] with no host synchronization:
    -> (xq int8 [M, K], row_scale fp32 [M], col_flags uint8 [K], x_static [M, S]).
    See ``lowbit.reference.int8`` for the exact definition."""
    return torch.ops.lowbit.int8_prepass(x, static_mask, static_idx, float(threshold), _backend.requested(backend))


def int8_matmul(x, xq, row_scale, col_flags, x_static, weight, weight_scale, static_weight, bias, threshold, *,
                backend=None):
    """int8 x int8 -> int32 GEMM with the dequantization, the 16-bit outlier and static-column
    products, the bias and the output cast fused: -> [M, out] of x.dtype."""
    return torch.ops.lowbit.int8_matmul(x, xq, row_scale, col_flags, x_static, weight, weight_scale, static_weight,
                                        bias, float(threshold), _backend.requested(backend))


def int8_gemv(x, weight, weight_scale, static_idx, static_weight, bias=None, *, backend=None):
    """Weight-only product for small batches: x [M, K] (16-bit, not quantized) with the int8 weight,
    reading half the bytes of a bf16 weight: -> [M, out] of x.dtype."""
    return torch.ops.lowbit.int8_gemv(x, weight, weight_scale, static_idx, static_weight, bias,
                                      _backend.requested(backend))


def int8_linear(x, weight, weight_scale, static_mask, static_idx, static_weight, bias, threshold, *, backend=None):
    """The decomposed product: ``int8_prepass`` then ``int8_matmul``. The backend names the
    pre-pass kernel; on CUDA tensors the GEMM is always the Triton kernel."""
    return torch.ops.lowbit.int8_linear(x, weight, weight_scale, static_mask, static_idx, static_weight, bias,
                                        float(threshold), _backend.requested(backend))


_define_native(
    "int8_epilogue",
    "Tensor acc, Tensor row_scale, Tensor weight_scale, Tensor? dyn_x, Tensor? dyn_w, Tensor x_static, "
    "Tensor static_weight, Tensor? bias",
    "Tensor",
    lambda acc, row_scale, weight_scale, dyn_x, dyn_w, x_static, *rest: x_static.new_empty(acc.shape),
)

# The schemas exist now, so the extension's kernels can attach to them.
_native.status()
