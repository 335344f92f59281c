#include "launcher.h"


#include "driver.h"
#include "errors.h"

namespace moetrt {
namespace {

constexpr int kDefaultSharedLimit = 48 * 1024;
constexpr size_t kPlanCacheSize = 256;
constexpr size_t kMaxParams = 64;

void check_pointers(const uint64_t* ptrs, size_t n, const char* what) {
    for (size_t i = 0; i < n; ++i)
        if (!ptrs[i] || ptrs[i] % 16)
            throw Error(ErrorKind::Invalid, std::string("a device pointer (") + what + " " + std::to_string(i) +
                                                ") is null or not 16-byte aligned",
                        "allocate inputs, outputs and workspace with the CUDA allocator (256-byte aligned)");
}

}  // namespace

int64_t sm_from_capability(int major, int minor) { return major * 10 + minor; }

int64_t device_sm(CUdevice device) {
    const Driver& drv = Driver::get();
    int major = 0, minor = 0;
    drv.check(drv.device_get_attribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device), "reading the SM");
    drv.check(drv.device_get_attribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device), "reading the SM");
    return sm_from_capability(major, minor);
}

int64_t current_device_sm() {
    CUdevice device;
    Driver::get().check(Driver::get().ctx_get_device(&device), "reading the current device");
    return device_sm(device);
}

void check_sm(const Bundle& bundle, int64_t sm) {
    if (sm != bundle.sm)
        throw Error(ErrorKind::Unsupported,
                    "kernel bundle is for sm_" + std::to_string(bundle.sm) + ", the GPU is sm_" + std::to_string(sm),
                    "compile the kernels for sm_" + std::to_string(sm) + " (moetrt aot --sm " + std::to_string(sm) + ")");
}

Launcher::Launcher(std::shared_ptr<const Bundle> bundle) : bundle_(std::move(bundle)) {
    const Driver& drv = Driver::get();
    CUcontext ctx = nullptr;
    drv.check(drv.ctx_get_current(&ctx), "reading the current context");
    if (!ctx) {
        CUdevice device0;
        drv.check(drv.device_get(&device0, 0), "opening device 0");
        drv.check(drv.primary_ctx_retain(&ctx, device0), "retaining the primary context");
        drv.check(drv.ctx_set_current(ctx), "making the primary context current");
    }
    check_sm(*bundle_, current_device_sm());
    CUdevice device;
    drv.check(drv.ctx_get_device(&device), "reading the current device");
    int sms = 0;
    drv.check(drv.device_get_attribute(&sms, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, device), "reading the SM count");
    sm_count_ = sms;
    try {
        for (const Kernel& kernel : bundle_->kernels) {
            CUmodule module = nullptr;
            drv.check(drv.module_load_data(&module, kernel.cubin.data()), "loading cubin " + kernel.key);
            modules_.push_back(module);
            CUfunction fn = nullptr;
            drv.check(drv.module_get_function(&fn, module, kernel.name.c_str()), "finding " + kernel.name);
            if (kernel.shared > kDefaultSharedLimit)
                drv.check(drv.func_set_attribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, kernel.shared),
                          "allowing " + std::to_string(kernel.shared) + " bytes of shared memory for " + kernel.key);
            functions_.push_back(fn);
        }
    } catch (...) {
        for (CUmodule m : modules_) drv.module_unload(m);
        throw;
    }
}

Launcher::~Launcher() {
    try {
        const Driver& drv = Driver::get();
        for (const auto& entry : states_) drv.mem_free(entry.second);
        for (CUmodule m : modules_) drv.module_unload(m);
    } catch (...) {
    }
}

std::shared_ptr<const Plan> Launcher::plan(int64_t num_tokens) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = plans_.find(num_tokens);
    if (it != plans_.end()) return it->second;
    auto made = std::make_shared<const Plan>(plan_for(*bundle_, num_tokens));
    plans_[num_tokens] = made;
    plan_order_.push_back(num_tokens);
    if (plan_order_.size() > kPlanCacheSize) {
        plans_.erase(plan_order_.front());
        plan_order_.pop_front();
    }
    return made;
}

uint64_t Launcher::state_for(CUstream stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = states_.find(stream);
    if (it != states_.end()) return static_cast<uint64_t>(it->second);
    const Driver& drv = Driver::get();
    CUstreamCaptureStatus capture = CU_STREAM_CAPTURE_STATUS_NONE;
    drv.check(drv.stream_is_capturing(stream, &capture), "asking whether the stream is being captured");
    if (capture != CU_STREAM_CAPTURE_STATUS_NONE)
        throw Error(ErrorKind::Invalid, "the first launch of this op on a stream is being captured into a CUDA graph",
                    "run the op (or the engine) once on that stream before capturing it");
    CUdeviceptr state = 0;
    auto bytes = static_cast<size_t>(bundle_->state_bytes);
    drv.check(drv.mem_alloc(&state, bytes), "allocating the launcher's per-stream state");
    CUresult zeroed = drv.memset_d8(state, 0, bytes);  // synchronous: zero before use
    if (zeroed != CUDA_SUCCESS) {
        drv.mem_free(state);
        drv.check(zeroed, "zeroing the launcher's per-stream state");
    }
    states_[stream] = state;
    return static_cast<uint64_t>(state);
}

void Launcher::enqueue(int64_t num_tokens, const uint64_t* inputs, size_t num_inputs, const uint64_t* outputs,
                       size_t num_outputs, uint64_t workspace, CUstream stream, int first, int count) {
    const Bundle& b = *bundle_;
    check_pointer_counts(b, num_inputs, num_outputs);
    std::shared_ptr<const Plan> plan = this->plan(num_tokens);  // throws for T < 0
    if (num_tokens == 0) return;
    check_pointers(inputs, num_inputs, "input");
    check_pointers(outputs, num_outputs, "output");
    check_pointers(&workspace, 1, "workspace");
    int total = static_cast<int>(plan->launches.size());
    if (first < 0 || first > total || (count >= 0 && first + count > total))
        throw Error(ErrorKind::Invalid, "launch range [" + std::to_string(first) + ", +" + std::to_string(count) +
                                            ") is outside the plan's " + std::to_string(total) + " launches", "");
    int last = count < 0 ? total : first + count;
    const Driver& drv = Driver::get();
    uint64_t state = plan->uses_state ? state_for(stream) : 0;
    void* params[kMaxParams];
    for (int i = first; i < last; ++i) {
        const Launch& launch = plan->launches[i];
        const Kernel& kernel = b.kernels[launch.kernel];
        std::vector<uint64_t> slots = launch_slots(b, launch, num_tokens, inputs, outputs, workspace, state);
        if (slots.size() > kMaxParams)
            throw Error(ErrorKind::Bundle, "kernel " + kernel.key + " has too many parameters", "");
        for (size_t j = 0; j < slots.size(); ++j) params[j] = &slots[j];
        auto grid = device_grid(launch, sm_count_);
        unsigned threads = 32u * static_cast<unsigned>(kernel.num_warps);
        if (launch.pdl) {
            CUlaunchAttribute attr{};
            attr.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attr.value.programmaticStreamSerializationAllowed = 1;
            CUlaunchConfig config{};
            config.gridDimX = static_cast<unsigned>(grid[0]);
            config.gridDimY = static_cast<unsigned>(grid[1]);
            config.gridDimZ = static_cast<unsigned>(grid[2]);
            config.blockDimX = threads;
            config.blockDimY = config.blockDimZ = 1;
            config.sharedMemBytes = static_cast<unsigned>(kernel.shared);
            config.hStream = stream;
            config.attrs = &attr;
            config.numAttrs = 1;
            drv.check(drv.launch_kernel_ex(&config, functions_[launch.kernel], params, nullptr),
                      "launching " + launch.stage + " (programmatic dependent launch)");
        } else {
            drv.check(drv.launch_kernel(functions_[launch.kernel], static_cast<unsigned>(grid[0]),
                                        static_cast<unsigned>(grid[1]), static_cast<unsigned>(grid[2]), threads, 1, 1,
                                        static_cast<unsigned>(kernel.shared), stream, params, nullptr),
                      "launching " + launch.stage);
        }
    }
}

}  // namespace moetrt
