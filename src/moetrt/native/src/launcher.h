// Loads a bundle's cubins into the current CUDA context and enqueues the op on a stream.
#pragma once

#include <cuda.h>

#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "bundle.h"
#include "plan.h"

namespace moetrt {

class Launcher {
public:
    // Loads every cubin into the current context (the primary context of device 0 when none is current).
    // Throws moetrt::Error when the GPU's SM is not the bundle's.
    explicit Launcher(std::shared_ptr<const Bundle> bundle);
    ~Launcher();
    Launcher(const Launcher&) = delete;
    Launcher& operator=(const Launcher&) = delete;

    const Bundle& bundle() const { return *bundle_; }
    // Plans are cached per token count (a bounded number of them); thread-safe.
    std::shared_ptr<const Plan> plan(int64_t num_tokens);
    // Launches launches [first, first + count) of the plan (count < 0: to the end); nothing for 0 tokens.
    // A plan that takes state (Plan::uses_state) uses the launcher's Bundle::state_bytes for `stream`, allocated and
    // zeroed at the first such launch on it, which therefore must not be under stream capture (as TensorRT
    // asks one enqueue before capturing); the graph then keeps that stream's state.
    void enqueue(int64_t num_tokens, const uint64_t* inputs, size_t num_inputs, const uint64_t* outputs,
                 size_t num_outputs, uint64_t workspace, CUstream stream, int first = 0, int count = -1);

private:
    std::shared_ptr<const Bundle> bundle_;
    std::vector<CUmodule> modules_;
    std::vector<CUfunction> functions_;  // per bundle kernel
    int64_t sm_count_ = 0;               // the device's SMs: persistent grids are at most this (device_grid)
    std::mutex mutex_;
    std::unordered_map<int64_t, std::shared_ptr<const Plan>> plans_;
    std::list<int64_t> plan_order_;
    std::unordered_map<CUstream, CUdeviceptr> states_;  // per stream: every call leaves it zero

    // The stream's state (allocated and zeroed on first use); throws while the stream is being captured.
    uint64_t state_for(CUstream stream);
};

// Throws moetrt::Error (Unsupported) unless the bundle was compiled for `sm`.
void check_sm(const Bundle& bundle, int64_t sm);

// The SM number of a compute capability (9.0 -> 90, 12.0 -> 120), as core/devices.py maps it.
int64_t sm_from_capability(int major, int minor);
// The SM of `device` / of the current context's device.
int64_t device_sm(CUdevice device);
int64_t current_device_sm();

}  // namespace moetrt
