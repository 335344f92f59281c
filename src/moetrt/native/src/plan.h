// What to launch for T tokens: the workspace layout and the launch list (kernels/plan.py, for a bundle).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "bundle.h"

namespace moetrt {

struct Region {
    int64_t offset = 0;
    int64_t nbytes = 0;
};

// One runtime argument, resolved to what it means for this token count.
struct Arg {
    enum class Kind { Input, Output, Workspace, Tokens, Int, State };
    Kind kind;
    int64_t value;     // input / output index, workspace or state offset, or the int itself
    std::string name;  // the input / output / region name (for describing the plan)
};

struct Launch {
    std::string stage;
    size_t kernel;  // index into Bundle::kernels
    std::array<int64_t, 3> grid;
    std::vector<Arg> args;
    bool pdl;
    bool persistent = false;  // a persistent grouped GEMM (PERSIST): its programs loop over the tiles
};

struct Plan {
    int64_t num_tokens = 0;
    std::vector<Launch> launches;                       // empty for T = 0
    std::vector<std::pair<std::string, Region>> layout;  // workspace regions, "total" last
    int64_t workspace_bytes = 0;
    bool uses_state = false;  // some launch takes the launcher's per-stream state (Bundle::state_bytes)
};

// The bucket serving `num_tokens` (index into bundle.buckets); throws when none does.
size_t bucket_for(const Bundle& bundle, int64_t num_tokens);

// Throws moetrt::Error for a negative count, a count no bucket serves or a grid the GPU cannot launch.
Plan plan_for(const Bundle& bundle, int64_t num_tokens);

// The grid to launch on a GPU of `sm_count` SMs (plan.py device_grid): a persistent grouped GEMM's programs are
// at most one per SM, as the tuner counts them on the GPU it ran on, so a table tuned on a larger GPU leaves no
// program waiting for a second round on a smaller one; every other grid as planned.
std::array<int64_t, 3> device_grid(const Launch& launch, int64_t sm_count);

// Throws moetrt::Error naming the order expected unless there is one pointer per present input and output.
void check_pointer_counts(const Bundle& bundle, size_t num_inputs, size_t num_outputs);

// The kernel parameter slots of one launch, as cuLaunchKernel takes them: one 8-byte slot per parameter
// (pointers whole, i32 in the slot's low 4 bytes), then the scratch pointers Triton's ABI appends: null, or
// the tma_scratch region where the launch carries it as an argument past the kernel's parameters.
// inputs / outputs: device pointers in the bundle's input / output order; state: the launcher's per-stream
// state (Bundle::state_bytes: memory kept across calls, zeroed once, which every call leaves zero).
std::vector<uint64_t> launch_slots(const Bundle& bundle, const Launch& launch, int64_t num_tokens,
                                   const uint64_t* inputs, const uint64_t* outputs, uint64_t workspace,
                                   uint64_t state);

// The plan as JSON, in the terms of kernels/plan.py (launch args as [source, ref]; ints as decimal text).
std::string describe(const Bundle& bundle, const Plan& plan);

}  // namespace moetrt
