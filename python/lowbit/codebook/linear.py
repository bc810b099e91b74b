"""``CodebookLinear``: an ``nn.Linear`` whose weight is stored as additive vector quantization codes
(AQLM's layout), 2 bits per weight in the default 2x8 configuration."""

from __future__ import annotations

import torch
from torch import nn

from lowbit import ops, stored
from lowbit.codebook.encoder import CodebookWeight, check_config, encode
from lowbit.errors import FormatError
from lowbit.nn.base import LowbitLinear
from lowbit.reference import codebook as _ref

MAGIC = stored.magic_number("lbcb")
FORMAT_VERSION = 1
_DTYPE_CODES = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}
_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
# The stored tensors besides the header, in checksum order ("bias" is the module's parameter).
STORED = ("codes", "codebooks", "scales", "bias")


def _dtype_arg(value, name: str) -> torch.dtype:
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    if value not in _ref.CODEBOOK_DTYPES:
        raise TypeError(f"{name} must be torch.bfloat16, torch.float16 or torch.float32, got {value!r}")
    return value


class CodebookLinear(LowbitLinear):
    """y = x W^T + b with W stored as codes into learned codebooks (``lowbit.reference.codebook``).

    Each group of ``group_size`` consecutive input weights of a row is the sum of
    ``num_codebooks`` codewords, one from each codebook of 2^``nbits`` entries, times the row's
    scale: 2x8 (two codebooks of 256 entries) and 1x16 at group size 8 store 2 bits per weight plus
    the codebooks. ``from_linear`` encodes a float layer (``lowbit.codebook.encoder``).

    Stored form (the state dict, docs/formats.md "codebook"): ``codes`` [out, in / g, C] (uint8,
    or int16 for 16-bit codes), ``codebooks`` [C, 2^B, 1, g], ``scales`` [out, 1, 1, 1], the
    ``bias`` parameter and ``weight_header`` (magic, version, CRC-32). An AQLM ``QuantizedLinear``
    state dict (``codes`` int8/int16, ``codebooks``, ``scales``, ``bias``; out_group_size 1) loads
    too and computes AQLM's formula.

    The codebooks and scales keep their stored dtypes when the module's compute dtype changes.
    """

    family = "codebook"
    fixed_dtype_buffers = ("codebooks", "scales")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, num_codebooks: int = 2,
                 nbits: int = 8, group_size: int = 8, *, dtype=torch.bfloat16, device=None,
                 backend: str | None = None, codebook_dtype=torch.float16, scale_dtype=torch.float16):
        super().__init__(in_features, out_features, bias, dtype=dtype, device=device, backend=backend)
        check_config(num_codebooks, nbits, group_size)
        if in_features % group_size:
            raise ValueError(f"in_features ({in_features}) must be a multiple of group_size ({group_size})")
        self.num_codebooks, self.nbits, self.group_size = num_codebooks, nbits, group_size
        books_dtype, scales_dtype = _dtype_arg(codebook_dtype, "codebook_dtype"), _dtype_arg(scale_dtype, "scale_dtype")
        # An empty layer (all-zero codes and codebooks) until load_state_dict fills it.
        self._set_weight(CodebookWeight(
            torch.zeros(out_features, in_features // group_size, num_codebooks, dtype=_ref.CODE_DTYPES[nbits],
                        device=device),
            torch.zeros(num_codebooks, 1 << nbits, 1, group_size, dtype=books_dtype, device=device),
            torch.ones(out_features, 1, 1, 1, dtype=scales_dtype, device=device)))
        self._moved()

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_codebooks: int = 2, nbits: int = 8, group_size: int = 8,
                    calibration=None, *, seed: int = 0, kmeans_iterations: int = 12, refinements: int = 4,
                    codebook_dtype=torch.float16, backend: str | None = None) -> "CodebookLinear":
        """Encode ``linear``'s weight (bf16, fp16 or fp32; in_features a multiple of group_size);
        the bias is kept as it is, and the layer computes in the weight's dtype.

        calibration: None (plain MSE), sample inputs [..., in_features] (a tensor or a list), or
        ``{"xtx": XᵀX, "rows": n}`` (what ``lowbit.quantize(..., calibration=...)`` collects): each
        input feature's error then weighs its mean square activation. seed: the encoder's
        generator (the result is deterministic). Scales are stored in fp16 when every one is a
        normal fp16 number, else in fp32."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        check_config(num_codebooks, nbits, group_size)
        weight = linear.weight.detach()
        encoded = encode(weight, num_codebooks, nbits, group_size, calibration, seed=seed,
                         kmeans_iterations=kmeans_iterations, refinements=refinements,
                         codebook_dtype=_dtype_arg(codebook_dtype, "codebook_dtype"))
        scales = encoded.scales.abs()
        fp16_ok = bool(((scales >= torch.finfo(torch.float16).tiny) | (scales == 0)).all()
                       and (scales <= torch.finfo(torch.float16).max).all())
        scale_dtype = torch.float16 if fp16_ok else torch.float32
        encoded.scales = encoded.scales.to(scale_dtype)
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, num_codebooks, nbits,
                     group_size, dtype=weight.dtype, device="meta", backend=backend,
                     codebook_dtype=encoded.codebooks.dtype, scale_dtype=scale_dtype)
        module._set_weight(encoded)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().to(weight.dtype, copy=True), requires_grad=False)
        module._moved()
        return module

    def _set_weight(self, weight: CodebookWeight) -> None:
        for name in ("codes", "codebooks", "scales"):
            self.register_buffer(name, getattr(weight, name))

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def _resolve_ops(self) -> None:
        backend = "reference" if self.codes.device.type == "meta" else self.backend
        self._matmul = ops.op("codebook_matmul", backend, self.codes.device)

    def _config_extra(self) -> dict:
        return {"num_codebooks": self.num_codebooks, "nbits": self.nbits, "group_size": self.group_size,
                "codebook_dtype": str(self.codebooks.dtype).removeprefix("torch."),
                "scale_dtype": str(self.scales.dtype).removeprefix("torch.")}

    def _narrow(self, dim: int, start: int, length: int) -> "CodebookLinear":
        # Every shard keeps the codebooks whole; rows take their codes and scales, columns whole
        # input groups of codes (a group cannot be split: its codeword spans group_size columns).
        stop = start + length
        if dim == 0:
            part = CodebookWeight(self.codes[start:stop].clone(), self.codebooks.clone(), self.scales[start:stop].clone())
            shape = (self.in_features, length)
        else:
            g = self.group_size
            if start % g or length % g:
                raise ValueError(f"a column shard of a codebook layer must hold whole input groups of group_size = "
                                 f"{g} columns; columns [{start}, {stop}) split a group (start and length must be "
                                 f"multiples of {g})")
            part = CodebookWeight(self.codes[:, start // g:stop // g].clone(), self.codebooks.clone(),
                                  self.scales.clone())
            shape = (length, self.out_features)
        module = type(self)(*shape, self.bias is not None and dim == 0, self.num_codebooks, self.nbits,
                            self.group_size, dtype=self._dtype, device="meta", backend=self.backend,
                            codebook_dtype=self.codebooks.dtype, scale_dtype=self.scales.dtype)
        module._set_weight(part)
        self._narrowed_bias(module, dim, start, length)
        module._moved()
        return module

    def dequantize(self) -> torch.Tensor:
        return ops.codebook_dequantize(self.codes, self.codebooks, self.scales, self._dtype, backend=self.backend)

    def bits_per_weight(self) -> float:
        """Stored bits per weight: codes, codebooks and scales (bias not counted)."""
        total = sum(t.numel() * t.element_size() for t in (self.codes, self.codebooks, self.scales)) * 8
        return total / max(1, self.in_features * self.out_features)

    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.codes, self.codebooks, self.scales, self.bias)

    # -- stored form ------------------------------------------------------------------------------
    def _header_fields(self) -> list[int]:
        return [self.out_features, self.in_features, self.num_codebooks, self.nbits, self.group_size,
                _DTYPE_CODES[self.codebooks.dtype], _DTYPE_CODES[self.scales.dtype]]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight_header"] = stored.make_header(
            MAGIC, FORMAT_VERSION, self._header_fields(), [destination.get(prefix + name) for name in STORED])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        header = state_dict.get(prefix + "weight_header")
        if header is None and prefix + "codes" in state_dict:
            problem = self._from_aqlm(state_dict, prefix)
        else:
            problem = self._stored_problem(state_dict, prefix)
        if problem is not None:
            error_msgs.append(f"{prefix}: {problem}")
            return
        state_dict.pop(prefix + "weight_header", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._moved()

    def _stored_problem(self, state_dict, prefix) -> str | None:
        """Why the stored tensors cannot be this module's, or None."""
        header = state_dict.get(prefix + "weight_header")
        if header is None:
            return None  # load_state_dict reports the missing keys
        tensors = [state_dict.get(prefix + name) for name in STORED]
        try:
            _, fields = stored.read_header(header, magic=MAGIC, versions=(FORMAT_VERSION,), nfields=7,
                                           tensors=tensors, what=f"{prefix}weight (codebook)")
        except FormatError as exc:
            return str(exc)
        want = self._header_fields()
        if fields[:5] != want[:5]:
            return (f"stored layer is [{fields[0]}, {fields[1]}] with {fields[2]}x{fields[3]} codebooks of group size "
                    f"{fields[4]}; this layer is [{want[0]}, {want[1]}], {want[2]}x{want[3]}, group size {want[4]}")
        codes, books, scales = tensors[:3]
        for name, t, dtype in (("codebooks", books, _DTYPES.get(fields[5])), ("scales", scales, _DTYPES.get(fields[6]))):
            if t is not None and t.dtype != dtype:
                return f"{name} are {t.dtype}, the header says {dtype}"
            if t is not None and t.dtype != getattr(self, name).dtype:
                return (f"{name} are stored in {t.dtype}; this layer was built for {getattr(self, name).dtype} "
                        f"(build it with from_config of the stored config)")
        if codes is not None and books is not None and scales is not None:
            try:
                ops.codebook.check_weight(codes, books, scales)
            except (TypeError, ValueError) as exc:
                return str(exc)
        return None

    def _from_aqlm(self, state_dict, prefix) -> str | None:
        """Rewrite an AQLM QuantizedLinear state dict (in the copy load_state_dict works on) into
        this module's form: 8-bit codes from int8 to uint8 (the same bits: AQLM reads them modulo
        256), and the header it lacks. Returns what is wrong, or None."""
        codes, books = state_dict.get(prefix + "codes"), state_dict.get(prefix + "codebooks")
        scales = state_dict.get(prefix + "scales")
        if codes is None or books is None or scales is None:
            return "an AQLM state dict needs codes, codebooks and scales"
        if codes.dtype == torch.int8:
            codes = codes.view(torch.uint8)
        if books.dim() == 4 and books.shape[2] != 1:
            return f"codebooks have out_group_size {books.shape[2]}; only AQLM's out_group_size 1 loads"
        if books.dim() == 4 and books.shape[1] not in (256, 65536):
            return (f"codebooks have {books.shape[1]} entries; lowbit runs codebooks of 2^8 or 2^16 entries "
                    f"(nbits 8 or 16)")
        try:
            ops.codebook.check_weight(codes, books, scales)
        except (TypeError, ValueError) as exc:
            return f"not a loadable AQLM layer: {exc}"
        got = [codes.shape[0], codes.shape[1] * books.shape[3], codes.shape[2], 8 if codes.dtype == torch.uint8 else 16,
               books.shape[3]]
        want = self._header_fields()[:5]
        if got != want:
            return (f"the AQLM layer is [{got[0]}, {got[1]}] with {got[2]}x{got[3]} codebooks of group size {got[4]}; "
                    f"this layer is [{want[0]}, {want[1]}], {want[2]}x{want[3]}, group size {want[4]}")
        state_dict[prefix + "codes"] = codes
        state_dict[prefix + "codebooks"] = books.to(self.codebooks.dtype)
        state_dict[prefix + "scales"] = scales.to(self.scales.dtype)
        return None

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, codebooks={self.num_codebooks}x{self.nbits}, group_size={self.group_size}")
