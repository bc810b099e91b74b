"""``DFloatLinear``: an ``nn.Linear`` whose weight is stored losslessly in the dfloat format."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import ops
from lowbit.dfloat.format import STREAM, DFloatTensor, compress
from lowbit.errors import FormatError

MODES = ("exact", "fused")
FUSED_MAX_ROWS = 8


class DFloatLinear(nn.Module):
    """y = x W^T + b with W kept compressed (dfloat, about 11 bits/weight for trained bf16 weights).

    mode="exact" (default): decode W, then the same ``F.linear`` as ``nn.Linear``; the output is
    bit-identical to the original layer's.
    mode="fused": for at most 8 rows of input, one kernel decodes W and multiplies as it goes,
    never writing W to memory (``lowbit::dfloat_gemv``); it accumulates in fp32 and rounds once, so
    it can differ from ``nn.Linear`` (whose summation order is cuBLAS's or the CPU BLAS's) by fp32
    rounding: within a few units in the last place of the output dtype. Larger inputs use the
    exact path.

    The compressed weight is held in buffers ``weight_header``, ``weight_codes``, ``weight_raw``,
    ``weight_gaps``, ``weight_block_starts``, ``weight_code_lengths``: the dfloat stored form, with
    its checksum, so ``state_dict()`` is the stored form and ``load_state_dict`` validates it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype=torch.bfloat16,
                 device=None, mode: str = "exact", backend: str | None = None):
        super().__init__()
        # An empty module holds the code of an all-zero weight until load_state_dict fills it.
        weight = compress(torch.zeros(out_features, in_features, dtype=dtype, device=device))
        self._setup(weight, torch.zeros(out_features, dtype=dtype, device=device) if bias else None, mode, backend)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, mode: str = "exact", backend: str | None = None) -> "DFloatLinear":
        """Compress ``linear``'s weight (bf16, fp16 or fp32); the bias is kept as it is."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        module._setup(compress(linear.weight.detach()), bias, mode, backend)
        return module

    def _setup(self, weight: DFloatTensor, bias: torch.Tensor | None, mode: str, backend: str | None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.out_features, self.in_features = weight.shape
        self.mode, self.backend = mode, backend
        self._set_weight(weight)
        if bias is not None:
            self.bias = nn.Parameter(bias, requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # The stored form lives in buffers; the decode table is derived and not saved.
    def _set_weight(self, weight: DFloatTensor) -> None:
        for name, t in weight.to_dict().items():
            self.register_buffer(f"weight_{name}", t)
        self.register_buffer("weight_table", weight.table, persistent=False)
        self._weight_meta = (weight.shape, weight.dtype, weight.total_bits, weight.window_bits,
                             weight.windows_per_block)

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
        return self._weight_meta[1]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        stored = {name: state_dict[prefix + "weight_" + name] for name in ("header",) + STREAM
                  if prefix + "weight_" + name in state_dict}
        if len(stored) == len(STREAM) + 1:
            device = self.weight_codes.device
            try:
                weight = DFloatTensor.from_dict({k: v.to(device) for k, v in stored.items()})
            except FormatError as exc:
                error_msgs.append(f"{prefix}weight: {exc}")
                return
            if weight.shape != (self.out_features, self.in_features):
                error_msgs.append(f"{prefix}weight: stored shape {list(weight.shape)}, module is "
                                  f"[{self.out_features}, {self.in_features}]")
                return
            self._set_weight(weight)
            # The buffers now match the stored tensors; let the default copy (and key checks) run.
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        w = self.compressed_weight
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.weight_dtype}, mode={self.mode}, bits_per_weight={w.bits_per_weight:.2f}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.shape[-1] != self.in_features:
            raise ValueError(f"input's last dimension must be in_features = {self.in_features}, got "
                             f"{input.shape[-1]} (input shape {list(input.shape)})")
        w = self.compressed_weight
        rows = input.numel() // self.in_features if self.in_features else 0
        if self.mode == "fused" and input.dtype == self.weight_dtype and 0 < rows <= FUSED_MAX_ROWS:
            out = ops.dfloat_gemv(input.reshape(rows, self.in_features), *w.stream_args(), self.out_features,
                                  w.total_bits, w.window_bits, w.windows_per_block, self.bias, backend=self.backend)
            return out.reshape(*input.shape[:-1], self.out_features)
        return F.linear(input, w.decompress(backend=self.backend), self.bias)
