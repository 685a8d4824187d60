// Tensors in and out of torch's dispatcher for the kernels in this directory, through torch's stable C
// shim (aoti_torch_*: plain C, no torch C++ headers, so a kernel still builds in a second or two).
//
// Each kernel file registers a boxed CPU kernel for its r1lab:: op (ops.py defines the schema and the
// shape function). A compiled graph calls the op through the C++ dispatcher: registered here, a call
// never enters Python.
//
// The boxed convention: the kernel gets a stack of StableIValues, the inputs in schema order; it owns
// each input tensor handle (and must free it), and leaves its output handle in stack[0].
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/c/shim.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <stdexcept>

namespace r1lab {

// A bad argument: the dispatcher hands it to Python as a ValueError with this message.
inline void check(bool ok, const char* message) {
  if (!ok) throw std::invalid_argument(message);
}

inline void shim(AOTITorchError status, const char* what) {
  if (status != AOTI_TORCH_SUCCESS) throw std::runtime_error(what);
}

// One owned tensor handle.
class Tensor {
 public:
  explicit Tensor(StableIValue value) : handle_(reinterpret_cast<AtenTensorHandle>(value)) {}
  explicit Tensor(AtenTensorHandle handle) : handle_(handle) {}
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;
  ~Tensor() {
    if (handle_ != nullptr) aoti_torch_delete_tensor_object(handle_);
  }

  int64_t dim() const {
    int64_t d;
    shim(aoti_torch_get_dim(handle_, &d), "aoti_torch_get_dim");
    return d;
  }
  int64_t size(int64_t i) const {
    int64_t* sizes;
    shim(aoti_torch_get_sizes(handle_, &sizes), "aoti_torch_get_sizes");
    return sizes[i];
  }
  int64_t stride(int64_t i) const {
    int64_t* strides;
    shim(aoti_torch_get_strides(handle_, &strides), "aoti_torch_get_strides");
    return strides[i];
  }
  bool contiguous() const {
    bool c;
    shim(aoti_torch_is_contiguous(handle_, &c), "aoti_torch_is_contiguous");
    return c;
  }
  bool is(int32_t dtype) const {  // dtype (aoti_torch_dtype_*()) on the CPU
    int32_t d, device;
    shim(aoti_torch_get_dtype(handle_, &d), "aoti_torch_get_dtype");
    shim(aoti_torch_get_device_type(handle_, &device), "aoti_torch_get_device_type");
    return d == dtype && device == aoti_torch_device_type_cpu();
  }
  template <typename T>
  T* data() const {
    void* p;
    shim(aoti_torch_get_data_ptr(handle_, &p), "aoti_torch_get_data_ptr");
    return static_cast<T*>(p);
  }
  StableIValue release() {  // hand the handle over (to the stack, as the op's output)
    AtenTensorHandle h = handle_;
    handle_ = nullptr;
    return reinterpret_cast<StableIValue>(h);
  }

 private:
  AtenTensorHandle handle_;
};

// A new contiguous CPU tensor.
inline AtenTensorHandle empty(std::initializer_list<int64_t> sizes, int32_t dtype) {
  int64_t shape[8], strides[8];
  const int64_t n = static_cast<int64_t>(sizes.size());
  int64_t i = 0;
  for (int64_t s : sizes) shape[i++] = s;
  for (int64_t j = n - 1, step = 1; j >= 0; --j) {
    strides[j] = step;
    step *= shape[j];
  }
  AtenTensorHandle out;
  shim(aoti_torch_empty_strided(n, shape, strides, dtype, aoti_torch_device_type_cpu(), 0, &out),
       "aoti_torch_empty_strided");
  return out;
}

// Scalars on the stack are their bits.
inline double as_double(StableIValue value) {
  double d;
  std::memcpy(&d, &value, sizeof d);
  return d;
}
inline int64_t as_int(StableIValue value) {
  int64_t i;
  std::memcpy(&i, &value, sizeof i);
  return i;
}

// The op's CPU kernel, once per process; 0 on success. (The library object lives as long as the process.)
inline int register_cpu_kernel(const char* op, void (*kernel)(StableIValue*, uint64_t, uint64_t)) {
  TorchLibraryHandle library;
  if (aoti_torch_library_init_impl("r1lab", "CPU", __FILE__, __LINE__, &library) != AOTI_TORCH_SUCCESS) return 1;
  return torch_library_impl(library, op, kernel, TORCH_ABI_VERSION) == AOTI_TORCH_SUCCESS ? 0 : 2;
}

}  // namespace r1lab
