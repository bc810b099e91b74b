// Launchers of the CUDA dfloat kernels: decode to dense, and decode fused into a small-batch GEMV.
// Format: docs/formats.md ("dfloat"), python/lowbit/reference/dfloat.py (the spec), and the shared
// decode step in csrc/common/dfloat.h. Plain CUDA C++: no torch headers, so the file compiles with
// nvcc alone.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace lowbit::cuda::dfloat {

// kUInt8: bytes, whose symbol is the whole element (no raw bits); decode only, gemv refuses it.
enum class DType { kBFloat16, kFloat16, kFloat32, kUInt8 };

// One dfloat stream, device pointers to contiguous buffers. Preconditions (the launchers return
// cudaErrorInvalidValue or cudaErrorMisalignedAddress when one fails; the torch glue ensures them):
// codes 4-byte aligned, raw and table 16-byte aligned, 1 <= windows_per_block <= 1024,
// 32 <= window_bits <= kMaxWindowBits and a multiple of 32. The buffer sizes are those of the format
// (raw: n * raw_bytes, gaps: ceil(windows / 2), block_starts: blocks + 1); codes_bytes bounds every
// read of codes, so a corrupted stream is never read past its end.
struct Stream {
  const uint8_t* codes;         // [codes_bytes] >= ceil(total_bits / 8) + 8 (zero padding)
  int64_t codes_bytes;
  const uint8_t* raw;           // [n * raw_bytes]: 1 byte per element for 16-bit floats, 3 for fp32, none
                                // for uint8 (never read then; may be null)
  const uint8_t* gaps;          // [ceil(windows / 2)], 4-bit packed, low nibble first
  const int64_t* block_starts;  // [blocks + 1]
  const int16_t* table;         // [4096]: symbol | length << 8
  int64_t n;                    // elements
  int64_t total_bits;
  int64_t window_bits;
  int64_t windows_per_block;
};

// Windows are limited so that the symbol counts of a block fit in 32 bits.
constexpr int64_t kMaxWindowBits = int64_t(1) << 20;
constexpr int64_t kMaxWindowsPerBlock = 1024;

// Bits OR-ed into *error by the kernels when the stream is corrupted (no buffer is then read or
// written out of bounds, but decode's output is unspecified). The caller zeroes *error.
constexpr int kErrorBadCode = 1;   // a peek matched no code: table entry of length 0 (or > 12)
constexpr int kErrorBadCount = 2;  // the windows hold a symbol count that disagrees with block_starts / n
constexpr int kErrorBadEnd = 4;    // a window's last code does not end where the next window's first starts

// out: [n] of dtype (bf16 / fp16 / fp32 bits, or bytes), 16-byte aligned. error: one int in device
// memory, zeroed by the caller, who reads it after the kernel to know whether `out` holds the stream's
// values.
cudaError_t decode(const Stream& s, DType dtype, void* out, int* error, cudaStream_t stream);

// y[batch, out_features] = x[batch, in_features] @ W.T (+ bias), W [out_features, in_features]
// row-major decoded from `s` (s.n == out_features * in_features) in `dtype` (a float type: kUInt8
// gives cudaErrorInvalidValue), which is also the dtype of x, bias and y; fp32 accumulation. x 16-byte
// aligned, bias may be null. workspace: fp32 [batch * out_features] and error: one int, both in
// device memory and zeroed by the caller (partial sums; the last kernel adds the bias and casts, or
// writes NaN everywhere if *error is set, so that a corrupted stream shows without a host sync).
// Batches of up to 8 rows read the compressed weight once; larger batches are done 8 rows at a time.
cudaError_t gemv(const Stream& s, DType dtype, const void* x, int64_t batch, int64_t in_features,
                 int64_t out_features, const void* bias, float* workspace, int* error, void* y,
                 cudaStream_t stream);

}  // namespace lowbit::cuda::dfloat
