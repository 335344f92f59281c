// The CUDA driver API, opened at run time (dlopen libcuda): the library loads on a machine without a GPU,
// and planning works there; only launching needs the driver.
#pragma once

#include <cuda.h>

#include <string>

namespace moetrt {

struct Driver {
    decltype(&cuInit) init;
    decltype(&cuGetErrorName) get_error_name;
    decltype(&cuDeviceGet) device_get;
    decltype(&cuDeviceGetAttribute) device_get_attribute;
    decltype(&cuDevicePrimaryCtxRetain) primary_ctx_retain;
    decltype(&cuCtxGetCurrent) ctx_get_current;
    decltype(&cuCtxSetCurrent) ctx_set_current;
    decltype(&cuCtxGetDevice) ctx_get_device;
    decltype(&cuModuleLoadData) module_load_data;
    decltype(&cuModuleGetFunction) module_get_function;
    decltype(&cuModuleUnload) module_unload;
    decltype(&cuFuncSetAttribute) func_set_attribute;
    decltype(&cuLaunchKernel) launch_kernel;
    decltype(&cuLaunchKernelEx) launch_kernel_ex;
    decltype(&cuMemAlloc) mem_alloc;
    decltype(&cuMemFree) mem_free;
    decltype(&cuMemsetD8) memset_d8;
    decltype(&cuStreamIsCapturing) stream_is_capturing;

    // The process's driver (opened once); throws moetrt::Error when libcuda cannot be opened.
    static const Driver& get();
    // Throws moetrt::Error naming the driver's error and `what` unless `result` is CUDA_SUCCESS.
    void check(CUresult result, const std::string& what) const;
};

}  // namespace moetrt
