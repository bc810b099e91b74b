// The x86 instruction sets lowbit's CPU kernels are built for, and the one this process runs: the
// widest the CPU has, or a narrower one named by LOWBIT_CPU_ISA (generic, avx2, avx512), read once,
// so tests and comparisons can run every path a host can. Every CPU kernel with more than one
// build dispatches on cpu_isa().
#pragma once

namespace lowbit::cpu {

enum class Isa {
  kGeneric = 0,  // plain x86-64 (SSE2), or any other architecture
  kAvx2 = 1,     // AVX2 + FMA + F16C
  kAvx512 = 2,   // AVX-512 F, BW, VL, DQ (and AVX2)
};

// The widest ISA this CPU has.
Isa host_isa();

// The ISA the kernels run: host_isa(), or LOWBIT_CPU_ISA when set. Raises ValueError (a c10 error)
// at the first call when LOWBIT_CPU_ISA names an unknown ISA or one this CPU lacks.
Isa cpu_isa();

const char* isa_name(Isa isa);

}  // namespace lowbit::cpu

// Calls the build of fn for cpu_isa(): a kernel file compiles its loops (a .inc) once per ISA,
// into namespaces generic, avx2 and avx512 (the last two with their target options, on x86-64
// with GCC or Clang), and calls them through this.
#if defined(__x86_64__) && defined(__GNUC__)
#define LOWBIT_ISA_CALL(fn, ...)                                                                             \
  (::lowbit::cpu::cpu_isa() == ::lowbit::cpu::Isa::kAvx512 ? avx512::fn(__VA_ARGS__)                         \
   : ::lowbit::cpu::cpu_isa() == ::lowbit::cpu::Isa::kAvx2 ? avx2::fn(__VA_ARGS__)                           \
                                                          : generic::fn(__VA_ARGS__))
#else
#define LOWBIT_ISA_CALL(fn, ...) generic::fn(__VA_ARGS__)
#endif
