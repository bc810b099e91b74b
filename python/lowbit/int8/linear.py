"""``Int8Linear``: an ``nn.Linear`` with int8 weights and the LLM.int8() decomposed product."""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit import ops, stored
from lowbit.errors import FormatError
from lowbit.int8.format import Int8Weight, quantize_linear, static_columns
from lowbit.nn.base import LowbitLinear
from lowbit.reference.int8 import QMAX, dequantize, static_mask

# bitsandbytes' Linear8bitLt state dicts: weight (int8 "CB"), SCB (fp32 row absmax), weight_format.
_BNB_ROW_FORMAT = 0
# Inputs of at most this many rows take the weight-only product, per device type (gemv_max_rows=None):
# on CUDA it reads half the bytes of bf16 for decoding; on the CPU it ties with the int8 GEMM at 1 row
# (and rounds no activations) and loses from 2 rows on: by 5-20% at 2-4 rows and 15-35% at 8 to the
# GEMM's few-rows kernel on an AVX2 host, by 1.4-4x to the AMX GEMM on a Xeon with AMX (4096->4096
# and 4096->14336; bench/test_bench_int8.py, test_cpu_gemv_or_gemm_by_rows).
GEMV_MAX_ROWS = {"cuda": 16, "cpu": 1}
MAGIC = stored.magic_number("lbi8")
FORMAT_VERSION = 1
_DTYPE_CODES = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}
# The stored tensors besides the header, in checksum order ("bias" is the module's parameter).
STORED = ("weight", "weight_scale", "static_idx", "static_weight", "threshold", "bias")


def check_threshold(threshold) -> float:
    value = float(threshold)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"threshold must be a finite number >= 0 (0 turns the outlier split off), got {threshold!r}")
    return value


class Int8Linear(LowbitLinear):
    """y = x W^T + b with W stored in int8 (half the bytes of bf16) and the LLM.int8() product.

    Input rows are quantized to int8 per row at run time, except the *outlier* elements
    (|x| >= threshold) and the *static* columns, which are multiplied in 16-bit; the exact
    definition is in ``lowbit.reference.int8``. Static columns are input features chosen ahead of
    time (``from_linear(..., calibration=...)``): their weight columns are kept in 16-bit, so they
    lose nothing. ``threshold=0`` turns the dynamic split off.

    Inputs of at most ``gemv_max_rows`` rows (decoding) use the weight-only product (16-bit
    activations, int8 weight): more accurate, and faster there. The default (None) is 16 on CUDA
    and 1 on the CPU, where each product is the faster one (measured, see ``GEMV_MAX_ROWS``);
    0 always takes the decomposed product.

    Stored form (the state dict, docs/formats.md "int8"): ``weight`` int8 [out, in],
    ``weight_scale`` fp32 [out], ``static_idx`` int32 [S], ``static_weight`` [out, S],
    ``threshold`` fp32 [], the ``bias`` parameter, and ``weight_header`` (magic, version, CRC-32),
    written by ``state_dict()`` and checked by ``load_state_dict``. A bitsandbytes 8-bit state dict
    (``weight`` int8, ``SCB``, ``weight_format``) loads too.
    """

    family = "int8"
    fixed_dtype_buffers = ("weight_scale", "threshold")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold: float = 6.0, *,
                 dtype=torch.bfloat16, device=None, backend: str | None = None, gemv_max_rows: int | None = None):
        super().__init__(in_features, out_features, bias, dtype=dtype, device=device, backend=backend)
        # An empty layer holds an all-zero weight until load_state_dict fills it.
        self._setup(Int8Weight(
            torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
            torch.zeros(out_features, dtype=torch.float32, device=device),
            torch.zeros(0, dtype=torch.int32, device=device),
            torch.zeros(out_features, 0, dtype=dtype, device=device),
        ), threshold, gemv_max_rows)

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0, *, calibration=None, static_idx=None,
                    max_static: int | None = None, backend: str | None = None,
                    gemv_max_rows: int | None = None) -> "Int8Linear":
        """Quantize ``linear``'s weight (bf16, fp16 or fp32) to int8 with per-row scales; the
        bias is kept as it is, and the layer computes in the weight's dtype.

        calibration: sample inputs [..., in_features] (a tensor or a list); the columns where they
        reach ``threshold`` (at most ``max_static``, largest first) become static columns, kept in
        16-bit. static_idx: give those columns directly instead.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        threshold = check_threshold(threshold)
        if calibration is not None and static_idx is not None:
            raise ValueError("give calibration or static_idx, not both")
        if calibration is not None:
            parts = calibration if isinstance(calibration, (list, tuple)) else [calibration]
            for part in parts:
                if not isinstance(part, torch.Tensor) or part.shape[-1:] != (linear.in_features,):
                    shape = list(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
                    raise ValueError(f"calibration must hold tensors [..., in_features = {linear.in_features}], "
                                     f"got {shape}")
            static_idx = static_columns(calibration, threshold, max_static)
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, threshold,
                     dtype=weight.dtype, device="meta", backend=backend, gemv_max_rows=gemv_max_rows)
        module._setup(quantize_linear(weight, static_idx), threshold, gemv_max_rows)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().to(weight.dtype, copy=True), requires_grad=False)
        return module

    def _setup(self, weight: Int8Weight, threshold: float, gemv_max_rows: int | None) -> None:
        if gemv_max_rows is not None and (isinstance(gemv_max_rows, bool) or not isinstance(gemv_max_rows, int)
                                          or gemv_max_rows < 0):
            raise ValueError(f"gemv_max_rows must be an int >= 0 or None, got {gemv_max_rows!r}")
        self.gemv_max_rows = gemv_max_rows
        self._set_weight(weight)
        self.register_buffer("threshold", torch.tensor(check_threshold(threshold), dtype=torch.float32,
                                                       device=weight.weight.device))
        self._threshold = float(threshold)  # a Python float for the ops: reading the buffer would sync
        self._moved()

    def _set_weight(self, weight: Int8Weight) -> None:
        for name in ("weight", "weight_scale", "static_idx", "static_weight"):
            self.register_buffer(name, getattr(weight, name))
        self.register_buffer("static_mask", self._mask_of(weight.static_idx, weight.weight.device), persistent=False)

    def _mask_of(self, static_idx: torch.Tensor, device) -> torch.Tensor:
        """uint8 [in_features]: 1 at the static columns (derived, not saved)."""
        if device is not None and torch.device(device).type == "meta":
            return torch.empty(self.in_features, dtype=torch.uint8, device="meta")
        return static_mask(static_idx.to(device), self.in_features, device).to(torch.uint8)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def _resolve_ops(self) -> None:
        device = self.weight.device
        backend = "reference" if device.type == "meta" else self.backend  # meta: shapes only, until loaded
        self._linear = ops.op("int8_linear", backend, device)
        self._gemv = ops.op("int8_gemv", backend, device) if device.type in GEMV_MAX_ROWS else None
        rows = self.gemv_max_rows
        self._gemv_rows = GEMV_MAX_ROWS.get(device.type, 0) if rows is None else rows

    def _config_extra(self) -> dict:
        return {"threshold": self._threshold, "gemv_max_rows": self.gemv_max_rows}

    def _narrow(self, dim: int, start: int, length: int) -> "Int8Linear":
        # Rows keep their scales; a column shard keeps every row's scale whole (the absmax of the
        # full row, so each int8 weight still means what it meant) and the static columns inside it.
        stop = start + length
        if dim == 0:
            part = Int8Weight(self.weight[start:stop].clone(), self.weight_scale[start:stop].clone(),
                              self.static_idx.clone(), self.static_weight[start:stop].clone())
            shape = (self.in_features, length)
        else:
            inside = (self.static_idx >= start) & (self.static_idx < stop)
            part = Int8Weight(self.weight[:, start:stop].clone(), self.weight_scale.clone(),
                              (self.static_idx[inside] - start).to(torch.int32), self.static_weight[:, inside].clone())
            shape = (length, self.out_features)
        module = type(self)(*shape, self.bias is not None and dim == 0, self._threshold, dtype=self._dtype,
                            device="meta", backend=self.backend, gemv_max_rows=self.gemv_max_rows)
        module._setup(part, self._threshold, self.gemv_max_rows)
        self._narrowed_bias(module, dim, start, length)
        module._moved()
        return module

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, self.static_idx, self.static_weight, self._dtype)

    # -- stored form ------------------------------------------------------------------------------
    def _stored_tensors(self, tensors: dict) -> list:
        return [tensors.get(name) for name in STORED]

    def _header_fields(self, tensors: dict) -> list[int]:
        weight, kept = tensors["weight"], tensors["static_weight"]
        return [weight.shape[0], weight.shape[1], tensors["static_idx"].numel(), _DTYPE_CODES.get(kept.dtype, 0)]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        tensors = {name: destination.get(prefix + name) for name in STORED}
        destination[prefix + "weight_header"] = stored.make_header(
            MAGIC, FORMAT_VERSION, self._header_fields(tensors), self._stored_tensors(tensors))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "SCB" in state_dict:
            self._from_bitsandbytes(state_dict, prefix, error_msgs)
        problem = self._stored_problem(state_dict, prefix)
        if problem is not None:
            error_msgs.append(f"{prefix}: {problem}")
            return
        state_dict.pop(prefix + "weight_header", None)
        # The number of static columns is the stored one, not the empty module's.
        idx, kept = state_dict.get(prefix + "static_idx"), state_dict.get(prefix + "static_weight")
        if idx is not None and kept is not None:
            device = self.weight.device
            # Buffers of the stored sizes, which the default copy below fills.
            self._set_weight(Int8Weight(self.weight, self.weight_scale,
                                        torch.zeros(idx.shape, dtype=torch.int32, device=device),
                                        torch.empty(kept.shape, dtype=self.static_weight.dtype, device=device)))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # The mask follows the loaded columns, on the device the weight now has (assign=True moves it).
        self.static_mask = self._mask_of(self.static_idx, self.weight.device)
        if self.threshold.device.type != "meta":
            self._threshold = float(self.threshold)
        if self.static_weight.dtype != self._dtype:  # assign=True keeps the stored dtype
            self.static_weight = self.static_weight.to(self._dtype)
        if self.bias is not None and self.bias.dtype != self._dtype:
            self.bias = nn.Parameter(self.bias.detach().to(self._dtype), requires_grad=False)
        self._moved()

    def _stored_problem(self, state_dict, prefix) -> str | None:
        """Why the stored tensors cannot be this module's, or None. Shapes of the fixed-size
        buffers are left to load_state_dict's own checks."""
        weight, header = state_dict.get(prefix + "weight"), state_dict.get(prefix + "weight_header")
        if weight is not None and weight.dtype != torch.int8:
            return (f"weight is {weight.dtype}, not int8: this is not an Int8Linear (or bitsandbytes 8-bit) state "
                    "dict; quantize a float layer with Int8Linear.from_linear")
        if weight is None and header is None:
            return None  # load_state_dict reports the missing keys
        tensors = {name: state_dict.get(prefix + name) for name in STORED}
        idx, kept = tensors["static_idx"], tensors["static_weight"]
        if idx is not None and kept is not None:
            if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
                return f"static_idx must be a 1-D integer tensor, got {idx.dtype} of shape {list(idx.shape)}"
            if idx.numel() and (idx.min() < 0 or idx.max() >= self.in_features or (idx[1:] <= idx[:-1]).any()):
                return f"static_idx must be increasing columns in [0, {self.in_features}), got {idx.tolist()[:16]}"
            if list(kept.shape) != [self.out_features, idx.numel()]:
                return f"static_weight must be [{self.out_features}, {idx.numel()}], got {list(kept.shape)}"
        try:
            _, fields = stored.read_header(header, magic=MAGIC, versions=(FORMAT_VERSION,), nfields=4,
                                           tensors=self._stored_tensors(tensors), what=f"{prefix}weight (int8)")
        except FormatError as exc:
            return str(exc)
        if fields[:2] != [self.out_features, self.in_features]:
            return f"stored weight is [{fields[0]}, {fields[1]}], this layer is [{self.out_features}, {self.in_features}]"
        return None

    def _from_bitsandbytes(self, state_dict, prefix, error_msgs) -> None:
        """Rewrite bitsandbytes' keys (in the copy load_state_dict works on) into this module's,
        with the header they lack."""
        scb = state_dict.pop(prefix + "SCB")
        fmt = state_dict.pop(prefix + "weight_format", None)
        if fmt is not None and int(torch.as_tensor(fmt).item()) != _BNB_ROW_FORMAT:
            error_msgs.append(f"{prefix}weight_format: only bitsandbytes' row-major format ({_BNB_ROW_FORMAT}) "
                              f"loads, got {int(torch.as_tensor(fmt).item())}")
            return
        state_dict[prefix + "weight_scale"] = scb.float() / QMAX
        state_dict.setdefault(prefix + "static_idx", torch.zeros(0, dtype=torch.int32))
        state_dict.setdefault(prefix + "static_weight", torch.zeros(self.out_features, 0, dtype=self._dtype))
        state_dict.setdefault(prefix + "threshold", torch.tensor(self._threshold, dtype=torch.float32))
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.dtype == torch.int8:
            tensors = {name: state_dict.get(prefix + name) for name in STORED}
            state_dict[prefix + "weight_header"] = stored.make_header(
                MAGIC, FORMAT_VERSION, self._header_fields(tensors), self._stored_tensors(tensors))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self._threshold}, static_columns={self.static_idx.numel()}"

    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        if self._gemv is not None and 0 < x.shape[0] <= self._gemv_rows:
            return self._gemv(x, self.weight, self.weight_scale, self.static_idx, self.static_weight, self.bias)
        return self._linear(x.contiguous(), self.weight, self.weight_scale, self.static_mask, self.static_idx,
                            self.static_weight, self.bias, self._threshold)
