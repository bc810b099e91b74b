"""``DFloatLinear``: an ``nn.Linear`` whose weight is stored losslessly in the dfloat format."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import ops, stored
from lowbit.dfloat.format import DTYPE_CODES, STREAM, DFloatTensor, compress
from lowbit.errors import FormatError
from lowbit.nn.base import LowbitLinear
from lowbit.ops.dfloat import _fake_encode
from lowbit.reference import dfloat as ref

MODES = ("exact", "fused")
FUSED_MAX_ROWS = 8
# The bias is not part of the dfloat stream (whose header and checksum are the format's own), so
# it carries a header of its own: [magic, version, CRC-32, out_features, dtype code].
BIAS_MAGIC = stored.magic_number("lbdb")
BIAS_VERSION = 1


def _placeholder(shape, dtype, device) -> DFloatTensor:
    """A stream of the sizes an all-zero weight would take, without encoding anything (for an
    empty layer on ``meta``, filled later by load_state_dict)."""
    n = shape[0] * shape[1]
    lengths = torch.zeros(ref.NUM_SYMBOLS, dtype=torch.uint8, device=device)
    x = torch.empty(n, dtype=dtype, device=device)
    codes, raw, gaps, block_starts = _fake_encode(x, lengths, None, n, 256, 128)
    return DFloatTensor(codes=codes, raw=raw, gaps=gaps, block_starts=block_starts, code_lengths=lengths,
                        shape=shape, dtype=dtype, total_bits=n, window_bits=256, windows_per_block=128,
                        table=torch.empty(1 << ref.MAX_CODE_LEN, dtype=torch.int16, device=device))


class DFloatLinear(LowbitLinear):
    """y = x W^T + b with W kept compressed (dfloat, about 11 bits/weight for trained bf16 weights).

    mode="exact" (default): decode W, then the same ``F.linear`` as ``nn.Linear``; the output is
    bit-identical to the original layer's.
    mode="fused": for at most 8 rows of input, one kernel decodes W and multiplies as it goes,
    never writing W to memory (``lowbit::dfloat_gemv``); it accumulates in fp32 and rounds once, so
    it can differ from ``nn.Linear`` (whose summation order is cuBLAS's or the CPU BLAS's) by fp32
    rounding: within a few units in the last place of the output dtype. Larger inputs, and devices
    with no fused kernel (the CPU: its reference would be far slower than decoding), use the exact
    path.

    The weight is stored in its own dtype, losslessly; the layer computes in ``dtype`` (the
    weight's, until ``.half()`` or ``.to(dtype)`` changes it: the decoded weight is then cast).
    The compressed weight is held in buffers ``weight_header``, ``weight_codes``, ``weight_raw``,
    ``weight_gaps``, ``weight_block_starts``, ``weight_code_lengths``: the dfloat stored form, with
    its checksum, so ``state_dict()`` is the stored form and ``load_state_dict`` validates it. The
    bias, when there is one, comes with ``bias_header`` (magic, version, CRC-32 of the bias).
    """

    family = "dfloat"
    fixed_dtype_buffers = ()  # every buffer is an integer tensor: dtype conversions skip them

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype=torch.bfloat16,
                 device=None, mode: str = "exact", backend: str | None = None):
        super().__init__(in_features, out_features, bias, dtype=dtype, device=device, backend=backend)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        shape = (out_features, in_features)
        # The device a tensor made here gets: the argument, else torch's default (set by
        # ``with torch.device("meta"):`` too).
        if torch.empty(0, device=device).device.type == "meta":
            weight = _placeholder(shape, dtype, "meta")
        else:  # an empty layer holds the code of an all-zero weight until load_state_dict fills it
            weight = compress(torch.zeros(shape, dtype=dtype, device=device))
        self._set_weight(weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, mode: str = "exact", backend: str | None = None) -> "DFloatLinear":
        """Compress ``linear``'s weight (bf16, fp16 or fp32) losslessly; the bias is kept as it
        is, and the layer computes in the weight's dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype=weight.dtype,
                     device="meta", mode=mode, backend=backend)
        module._set_weight(compress(weight))
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().to(weight.dtype, copy=True), requires_grad=False)
        module._moved()
        return module

    # The stored form lives in buffers; the decode table is derived and not saved.
    def _set_weight(self, weight: DFloatTensor) -> None:
        for name, t in weight.to_dict().items() if weight.device.type != "meta" else self._meta_dict(weight):
            self.register_buffer(f"weight_{name}", t)
        self.register_buffer("weight_table", weight.table, persistent=False)
        self._weight_meta = (weight.shape, weight.dtype, weight.total_bits, weight.window_bits,
                             weight.windows_per_block)
        self._moved()

    @staticmethod
    def _meta_dict(weight: DFloatTensor):
        yield "header", torch.empty(0, dtype=torch.int64, device="meta")
        for name in STREAM:
            yield name, getattr(weight, name)

    @property
    def device(self) -> torch.device:
        return self.weight_codes.device

    def _resolve_ops(self) -> None:
        if not hasattr(self, "_weight_meta"):
            return  # during construction
        device = self.weight_codes.device
        # The ops' arguments are fixed between moves: gathered once, not at every forward.
        shape, dtype, total_bits, window_bits, windows_per_block = self._weight_meta
        stream = (self.weight_codes, self.weight_raw, self.weight_gaps, self.weight_block_starts, self.weight_table)
        # check=False: no host synchronization per forward on a GPU; the stream was validated when it
        # was made or loaded (the stored form's checksum).
        self._decode_args = (*stream, shape[0] * shape[1], dtype, total_bits, window_bits, windows_per_block, False)
        self._gemv_stream = (*stream, shape[0], total_bits, window_bits, windows_per_block)
        backend = "reference" if device.type == "meta" else self.backend  # meta: shapes only, until loaded
        self._decode = ops.op("dfloat_decode", backend, device)
        self._gemv = None
        if self.mode == "fused":
            # A fused kernel only where one exists: auto never settles for the reference here.
            # A backend with no fused kernel at all (cpu) decodes with its own kernel instead.
            wanted = ops.requested(backend)
            if wanted == "auto" or wanted in ops.implementations("dfloat_gemv"):
                chosen = ops.resolve("dfloat_gemv", backend, device)
                if chosen != "reference" or wanted == "reference":
                    self._gemv = ops.op("dfloat_gemv", backend, device)

    def _config_extra(self) -> dict:
        return {"mode": self.mode}

    @property
    def compressed_weight(self) -> DFloatTensor:
        shape, dtype, total_bits, window_bits, windows_per_block = self._weight_meta
        return DFloatTensor(
            **{name: getattr(self, f"weight_{name}") for name in STREAM}, shape=shape, dtype=dtype,
            total_bits=total_bits, window_bits=window_bits, windows_per_block=windows_per_block,
            table=self.weight_table,
        )

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the weight is stored in (losslessly)."""
        return self._weight_meta[1]

    def _decoded(self) -> torch.Tensor:
        return self._decode(*self._decode_args).view(self._weight_meta[0])

    def dequantize(self) -> torch.Tensor:
        """The stored weight, bit for bit (cast to the compute dtype when that differs)."""
        return self._decoded().to(self._dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The decoded weight (decoded at every access: it is not kept)."""
        return self.dequantize()

    def _narrow(self, dim: int, start: int, length: int) -> "DFloatLinear":
        # A Huffman stream cannot be cut at a row or column: decode this weight, take the part,
        # and encode the part again (losslessly: the shard's weight is the same bits). Only this
        # layer's weight is ever dense, never a whole model.
        part = self._decoded().narrow(dim, start, length).contiguous()
        shape = (self.in_features, length) if dim == 0 else (length, self.out_features)
        module = type(self)(*shape, self.bias is not None and dim == 0, dtype=self._dtype, device="meta",
                            mode=self.mode, backend=self.backend)
        module._set_weight(compress(part))
        self._narrowed_bias(module, dim, start, length)
        module._moved()
        return module

    def _bias_header_fields(self, bias: torch.Tensor) -> list[int]:
        return [bias.numel(), DTYPE_CODES.get(bias.dtype, 0)]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        bias = destination.get(prefix + "bias")
        if bias is not None:
            destination[prefix + "bias_header"] = stored.make_header(
                BIAS_MAGIC, BIAS_VERSION, self._bias_header_fields(bias), [bias])

    def _stored_problem(self, state_dict, prefix) -> str | None:
        """Why the state dict cannot be this module's (checked before anything is loaded), or None."""
        weight = state_dict.get(prefix + "weight")
        if isinstance(weight, torch.Tensor):
            return (f"{prefix}weight is a dense {weight.dtype} tensor: this is not a DFloatLinear state dict (its "
                    "weight is stored as weight_header, weight_codes, ...); compress a float layer with "
                    "DFloatLinear.from_linear")
        bias, header = state_dict.get(prefix + "bias"), state_dict.get(prefix + "bias_header")
        if bias is not None or header is not None:
            try:
                stored.read_header(header, magic=BIAS_MAGIC, versions=(BIAS_VERSION,), nfields=2, tensors=[bias],
                                   what=f"{prefix}bias (dfloat)")
            except FormatError as exc:
                return str(exc)
        return None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        problem = self._stored_problem(state_dict, prefix)
        if problem is not None:
            error_msgs.append(problem)
            return
        state_dict.pop(prefix + "bias_header", None)
        parts = {name: state_dict[prefix + "weight_" + name] for name in ("header",) + STREAM
                 if prefix + "weight_" + name in state_dict}
        if len(parts) == len(STREAM) + 1:
            device = self.weight_codes.device
            try:
                target = device if device.type != "meta" else None
                weight = DFloatTensor.from_dict({k: v.to(target) if target else v for k, v in parts.items()})
            except FormatError as exc:
                error_msgs.append(f"{prefix}weight: {exc}")
                return
            if weight.dtype not in ref.FLOAT_DTYPES:  # a dfloat stream of bytes (uint8) is no weight
                error_msgs.append(f"{prefix}weight: stored dtype {weight.dtype}, a DFloatLinear's weight is one of "
                                  f"{', '.join(str(d) for d in ref.FLOAT_DTYPES)}")
                return
            if weight.shape != (self.out_features, self.in_features):
                error_msgs.append(f"{prefix}weight: stored shape {list(weight.shape)}, module is "
                                  f"[{self.out_features}, {self.in_features}]")
                return
            self._set_weight(weight)
            # The buffers now match the stored tensors; let the default copy (and key checks) run.
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.bias is not None and self.bias.dtype != self._dtype:  # assign=True keeps the stored dtype
            self.bias = nn.Parameter(self.bias.detach().to(self._dtype), requires_grad=False)
        self._moved()

    def extra_repr(self) -> str:
        bits = self.compressed_weight.bits_per_weight if self.device.type != "meta" else float("nan")
        return (f"{super().extra_repr()}, weight_dtype={str(self.weight_dtype).removeprefix('torch.')}, "
                f"mode={self.mode}, bits_per_weight={bits:.2f}")

    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        if self._gemv is not None and 0 < x.shape[0] <= FUSED_MAX_ROWS and self.weight_dtype == self._dtype:
            return self._gemv(x.contiguous(), *self._gemv_stream, self.bias)
        weight = self._decode(*self._decode_args).view(self._weight_meta[0])
        if weight.dtype != self._dtype:
            weight = weight.to(self._dtype)
        return F.linear(x, weight, self.bias)
