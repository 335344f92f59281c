// A kernel bundle (KernelBundle.to_bytes() in Python): cubins, their launch metadata and per-bucket configs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "json.h"

namespace moetrt {

// Version of the bundle layout this library reads (kernels/aot.py BUNDLE_VERSION).
constexpr int64_t kBundleVersion = 13;
constexpr char kBundleMagic[] = "MOETRTKB";
constexpr size_t kBundleMagicSize = 8;

enum class ParamKind { Pointer, Int32 };

// Where one kernel parameter's value comes from at launch time.
struct ParamSource {
    std::string source;  // "in" | "out" | "ws" | "state" | "T" | "int"
    std::string ref;     // input / output / workspace region / host-int name
};

struct Kernel {
    std::string key;
    std::string name;  // entry point in the cubin
    std::string cubin;
    int num_warps = 0;
    int shared = 0;  // dynamic shared memory, bytes
    std::vector<ParamKind> params;
    std::vector<ParamSource> sources;  // one per runtime param
    int scratch_params = 0;            // trailing null pointers the Triton ABI appends
};

struct Stage {
    std::string name;
    size_t kernel;  // index into Bundle::kernels
    json::Value constexprs;
    int64_t constexpr_int(const char* name) const { return constexprs.at(name).as_int(); }
    int64_t constexpr_int_or(const char* name, int64_t fallback) const {
        const json::Value* v = constexprs.find(name);
        return v ? v->as_int() : fallback;
    }
};

struct Bucket {
    std::optional<int64_t> bound;  // none: unbounded
    json::Value config;
    std::vector<Stage> stages;  // the bundle's stage order
    const Stage* stage(const std::string& name) const;
    int64_t config_int(const char* section, const char* name) const;
    bool config_enabled(const char* section) const;
};

// The op's sizes the planner needs (MoEAttributes in Python).
struct Shape {
    int64_t num_experts = 0, top_k = 0, hidden_size = 0, intermediate_size = 0, shared_intermediate_size = 0;
    int64_t nmax() const { return intermediate_size > shared_intermediate_size ? intermediate_size : shared_intermediate_size; }
    bool has_shared_expert() const { return shared_intermediate_size > 0; }
};

struct Bundle {
    json::Value attrs;  // the op's attributes, as on the ONNX node
    Shape shape;
    std::string dtype;  // "float32" | "float16" | "bfloat16"
    int64_t sm = 0;
    std::string triton_version;
    std::string io_dtype;              // the activations' dtype name: "fp32" | "fp16" | "bf16"
    std::vector<std::string> inputs;   // present inputs, in node order
    std::vector<std::string> outputs;  // present outputs, in node order
    // per input: its dtype name when not the activations' ("uint8", "fp32"), "" otherwise
    std::vector<std::string> input_dtypes;
    // per input: its shape, -1 for the token count
    std::vector<std::vector<int64_t>> input_shapes;
    std::vector<Kernel> kernels;
    std::vector<Bucket> buckets;
    // the launcher's per-stream state (plan.py STATE_BYTES, STATE_REGIONS): bytes, and region -> byte offset
    int64_t state_bytes = 0;
    std::map<std::string, int64_t> state_offsets;

    // Throws moetrt::Error (kind Bundle) for anything but a complete bundle of this version.
    static Bundle parse(const void* data, size_t size);
    size_t element_size() const;  // bytes of one activation element
    int input_index(const std::string& name) const;  // -1 when absent
    int output_index(const std::string& name) const;
};

}  // namespace moetrt
