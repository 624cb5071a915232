// Shared pieces of sparseattn's CUDA code: error checking and the device guard.
//
// Framework-agnostic: nothing here knows about Python or PyTorch. Every CUDA call and launch is
// checked; failures become C++ exceptions (std::runtime_error for CUDA errors,
// std::invalid_argument for bad arguments), which the bindings turn into Python exceptions.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace sparseattn {

[[noreturn]] inline void throw_cuda(cudaError_t err, const char* what, const char* file, int line) {
  throw std::runtime_error(std::string("sparseattn: CUDA error in ") + what + " (" + file + ":" +
                           std::to_string(line) + "): " + cudaGetErrorName(err) + ": " +
                           cudaGetErrorString(err));
}

inline void check_cuda(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess) throw_cuda(err, what, file, line);
}

// Checks a CUDA runtime call.
#define SA_CUDA_CHECK(expr) ::sparseattn::check_cuda((expr), #expr, __FILE__, __LINE__)
// Checks the launch just made (configuration errors are reported by cudaGetLastError).
#define SA_CHECK_LAUNCH(name) ::sparseattn::check_cuda(cudaGetLastError(), name, __FILE__, __LINE__)
// Argument check: never a C assert.
#define SA_REQUIRE(cond, msg)                                                       \
  do {                                                                              \
    if (!(cond)) throw std::invalid_argument(std::string("sparseattn: ") + (msg)); \
  } while (0)

// Makes `device` current for the lifetime of the guard and restores the previous device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    SA_CUDA_CHECK(cudaGetDevice(&prev_));
    if (device != prev_) {
      SA_CUDA_CHECK(cudaSetDevice(device));
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(prev_);  // destructor: cannot throw; restoring is best effort
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

// "" when `device` can run this extension's kernels, else one line saying why not.
std::string device_unavailable_reason(int device);

// Number of streaming multiprocessors of `device`.
int num_sms(int device);

}  // namespace sparseattn
