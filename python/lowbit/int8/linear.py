"""``Int8Linear``: an ``nn.Linear`` with int8 weights and the LLM.int8() decomposed product."""

from __future__ import annotations

import torch
from torch import nn

from lowbit import ops
from lowbit.int8.format import Int8Weight, quantize_linear, static_columns
from lowbit.reference.int8 import DTYPES, QMAX, static_mask

# bitsandbytes' Linear8bitLt state dicts: weight (int8 "CB"), SCB (fp32 row absmax), weight_format.
_BNB_ROW_FORMAT = 0
GEMV_MAX_ROWS = 16


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored in int8 (half the bytes of bf16) and the LLM.int8() product.

    Input rows are quantized to int8 per row at run time, except the *outlier* elements
    (|x| >= threshold) and the *static* columns, which are multiplied in 16-bit; the exact
    definition is in ``lowbit.reference.int8``. Static columns are input features chosen ahead of
    time (``from_linear(..., calibration=...)``): their weight columns are kept in 16-bit, so they
    lose nothing. ``threshold=0`` turns the dynamic split off.

    On CUDA, inputs of at most ``gemv_max_rows`` rows (decoding) use the weight-only product
    (16-bit activations, int8 weight): more accurate, and it reads half the bytes of bf16.

    Buffers (the state dict): ``weight`` int8 [out, in], ``weight_scale`` fp32 [out],
    ``static_idx`` int32 [S], ``static_weight`` [out, S], ``threshold`` fp32 []; and the ``bias``
    parameter. A bitsandbytes 8-bit state dict (``weight`` int8, ``SCB``, ``weight_format``) loads
    too. Moving the module between devices or dtypes moves these tensors and never re-quantizes;
    ``weight_scale`` stays fp32. Inputs may be bf16, fp16 or fp32; the output has the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold: float = 6.0, *,
                 dtype=torch.bfloat16, device=None, backend: str | None = None, gemv_max_rows: int = GEMV_MAX_ROWS):
        super().__init__()
        if dtype not in DTYPES:
            raise TypeError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
        # An empty module holds an all-zero weight until load_state_dict fills it.
        empty = Int8Weight(
            torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
            torch.zeros(out_features, dtype=torch.float32, device=device),
            torch.zeros(0, dtype=torch.int32, device=device),
            torch.zeros(out_features, 0, dtype=dtype, device=device),
        )
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self._setup(empty, b, threshold, backend, gemv_max_rows)

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0, *, calibration=None, static_idx=None,
                    max_static: int | None = None, backend: str | None = None,
                    gemv_max_rows: int = GEMV_MAX_ROWS) -> "Int8Linear":
        """Quantize ``linear``'s weight to int8 with per-row scales; the bias is kept as it is.

        calibration: sample inputs [..., in_features] (a tensor or a list); the columns where they
        reach ``threshold`` (at most ``max_static``, largest first) become static columns, kept in
        16-bit. static_idx: give those columns directly instead.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if calibration is not None and static_idx is not None:
            raise ValueError("give calibration or static_idx, not both")
        if calibration is not None:
            static_idx = static_columns(calibration, threshold, max_static)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        module._setup(quantize_linear(linear.weight.detach(), static_idx), bias, threshold, backend, gemv_max_rows)
        return module

    def _setup(self, weight: Int8Weight, bias, threshold: float, backend, gemv_max_rows: int) -> None:
        self.out_features, self.in_features = weight.weight.shape
        self.backend, self.gemv_max_rows = backend, gemv_max_rows
        self._set_weight(weight)
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32,
                                                       device=weight.weight.device))
        self._threshold = float(threshold)  # a Python float for the ops: reading the buffer would sync
        if bias is not None:
            self.bias = nn.Parameter(bias, requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _set_weight(self, weight: Int8Weight) -> None:
        for name in ("weight", "weight_scale", "static_idx", "static_weight"):
            self.register_buffer(name, getattr(weight, name))
        self.register_buffer("static_mask", self._mask_of(weight.static_idx, weight.weight.device), persistent=False)

    def _mask_of(self, static_idx: torch.Tensor, device) -> torch.Tensor:
        """uint8 [in_features]: 1 at the static columns (derived, not saved)."""
        return static_mask(static_idx.to(device), self.in_features, device).to(torch.uint8)

    def _apply(self, fn, recurse=True):
        # A dtype change (module.half()) must not touch the fp32 scales; devices still follow.
        keep = {name: getattr(self, name) for name in ("weight_scale", "threshold")}
        super()._apply(fn, recurse)
        for name, before in keep.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "SCB" in state_dict:
            self._from_bitsandbytes(state_dict, prefix, error_msgs)
        problem = self._stored_problem(state_dict, prefix)
        if problem is not None:
            error_msgs.append(f"{prefix}: {problem}")
            return
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
        self._threshold = float(self.threshold)

    def _stored_problem(self, state_dict, prefix) -> str | None:
        """Why the stored tensors cannot be this module's, or None. Shapes of the fixed-size
        buffers are left to load_state_dict's own checks."""
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.dtype != torch.int8:
            return (f"weight is {weight.dtype}, not int8: this is not an Int8Linear (or bitsandbytes 8-bit) state "
                    "dict; quantize a float layer with Int8Linear.from_linear")
        idx, kept = state_dict.get(prefix + "static_idx"), state_dict.get(prefix + "static_weight")
        if idx is None or kept is None:
            return None
        if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
            return f"static_idx must be a 1-D integer tensor, got {idx.dtype} of shape {list(idx.shape)}"
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.in_features or (idx[1:] <= idx[:-1]).any()):
            return f"static_idx must be increasing columns in [0, {self.in_features}), got {idx.tolist()[:16]}"
        if list(kept.shape) != [self.out_features, idx.numel()]:
            return f"static_weight must be [{self.out_features}, {idx.numel()}], got {list(kept.shape)}"
        return None

    def _from_bitsandbytes(self, state_dict, prefix, error_msgs) -> None:
        """Rewrite bitsandbytes' keys (in the copy load_state_dict works on) into this module's."""
        scb = state_dict.pop(prefix + "SCB")
        fmt = state_dict.pop(prefix + "weight_format", None)
        if fmt is not None and int(torch.as_tensor(fmt).item()) != _BNB_ROW_FORMAT:
            error_msgs.append(f"{prefix}weight_format: only bitsandbytes' row-major format ({_BNB_ROW_FORMAT}) "
                              f"loads, got {int(torch.as_tensor(fmt).item())}")
            return
        state_dict[prefix + "weight_scale"] = scb.float() / QMAX
        state_dict.setdefault(prefix + "static_idx", torch.zeros(0, dtype=torch.int32))
        state_dict.setdefault(prefix + "static_weight", self.static_weight.new_zeros(self.out_features, 0))
        state_dict.setdefault(prefix + "threshold", self.threshold)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"threshold={self._threshold}, static_columns={self.static_idx.numel()}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension must be in_features = {self.in_features}, got "
                             f"{input.shape[-1]} (input shape {list(input.shape)})")
        if input.dtype not in DTYPES:
            raise TypeError(f"input must be bfloat16, float16 or float32, got {input.dtype}")
        if input.device != self.weight.device:
            raise ValueError(f"input is on {input.device}, but the module's weight is on {self.weight.device}")
        x = input.reshape(-1, self.in_features)
        static_weight = self.static_weight.to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if x.is_cuda and 0 < x.shape[0] <= self.gemv_max_rows:
            y = ops.int8_gemv(x, self.weight, self.weight_scale, self.static_idx, static_weight, bias,
                              backend=self.backend)
        else:
            y = ops.int8_linear(x, self.weight, self.weight_scale, self.static_mask, self.static_idx, static_weight,
                                bias, self._threshold, backend=self.backend)
        return y.reshape(*input.shape[:-1], self.out_features)
