"""Reference of the dfloat format: the spec of its encoder and of ``lowbit::dfloat_decode``.

An element is split into an 8-bit *symbol*, which is entropy-coded, and *raw* bits stored as they
are (docs/formats.md, "dfloat"):

    bf16  s eeeeeeee mmmmmmm          symbol = e (8 bits)             raw = s mmmmmmm (1 byte)
    fp16  s eeeee mmmmmmmmmm          symbol = eeeee mmm (bits 14..7) raw = s mmmmmmm (1 byte)
    fp32  s eeeeeeee m{23}            symbol = e (8 bits)             raw = s m{23} (3 bytes, LE)
    uint8 bbbbbbbb                    symbol = the byte               raw = none (0 bytes)

For 16-bit types the symbol is bits 14..7 and raw is bit 15 followed by bits 6..0, one code path for
both; in fp16 the symbol carries 3 mantissa bits along with the 5 exponent bits. uint8 codes whole
bytes, e.g. packed 2- or 4-bit integer codes, whose byte values are as skewed as the codes are.

Symbols are coded with a canonical Huffman code limited to MAX_CODE_LEN bits. The code stream is
the codes of symbols 0..n-1 concatenated, read least-significant bit first: code bit k of a code
starting at stream bit p is stream bit p + k, and stream bit q is bit (q % 8) of byte q // 8. The
first code bit is the most significant bit of the canonical code, so a decoder peeks MAX_CODE_LEN
bits and looks them up in a table indexed by the bit-reversed code.

For parallel decoding the stream is cut into windows of ``window_bits`` bits. Window j's symbols
are those whose code *starts* in [j * W, (j + 1) * W); ``gaps[j]`` is the offset of the first of
them from j * W (always < MAX_CODE_LEN). Windows are grouped into blocks of ``windows_per_block``;
``block_starts[b]`` is the index of block b's first symbol and ``block_starts[-1] = n``.
"""

from __future__ import annotations

import torch

from lowbit.errors import FormatError
from lowbit.reference.bitpack import pack_bits, unpack_bits

MAX_CODE_LEN = 12
NUM_SYMBOLS = 256

# dtype -> (bits per element, bit position of the symbol's low bit, raw bytes per element)
LAYOUTS = {
    torch.bfloat16: (16, 7, 1),
    torch.float16: (16, 7, 1),
    torch.float32: (32, 23, 3),
    torch.uint8: (8, 0, 0),
}
# The dtypes that dfloat_gemv multiplies by; uint8 streams only decode.
FLOAT_DTYPES = tuple(dtype for dtype in LAYOUTS if dtype.is_floating_point)
_INT_VIEW = {8: torch.uint8, 16: torch.int16, 32: torch.int32}


def _bits_of(x: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a tensor of a LAYOUTS dtype as int64 in [0, 2^bits), flattened."""
    width = LAYOUTS[x.dtype][0]
    return x.contiguous().view(_INT_VIEW[width]).reshape(-1).to(torch.int64) & ((1 << width) - 1)


def split_fields(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[...] of a LAYOUTS dtype -> symbols uint8 [n], raw uint8 [n * raw_bytes] (little-endian per
    element; empty for uint8)."""
    width, shift, raw_bytes = LAYOUTS[x.dtype]
    bits = _bits_of(x)
    symbols = (bits >> shift) & 0xFF
    if raw_bytes == 0:  # uint8: the symbol is the whole byte
        return symbols.to(torch.uint8), torch.empty(0, dtype=torch.uint8, device=x.device)
    sign = bits >> (width - 1)
    raw = (sign << (8 * raw_bytes - 1)) | (bits & ((1 << shift) - 1))
    raw_le = torch.stack([(raw >> (8 * k)) & 0xFF for k in range(raw_bytes)], dim=-1)
    return symbols.to(torch.uint8), raw_le.reshape(-1).to(torch.uint8)


def merge_fields(symbols: torch.Tensor, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of split_fields: -> [n] of ``dtype``, bit for bit."""
    width, shift, raw_bytes = LAYOUTS[dtype]
    if raw_bytes == 0:  # uint8: the symbols are the elements (copied: the result never aliases them)
        return symbols.reshape(-1).to(torch.uint8, copy=True)
    raw = raw.to(torch.int64).reshape(-1, raw_bytes)
    raw = sum(raw[:, k] << (8 * k) for k in range(raw_bytes))
    sign = raw >> (8 * raw_bytes - 1)
    bits = (sign << (width - 1)) | (symbols.to(torch.int64) << shift) | (raw & ((1 << shift) - 1))
    bits = torch.where(bits >= (1 << (width - 1)), bits - (1 << width), bits)  # to signed
    return bits.to(_INT_VIEW[width]).view(dtype)


def histogram(symbols: torch.Tensor) -> torch.Tensor:
    """uint8 [n] -> int64 [256] counts."""
    return torch.bincount(symbols.to(torch.int64), minlength=NUM_SYMBOLS)


def code_lengths(counts: torch.Tensor, max_len: int = MAX_CODE_LEN) -> torch.Tensor:
    """Optimal prefix-code lengths no longer than ``max_len`` (package-merge). int64 [256] -> uint8 [256].

    Symbols that never occur get length 0. A single used symbol gets length 1.
    """
    used = [(int(c), s) for s, c in enumerate(counts.tolist()) if c > 0]
    lengths = torch.zeros(NUM_SYMBOLS, dtype=torch.int64)
    if len(used) == 1:
        lengths[used[0][1]] = 1
    if len(used) >= 2:
        if len(used) > (1 << max_len):
            raise ValueError(f"{len(used)} symbols cannot be coded in {max_len} bits")
        # An item is (weight, tie-break key, how often each symbol occurs in it). Leaves sort by
        # (count, symbol), packages after leaves of equal weight, so the result is deterministic.
        leaves = []
        for order, (c, s) in enumerate(sorted(used)):
            members = torch.zeros(NUM_SYMBOLS, dtype=torch.int64)
            members[s] = 1
            leaves.append((c, 0, order, members))
        current = leaves
        for _ in range(max_len - 1):
            packages = [
                (current[i][0] + current[i + 1][0], 1, i, current[i][3] + current[i + 1][3])
                for i in range(0, len(current) - 1, 2)
            ]
            current = sorted(leaves + packages, key=lambda item: item[:3])
        for item in current[: 2 * (len(used) - 1)]:
            lengths += item[3]
    return lengths.to(torch.uint8)


def canonical_codes(lengths: torch.Tensor) -> list[int]:
    """Canonical codes (most significant bit first) from code lengths: shorter codes first, then by symbol."""
    lengths = lengths.tolist()
    codes = [0] * NUM_SYMBOLS
    code, prev_len = 0, 0
    for length, s in sorted((l, s) for s, l in enumerate(lengths) if l > 0):
        code <<= length - prev_len
        codes[s] = code
        code += 1
        prev_len = length
    return codes


def _reverse(value: int, width: int) -> int:
    return int(f"{value:0{width}b}"[::-1], 2) if width else 0


def check_lengths(lengths: torch.Tensor) -> str | None:
    """None if ``lengths`` form a valid prefix code of at most MAX_CODE_LEN bits, else what is wrong."""
    if lengths.dtype != torch.uint8 or lengths.shape != (NUM_SYMBOLS,):
        return f"code lengths must be uint8 [{NUM_SYMBOLS}], got {lengths.dtype} {list(lengths.shape)}"
    lens = lengths.tolist()
    if max(lens) > MAX_CODE_LEN:
        return f"a code length is {max(lens)} > {MAX_CODE_LEN}"
    kraft = sum(1 << (MAX_CODE_LEN - l) for l in lens if l > 0)
    if kraft > (1 << MAX_CODE_LEN):
        return "code lengths violate the Kraft inequality (not a prefix code)"
    return None


def decode_table(lengths: torch.Tensor) -> torch.Tensor:
    """int16 [2^MAX_CODE_LEN]: for each MAX_CODE_LEN-bit peek (stream order, LSB first) the entry
    ``symbol | length << 8`` of the code it starts with; 0 where no code matches (length 0)."""
    table = [0] * (1 << MAX_CODE_LEN)
    lens = lengths.tolist()
    for s, code in enumerate(canonical_codes(lengths)):
        length = lens[s]
        if length:
            # Every peek whose low `length` bits are the reversed code starts with this code.
            table[_reverse(code, length):: 1 << length] = [s | (length << 8)] * (1 << (MAX_CODE_LEN - length))
    return torch.tensor(table, dtype=torch.int16)


def encode_stream(symbols: torch.Tensor, lengths: torch.Tensor, window_bits: int, windows_per_block: int):
    """symbols uint8 [n] -> (codes uint8 [padded bytes], gaps uint8 [ceil(windows / 2)] (4-bit
    packed), block_starts int64 [blocks + 1], total_bits). ``codes`` has at least 8 zero bytes after
    the stream and a multiple of 8 bytes in all, so a decoder may read 8 bytes at any position
    before the end of the stream."""
    n = symbols.numel()
    lens = lengths.to(torch.int64)[symbols.to(torch.int64)]
    if n and bool((lens == 0).any()):
        raise ValueError("a symbol has no code (length 0)")
    ends = torch.cumsum(lens, 0)
    starts = ends - lens
    total_bits = int(ends[-1]) if n else 0
    # Every code bit, in stream order: code bit k of symbol i is bit (len - 1 - k) of its code.
    codes_of = torch.tensor(canonical_codes(lengths), dtype=torch.int64)[symbols.to(torch.int64)]
    owner = torch.repeat_interleave(torch.arange(n), lens)
    k = torch.arange(total_bits) - starts[owner]
    stream = (codes_of[owner] >> (lens[owner] - 1 - k)) & 1
    nbytes = -(-total_bits // 8)
    padded = -(-(nbytes + 8) // 8) * 8
    codes = torch.zeros(padded, dtype=torch.uint8)
    codes[:nbytes] = pack_bits(stream.to(torch.uint8), 1)
    windows = -(-total_bits // window_bits)
    window_starts = torch.arange(windows, dtype=torch.int64) * window_bits
    # The first code starting at or after each window (the last window may hold none: a code that
    # began before it runs to the end of the stream; its gap then points at total_bits).
    starts_and_end = torch.cat([starts, torch.tensor([total_bits])])
    first = torch.searchsorted(starts_and_end, window_starts)
    gaps = starts_and_end[first] - window_starts
    block_starts = torch.cat([first[::windows_per_block], torch.tensor([n])])
    return codes, pack_bits(gaps.to(torch.uint8), 4), block_starts, total_bits


def peek(codes: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The MAX_CODE_LEN stream bits starting at each bit position in ``pos`` (int64), LSB first."""
    byte = pos >> 3
    word = sum(codes[byte + k].to(torch.int64) << (8 * k) for k in range(3))
    return (word >> (pos & 7)) & ((1 << MAX_CODE_LEN) - 1)


def decode_symbols(codes, gaps, block_starts, table, n, total_bits, window_bits, windows_per_block):
    """Decode every window in lockstep: each window reads codes from its gap until one starts past
    its end. Window j's symbols land after those of the windows before it (a prefix sum of counts)."""
    windows = -(-total_bits // window_bits)
    gaps = unpack_bits(gaps, 4, windows).to(torch.int64)
    starts = torch.arange(windows, dtype=torch.int64) * window_bits + gaps
    pos = starts.clone()
    end = torch.clamp(torch.arange(1, windows + 1, dtype=torch.int64) * window_bits, max=total_bits)
    found = [[] for _ in range(windows)]
    active = pos < end
    while bool(active.any()):
        entry = table.to(torch.int64)[peek(codes, pos[active])]
        length = entry >> 8
        if bool((length == 0).any()):
            raise FormatError("corrupted dfloat stream: a bit pattern that is no code")
        for j, s in zip(active.nonzero().flatten().tolist(), (entry & 0xFF).tolist()):
            found[j].append(s)
        pos[active] += length
        active = pos < end
    # A sound stream chains: each window's last code ends where the next window's first code starts
    # (its gap says where), the last one at total_bits. The CPU decoder checks this at block
    # boundaries, the GPU decoders at every window; the spec checks it everywhere, so that a wrong
    # gap is an error here too, never wrong bytes.
    if windows and (not torch.equal(pos[:-1], starts[1:]) or int(pos[-1]) != total_bits):
        raise FormatError("corrupted dfloat stream: a window's codes do not end where the next window's gap says "
                          "its first code starts")
    symbols = torch.tensor([s for window in found for s in window], dtype=torch.uint8)
    if symbols.numel() != n:
        raise FormatError(f"corrupted dfloat stream: it holds {symbols.numel()} codes, expected {n}")
    counts = torch.tensor([len(w) for w in found] + [0], dtype=torch.int64)
    firsts = torch.cumsum(counts, 0) - counts
    if not torch.equal(firsts[::windows_per_block][: block_starts.numel() - 1], block_starts[:-1]):
        raise FormatError("corrupted dfloat stream: block_starts disagree with the codes")
    return symbols


def decode(codes, raw, gaps, block_starts, table, n, dtype, total_bits, window_bits, windows_per_block):
    """The spec of ``lowbit::dfloat_decode``: -> [n] of ``dtype``, bit-exact."""
    symbols = decode_symbols(codes, gaps, block_starts, table, n, total_bits, window_bits, windows_per_block)
    return merge_fields(symbols, raw, dtype)


def gemv(x, codes, raw, gaps, block_starts, table, out_features, total_bits, window_bits,
         windows_per_block, bias=None):
    """The spec of ``lowbit::dfloat_gemv``: x [B, in] @ W.T (+ bias) with W [out, in] decoded from
    the stream, in x's dtype, accumulated in fp32. -> [B, out]"""
    in_features = x.shape[-1]
    weight = decode(codes, raw, gaps, block_starts, table, out_features * in_features, x.dtype,
                    total_bits, window_bits, windows_per_block).reshape(out_features, in_features)
    out = x.float() @ weight.float().T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
