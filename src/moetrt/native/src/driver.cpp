#include "driver.h"

#include <dlfcn.h>

#include <mutex>

#include "errors.h"

namespace moetrt {
namespace {

template <typename F>
void bind(void* lib, F& fn, const char* name) {
    fn = reinterpret_cast<F>(dlsym(lib, name));
    if (!fn)
        throw Error(ErrorKind::Cuda, std::string("the CUDA driver lacks ") + name,
                    "install an NVIDIA driver for CUDA 12.0 or later");
}

Driver open_driver() {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!lib) lib = dlopen("libcuda.so", RTLD_NOW | RTLD_GLOBAL);
    if (!lib)
        throw Error(ErrorKind::Cuda, "cannot open the CUDA driver (libcuda.so.1)",
                    "run on a machine with an NVIDIA GPU and its driver");
    Driver d{};
    bind(lib, d.init, "cuInit");
    bind(lib, d.get_error_name, "cuGetErrorName");
    bind(lib, d.device_get, "cuDeviceGet");
    bind(lib, d.device_get_attribute, "cuDeviceGetAttribute");
    bind(lib, d.primary_ctx_retain, "cuDevicePrimaryCtxRetain");
    bind(lib, d.ctx_get_current, "cuCtxGetCurrent");
    bind(lib, d.ctx_set_current, "cuCtxSetCurrent");
    bind(lib, d.ctx_get_device, "cuCtxGetDevice");
    bind(lib, d.module_load_data, "cuModuleLoadData");
    bind(lib, d.module_get_function, "cuModuleGetFunction");
    bind(lib, d.module_unload, "cuModuleUnload");
    bind(lib, d.func_set_attribute, "cuFuncSetAttribute");
    bind(lib, d.launch_kernel, "cuLaunchKernel");
    bind(lib, d.launch_kernel_ex, "cuLaunchKernelEx");
    bind(lib, d.mem_alloc, "cuMemAlloc_v2");  // cuda.h maps the names to their _v2 entry points
    bind(lib, d.mem_free, "cuMemFree_v2");
    bind(lib, d.memset_d8, "cuMemsetD8_v2");
    bind(lib, d.stream_is_capturing, "cuStreamIsCapturing");
    d.check(d.init(0), "initialising the CUDA driver");
    return d;
}

}  // namespace

const Driver& Driver::get() {
    static std::once_flag once;
    static Driver driver;
    static std::string failure, failure_hint;
    std::call_once(once, [] {
        try {
            driver = open_driver();
        } catch (const Error& err) {
            failure = err.message();
            failure_hint = err.hint();
        }
    });
    if (!failure.empty()) throw Error(ErrorKind::Cuda, failure, failure_hint);
    return driver;
}

void Driver::check(CUresult result, const std::string& what) const {
    if (result == CUDA_SUCCESS) return;
    const char* name = nullptr;
    if (!get_error_name || get_error_name(result, &name) != CUDA_SUCCESS || !name) name = "unknown CUDA error";
    throw Error(ErrorKind::Cuda, std::string("CUDA driver error ") + name + " while " + what,
                "check the device pointers, the stream and that the bundle's SM matches the GPU");
}

}  // namespace moetrt
