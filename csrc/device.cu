// Device queries: whether this extension can run on a device, and its SM count.
#include <string>

#include "common.h"

namespace sparseattn {
namespace {
__global__ void probe_kernel() {}
}  // namespace

std::string device_unavailable_reason(int device) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error
    return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  }
  if (count == 0) return "no CUDA device found";
  if (device < 0 || device >= count)
    return "device " + std::to_string(device) + " out of range (" + std::to_string(count) + " devices)";
  try {
    DeviceGuard guard(device);
    cudaFuncAttributes attr;
    err = cudaFuncGetAttributes(&attr, probe_kernel);
    if (err != cudaSuccess) {
      cudaGetLastError();
      int major = 0, minor = 0;
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
      return "device " + std::to_string(device) + " (sm_" + std::to_string(major) + std::to_string(minor) +
             ") cannot run this build of sparseattn._C (built for " SPARSEATTN_CUDA_ARCHS_STR "): " +
             cudaGetErrorName(err);
    }
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

int num_sms(int device) {
  int sms = 0;
  SA_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

}  // namespace sparseattn
