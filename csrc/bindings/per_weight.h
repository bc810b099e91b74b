// PerWeight: values derived from a weight tensor (a packed copy, a decode table), made once and
// kept while the tensor lives and is unchanged. Shared by the families' CPU glue.
#pragma once

#include <ATen/ATen.h>

#include <mutex>
#include <unordered_map>

namespace lowbit {

// Derived values (packed weights, tables), one per live weight tensor, valid while its version
// counter is unchanged (an in-place change remakes it; a change through .data is not seen).
template <typename Value>
class PerWeight {
  using WeakRef = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

 public:
  // The kept value of `weight`, or make(weight) (then kept) when there is none, the weight changed,
  // or usable(value) says no.
  template <typename Make, typename Usable>
  Value get(const at::Tensor& weight, Make&& make, Usable&& usable) {
    const uint32_t version = weight.is_inference() ? 0 : weight._version();
    const c10::TensorImpl* key = weight.unsafeGetTensorImpl();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto it = entries_.find(key);
      if (it != entries_.end() && it->second.version == version && it->second.ref.lock().get() == key &&
          usable(it->second.value)) {
        return it->second.value;
      }
    }
    Value value = make(weight);
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end();) {  // drop entries of freed weights
      it = it->second.ref.expired() ? entries_.erase(it) : std::next(it);
    }
    entries_.insert_or_assign(key, Entry{WeakRef(weight.getIntrusivePtr()), version, value});
    return value;
  }

  template <typename Make>
  Value get(const at::Tensor& weight, Make&& make) {
    return get(weight, make, [](const Value&) { return true; });
  }

 private:
  struct Entry {
    WeakRef ref;
    uint32_t version;
    Value value;
  };
  std::mutex mutex_;
  std::unordered_map<const c10::TensorImpl*, Entry> entries_;
};

}  // namespace lowbit
