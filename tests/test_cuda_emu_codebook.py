"""csrc/cuda/codebook.cu run on the CPU through the CUDA emulation (tests/cuda_emu.py; its tensor-core
``mma.sync.m16n8k16`` follows the PTX ISA's fragment layout, its ``cp.async`` copies at once): the
GEMV (up to 16 rows) and the tiled GEMM against the reference within the bound of
tests/test_codebook_cuda.py, for every configuration, x and codebook dtype, odd shapes and fp32
codebooks (three bf16 terms per value)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from conftest import param_id
from test_codebook_cuda import CONFIGS, X_DTYPES, assert_close_to_reference, config_id, make_layer, make_x

cuda_emu = pytest.importorskip("cuda_emu")

CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


@pytest.fixture(scope="module")
def lib():
    return cuda_emu.library("codebook")


def emu_matmul(lib, x, codes, codebooks, scales, bias):
    rows = x.shape[0]
    out_features, in_groups, count = codes.shape
    y = torch.full((rows, out_features), float("nan"), dtype=x.dtype)
    dtypes = (ctypes.c_int * 3)(CODES[x.dtype], CODES[codebooks.dtype], CODES[scales.dtype])
    nbits = 8 if codes.dtype == torch.uint8 else 16
    dims = (ctypes.c_int64 * 5)(out_features, in_groups, count, nbits, codebooks.shape[-1])
    p = cuda_emu.pointer
    err = lib.emu_codebook_matmul(dtypes, p(x), ctypes.c_int64(rows), p(codes), p(codebooks), p(scales), dims,
                                  p(bias), p(y))
    assert err == 0, f"cudaError {err}"
    return y


# (rows, out_features, in_groups, bias): the GEMV's row counts and the GEMM's (17+), partial tiles.
SHAPES = [(1, 7, 3, True), (2, 97, 1, False), (7, 1, 129, True), (16, 97, 33, False), (3, 40, 64, True),
          (17, 7, 3, True), (40, 97, 20, False)]


@pytest.mark.parametrize("shape", SHAPES, ids=param_id)
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_matmul_matches_reference(lib, config, shape):
    rows, out, groups, has_bias = shape
    seed = rows * 1009 + out * 13 + groups
    x_dtype = X_DTYPES[seed % 3]
    book_dtype = [torch.float16, torch.bfloat16][seed % 2]
    codes, codebooks, scales = make_layer(out, groups, config, book_dtype, book_dtype, seed)
    x = make_x(rows, groups * config[2], x_dtype, seed + 1)
    bias = torch.randn(out, generator=torch.Generator().manual_seed(seed + 2)).to(x_dtype) if has_bias else None
    assert_close_to_reference(emu_matmul(lib, x, codes, codebooks, scales, bias), x, codes, codebooks, scales, bias)


@pytest.mark.parametrize("rows", [5, 20], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("config", [(2, 8, 8), (1, 16, 4)], ids=config_id)
def test_matmul_fp32_codebooks(lib, config, rows):
    codes, codebooks, scales = make_layer(33, 7, config, torch.float32, torch.bfloat16, seed=rows)
    x = make_x(rows, 7 * config[2], torch.float16, seed=rows + 1)
    bias = torch.randn(33, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    assert_close_to_reference(emu_matmul(lib, x, codes, codebooks, scales, bias), x, codes, codebooks, scales, bias)


def test_a_wrong_product_is_caught(lib):
    codes, codebooks, scales = make_layer(16, 8, (2, 8, 8), torch.bfloat16, torch.bfloat16, seed=4)
    x = make_x(3, 64, torch.bfloat16, seed=5)
    y = emu_matmul(lib, x, codes, codebooks, scales, None)
    assert_close_to_reference(y, x, codes, codebooks, scales, None)
    codes[5, 2, 0] ^= 1  # one code of one output row changed
    with pytest.raises(AssertionError):
        assert_close_to_reference(y, x, codes, codebooks, scales, None)
