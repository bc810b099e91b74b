"""The codebook encoder: W [out, in] -> codes, codebooks and per-row scales (AQLM's layout; the
decoding rule is ``lowbit.reference.codebook``).

What it minimizes is the weighted error sum_{n,k} h_k (W[n, k] - What[n, k])^2, with h the
importance of each input feature: the diagonal of XᵀX over calibration inputs X (how much each
input weight moves the layer's output), or ones without calibration (plain MSE). Steps, all on
the layer's groups of g consecutive input weights:

1. scales: each row's weighted RMS; the groups of W / scales are the points to fit, each point
   weighing h (of its input features) times its row's scale squared, so that fitting them is
   fitting W.
2. residual k-means: codebook 0 by weighted Lloyd iterations on the points (initialized from
   points drawn with the seeded generator), codebook 1 likewise on what codebook 0 leaves.
3. alternating refinement: each codebook's codes re-chosen exactly given the others' (the nearest
   entry to the point minus the other codewords: coordinate descent over the codes, which never
   increases the error), then each codebook's entries set to the weighted mean of what they stand
   for given the codes (its least-squares optimum with the others fixed).
4. codebooks rounded to their stored dtype, then each row's scale refit by least squares against
   the rounded codebooks.

The nearest-codeword search, the hot loop, is the ``lowbit::_codebook_nearest`` op (C++ on the CPU,
Triton on a GPU). Deterministic given the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit import ops
from lowbit.reference import codebook as _ref


@dataclass
class CodebookWeight:
    """A layer's stored form: ``codes`` [out, in / g, C] (uint8, or int16 for 16-bit codes),
    ``codebooks`` [C, 2^B, 1, g], ``scales`` [out, 1, 1, 1]."""

    codes: torch.Tensor
    codebooks: torch.Tensor
    scales: torch.Tensor


def check_config(num_codebooks, nbits, group_size) -> None:
    """Refuse a configuration without kernels, naming the argument."""
    for name, value, allowed in (("num_codebooks", num_codebooks, _ref.NUM_CODEBOOKS), ("nbits", nbits, _ref.NBITS),
                                 ("group_size", group_size, _ref.GROUP_SIZES)):
        if isinstance(value, bool) or value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def bits_per_weight(out_features: int, in_features: int, num_codebooks: int, nbits: int, group_size: int,
                    codebook_bytes: int = 2, scale_bytes: int = 4) -> float:
    """Stored bits per weight of a layer, codebooks and scales counted (bias not)."""
    codes = out_features * (in_features // group_size) * num_codebooks * nbits
    books = num_codebooks * (1 << nbits) * group_size * codebook_bytes * 8
    return (codes + books + out_features * scale_bytes * 8) / (out_features * in_features)


def importance(calibration, in_features: int, device) -> torch.Tensor | None:
    """h [in_features] fp32 (mean 1) from ``calibration``: None (-> None: plain MSE), a dict
    ``{"xtx": XᵀX [in, in], "rows": n}`` (lowbit.quantize's "xtx" statistic), or sample inputs
    [..., in_features] (a tensor or a list of them). A small floor keeps features that the
    calibration never excited from being ignored."""
    if calibration is None:
        return None
    if isinstance(calibration, dict):
        xtx = calibration.get("xtx")
        if not isinstance(xtx, torch.Tensor) or list(xtx.shape) != [in_features, in_features]:
            shape = list(xtx.shape) if isinstance(xtx, torch.Tensor) else type(xtx).__name__
            raise ValueError(f"calibration['xtx'] must be a tensor [{in_features}, {in_features}], got {shape}")
        diag = xtx.diagonal().double()
    else:
        parts = calibration if isinstance(calibration, (list, tuple)) else [calibration]
        diag = torch.zeros(in_features, dtype=torch.float64, device=device)
        for part in parts:
            if not isinstance(part, torch.Tensor) or part.shape[-1:] != (in_features,):
                shape = list(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
                raise ValueError(f"calibration must hold tensors [..., in_features = {in_features}], got {shape}")
            x = part.detach().reshape(-1, in_features).to(device=device, dtype=torch.float64)
            diag += x.nan_to_num(0.0, posinf=0.0, neginf=0.0).square().sum(0)
    diag = diag.to(device).nan_to_num(0.0).clamp_min(0.0)
    mean = diag.mean()
    if not mean > 0:
        return None
    h = diag / mean
    return (h + 1e-2).float()  # the floor: about 1% of an average feature


def _weighted_means(points, weights, index, entries, previous, generator):
    """Per entry e, the weighted mean of the points assigned to it (sum_p w_p x_p / sum_p w_p,
    per dimension); an entry no point chose is reseeded to a random point."""
    g = points.shape[1]
    num = torch.zeros(entries, g, dtype=torch.float64, device=points.device)
    den = torch.zeros(entries, g, dtype=torch.float64, device=points.device)
    idx = index.long()
    num.index_add_(0, idx, (weights * points).double())
    den.index_add_(0, idx, weights.double())
    used = den > 0
    out = torch.where(used, num / den.clamp_min(1e-300), previous.double()).float()
    empty = (~used.any(1)).nonzero().flatten()
    if empty.numel():
        pick = torch.randint(0, points.shape[0], (empty.numel(),), generator=generator, device="cpu")
        out[empty] = points[pick.to(points.device)]
    return out


def _kmeans(points, weights, entries, iterations, generator):
    """Weighted Lloyd iterations -> (codebook [entries, g] fp32, index [P] int32)."""
    count = points.shape[0]
    pick = torch.randperm(count, generator=generator, device="cpu")[:entries].to(points.device)
    book = points[pick].clone()
    if book.shape[0] < entries:  # fewer points than entries: the rest start at random points
        extra = torch.randint(0, count, (entries - book.shape[0],), generator=generator, device="cpu")
        book = torch.cat([book, points[extra.to(points.device)]])
    index = ops.codebook_nearest(points, book, weights)
    for _ in range(iterations):
        book = _weighted_means(points, weights, index, entries, book, generator)
        index = ops.codebook_nearest(points, book, weights)
    return book, index


def encode(weight: torch.Tensor, num_codebooks: int = 2, nbits: int = 8, group_size: int = 8, calibration=None, *,
           kmeans_iterations: int = 12, refinements: int = 4, seed: int = 0,
           codebook_dtype: torch.dtype = torch.float16, scale_dtype: torch.dtype = torch.float32) -> CodebookWeight:
    """Encode W [out, in] (bf16, fp16 or fp32; in a multiple of group_size) -> CodebookWeight.

    calibration: None, a dict {"xtx", "rows"}, or sample inputs (see ``importance``).
    kmeans_iterations: Lloyd iterations per codebook; refinements: rounds of code re-selection and
    codebook updates. seed: the generator of every random choice (the result is deterministic)."""
    check_config(num_codebooks, nbits, group_size)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise TypeError(f"weight must be a 2-D float tensor, got {getattr(weight, 'dtype', type(weight).__name__)}")
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"in_features ({in_features}) must be a multiple of group_size ({group_size})")
    for name, dtype in (("codebook_dtype", codebook_dtype), ("scale_dtype", scale_dtype)):
        if dtype not in _ref.CODEBOOK_DTYPES:
            raise TypeError(f"{name} must be torch.bfloat16, torch.float16 or torch.float32, got {dtype}")
    device = weight.device
    generator = torch.Generator().manual_seed(seed)
    entries, groups = 1 << nbits, in_features // group_size
    w = weight.detach().float().nan_to_num(0.0)
    h = importance(calibration, in_features, device)
    hk = torch.ones(in_features, device=device) if h is None else h.to(device)
    scale = ((w.square() * hk).sum(1) / hk.sum()).sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # Points: the groups of W / scale; each weighs h of its features times its row's scale squared.
    points = (w / scale[:, None]).reshape(-1, group_size).contiguous()
    weights = (hk.reshape(1, groups, group_size) * scale.square()[:, None, None]).reshape(-1, group_size).contiguous()

    books, index = [], []
    residual = points
    for _ in range(num_codebooks):
        book, idx = _kmeans(residual, weights, entries, kmeans_iterations, generator)
        books.append(book)
        index.append(idx)
        residual = (residual - book[idx.long()]).contiguous()
    for _ in range(refinements if num_codebooks > 1 else 0):
        for c in range(num_codebooks):
            others = sum(books[o][index[o].long()] for o in range(num_codebooks) if o != c)
            target = (points - others).contiguous()
            index[c] = ops.codebook_nearest(target, books[c], weights)
            books[c] = _weighted_means(target, weights, index[c], entries, books[c], generator)
    if num_codebooks == 1 and refinements:
        books[0] = _weighted_means(points, weights, index[0], entries, books[0], generator)
        index[0] = ops.codebook_nearest(points, books[0], weights)

    codebooks = torch.stack(books).reshape(num_codebooks, entries, 1, group_size).to(codebook_dtype)
    codes = torch.stack(index, 1).reshape(out_features, groups, num_codebooks)
    codes = codes.to(torch.uint8) if nbits == 8 else codes.to(torch.int32).to(torch.int16)  # 16-bit: two's complement
    # Each row's scale, refit against the stored codebooks: argmin_s sum_k h_k (W - s U)^2.
    unscaled = _ref.dequantize(codes, codebooks, torch.ones(out_features, 1, 1, 1, device=device))
    num = (hk * w * unscaled).sum(1)
    den = (hk * unscaled.square()).sum(1)
    refit = torch.where(den > 0, num / den.clamp_min(1e-30), scale)
    scales = refit.reshape(out_features, 1, 1, 1).to(scale_dtype)
    return CodebookWeight(codes.contiguous(), codebooks.contiguous(), scales.contiguous())
