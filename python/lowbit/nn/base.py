"""``LowbitLinear``: the protocol every family's drop-in for ``nn.Linear`` follows.

- ``in_features``, ``out_features``, ``bias`` (a frozen Parameter or None) and ``forward(input)``
  as ``nn.Linear``: input [..., in_features] -> [..., out_features]; differentiable with respect
  to the input (the compressed weight is frozen), so adapters such as LoRA train on top.
- ``from_linear(linear, ...)`` encodes a float layer; ``cls(in_features, out_features, bias, ...)``
  builds an empty one without encoding anything (on ``device="meta"`` too), which
  ``load_state_dict(..., assign=True)`` fills from a stored form.
- The compute dtype (``module.dtype``: bf16, fp16 or fp32) is that of the input and the output.
  ``.half()``, ``.to(torch.bfloat16)`` and the like change it and never re-quantize; stored
  tensors whose dtype is part of the format (scales, codes) keep their dtype.
- ``dequantize()`` gives the weight the layer stands for, [out, in] in the compute dtype.
- ``config()`` / ``cls.from_config(config)``: the constructor arguments as a JSON-friendly dict.
- ``narrow(dim, start, length)``: the layer of output rows (dim 0) or input columns (dim 1)
  ``[start, start + length)``, in the same stored form (a tensor-parallel shard); column shards
  carry no bias, so that the shards' outputs summed plus the bias give the layer's output.
- The backend of the layer's ops is resolved when it is built or moved (``backend=`` argument,
  else ``LOWBIT_BACKEND``, else auto), never inside forward.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_dtype(dtype, name: str = "dtype") -> torch.dtype:
    if dtype not in DTYPES:
        raise TypeError(f"{name} must be torch.bfloat16, torch.float16 or torch.float32, got {dtype}")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class LowbitLinear(nn.Module):
    """Base class of lowbit's drop-in linear layers (see the module docstring for the protocol)."""

    family: ClassVar[str] = ""
    # Buffers whose dtype belongs to the stored form: dtype conversions of the module skip them.
    fixed_dtype_buffers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype=torch.bfloat16,
                 device=None, backend: str | None = None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        self.in_features, self.out_features = in_features, out_features
        self._dtype = check_dtype(dtype)
        self._cuda = False  # whether the weight is on a CUDA device (set by _moved)
        self._resolved = False  # whether _moved has run: from then on a new backend re-resolves
        self.backend = backend
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # -- what a family provides -------------------------------------------------------------------
    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in_features] of the compute dtype, on the module's device -> [rows, out]."""
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The weight this layer stands for: [out_features, in_features] of the compute dtype."""
        raise NotImplementedError

    def _resolve_ops(self) -> None:
        """Pick the layer's ops for its current device (called when built and after moves)."""

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def _config_extra(self) -> dict:
        return {}

    def _narrow(self, dim: int, start: int, length: int) -> "LowbitLinear":
        """The shard ``narrow`` returns, its arguments checked."""
        raise NotImplementedError(f"{type(self).__name__} cannot be narrowed (sharded)")

    # -- the protocol ---------------------------------------------------------------------------
    @property
    def backend(self) -> str | None:
        """The backend the layer's ops run on (None: LOWBIT_BACKEND, else auto, when resolved).
        Setting it resolves the ops again."""
        return self.__dict__.get("_backend")

    @backend.setter
    def backend(self, value: str | None) -> None:
        self.__dict__["_backend"] = value
        if self.__dict__.get("_resolved"):
            self._resolve_ops()

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: of the input, the output and the bias."""
        return self._dtype

    def config(self) -> dict:
        """The constructor arguments, JSON-friendly: ``type(self).from_config(config)`` builds an
        empty layer of the same shape that this layer's state dict loads into."""
        return {"family": self.family, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "dtype": _dtype_name(self._dtype), **self._config_extra()}

    @classmethod
    def from_config(cls, config: dict, *, device=None, backend: str | None = None) -> "LowbitLinear":
        """An empty layer from ``config()``'s output (``device="meta"``: nothing allocated)."""
        config = dict(config)
        family = config.pop("family", cls.family)
        if family != cls.family:
            raise ValueError(f"config is for the {family!r} family, not {cls.family!r} ({cls.__name__})")
        dtype_name = config.pop("dtype", "bfloat16")
        dtype = getattr(torch, dtype_name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"config's dtype must name a torch dtype, got {dtype_name!r}")
        return cls(config.pop("in_features"), config.pop("out_features"), config.pop("bias", True), dtype=dtype,
                   device=device, backend=backend, **config)

    def narrow(self, dim: int, start: int, length: int) -> "LowbitLinear":
        """A new layer of this one's output rows (``dim=0``) or input columns (``dim=1``)
        ``[start, start + length)``, in the same stored form, dtype and backend: what one
        tensor-parallel rank holds of a column-parallel (dim 0) or row-parallel (dim 1) layer.
        A column shard has no bias (add it once to the sum of the shards' outputs)."""
        if dim not in (0, 1) or isinstance(dim, bool):
            raise ValueError(f"dim must be 0 (output rows) or 1 (input columns), got {dim!r}")
        size = (self.out_features, self.in_features)[dim]
        for name, value in (("start", start), ("length", length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if start + length > size:
            raise ValueError(f"start + length must be at most {('out_features', 'in_features')[dim]} = {size}, got "
                             f"{start} + {length}")
        return self._narrow(dim, start, length)

    def _narrowed_bias(self, module: "LowbitLinear", dim: int, start: int, length: int) -> None:
        """Give a row shard its part of the bias (column shards have none)."""
        if self.bias is not None and dim == 0:
            module.bias = nn.Parameter(self.bias.detach()[start:start + length].clone(), requires_grad=False)
        elif self.bias is not None:
            module.bias = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # One cheap test on the hot path; _refuse says what is wrong. A device mismatch within one
        # device type (cuda:0 / cuda:1) is left to the kernels' own checks.
        if input.dtype != self._dtype or input.shape[-1] != self.in_features or input.is_cuda != self._cuda:
            self._refuse(input)
        if input.dim() == 2:
            return self._forward_2d(input)
        y = self._forward_2d(input.reshape(-1, self.in_features))
        return y.reshape(*input.shape[:-1], self.out_features)

    def _refuse(self, input: torch.Tensor) -> None:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() == 0 or input.shape[-1] != self.in_features:
            got = input.shape[-1] if input.dim() else "a 0-dim tensor"
            raise ValueError(f"input's last dimension must be in_features = {self.in_features}, got {got} (input "
                             f"shape {list(input.shape)})")
        if input.dtype != self._dtype:
            raise TypeError(f"input is {_dtype_name(input.dtype)} but {type(self).__name__} computes in "
                            f"{_dtype_name(self._dtype)}: cast the input, or convert the module with "
                            f".to({input.dtype})")
        raise ValueError(f"input is on {input.device}, but {type(self).__name__}'s weight is on {self.device}")

    def _apply(self, fn, recurse=True):
        # The new compute dtype is what fn makes of a float tensor of the current one; it is
        # checked before anything moves, so an unsupported dtype (.double()) changes nothing.
        new_dtype = fn(torch.empty(0, dtype=self._dtype)).dtype
        check_dtype(new_dtype, "the module's new dtype")
        keep = {name: getattr(self, name) for name in self.fixed_dtype_buffers}
        super()._apply(fn, recurse)
        for name, before in keep.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:  # the values before the cast, on the new device
                meta = "meta" in (before.device.type, after.device.type)
                setattr(self, name, torch.empty_like(after, dtype=before.dtype) if meta else before.to(after.device))
        self._dtype = new_dtype
        self._moved()
        return self

    def _moved(self) -> None:
        """After construction, loading or a move: settle what depends on the device and dtype."""
        self._cuda = self.device.type == "cuda"
        self._resolve_ops()
        self._resolved = True

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={_dtype_name(self._dtype)}")
