#include "isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace lowbit::cpu {

Isa host_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const Isa isa = [] {
    const bool avx2 =
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kGeneric;
  }();
  return isa;
#else
  return Isa::kGeneric;
#endif
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

Isa cpu_isa() {
  static const Isa isa = [] {
    const char* env = std::getenv("LOWBIT_CPU_ISA");
    const std::string forced = env ? env : "";
    if (forced.empty()) return host_isa();
    for (const Isa candidate : {Isa::kGeneric, Isa::kAvx2, Isa::kAvx512}) {
      if (forced != isa_name(candidate)) continue;
      TORCH_CHECK_VALUE(static_cast<int>(candidate) <= static_cast<int>(host_isa()), "LOWBIT_CPU_ISA=", forced,
                        ", but this CPU has no ", forced, " (it runs ", isa_name(host_isa()), ")");
      return candidate;
    }
    TORCH_CHECK_VALUE(false, "LOWBIT_CPU_ISA must be generic, avx2 or avx512, got '", forced, "'");
    return Isa::kGeneric;
  }();
  return isa;
}

}  // namespace lowbit::cpu
