"""dfloat: lossless compression of bf16 / fp16 / fp32 tensors with Huffman-coded exponents, and of
uint8 tensors (packed integer codes) with Huffman-coded bytes.

    d = lowbit.dfloat.compress(weight)      # DFloatTensor, ~10.7 bits/weight for bf16 weights
    assert torch.equal(d.decompress().view(torch.int16), weight.view(torch.int16))
    lowbit.nn.DFloatLinear.from_linear(linear)

Format: docs/formats.md ("dfloat").
"""

from lowbit.dfloat import cli, demo
from lowbit.dfloat.format import (
    FORMAT_VERSION,
    DFloatTensor,
    compress,
    compress_state_dict,
    decompress_state_dict,
    entropy_bound,
)
from lowbit.dfloat.linear import DFloatLinear
from lowbit.registry import Family, register

__all__ = [
    "FORMAT_VERSION", "DFloatTensor", "compress", "compress_state_dict", "decompress_state_dict", "entropy_bound",
]

register(Family("dfloat", DFloatLinear, demo=demo.demo, add_cli=cli.add_cli,
                description="lossless: Huffman-coded exponents, bit-exact outputs"))
