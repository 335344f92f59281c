#include "bundle.h"

#include <cstring>

#include "errors.h"

namespace moetrt {
namespace {

const char* kRebuild = "rebuild the engine / recompile the kernels with this moetrt version (`moetrt aot`)";

[[noreturn]] void bad(const std::string& what) { throw Error(ErrorKind::Bundle, what, kRebuild); }

ParamKind param_kind(const std::string& type) {
    if (!type.empty() && type[0] == '*') return ParamKind::Pointer;
    if (type == "i32") return ParamKind::Int32;
    bad("kernel bundle has a parameter of unsupported type " + type);
}

}  // namespace

const Stage* Bucket::stage(const std::string& name) const {
    for (const Stage& s : stages)
        if (s.name == name) return &s;
    return nullptr;
}

int64_t Bucket::config_int(const char* section, const char* name) const {
    return config.at(section).at(name).as_int();
}

bool Bucket::config_enabled(const char* section) const {
    const json::Value* s = config.find(section);
    const json::Value* on = s ? s->find("enabled") : nullptr;
    return on && on->as_int() != 0;
}

size_t Bundle::element_size() const {
    if (dtype == "float32") return 4;
    if (dtype == "float16" || dtype == "bfloat16") return 2;
    bad("kernel bundle dtype " + dtype + " is unknown");
}

int Bundle::input_index(const std::string& name) const {
    for (size_t i = 0; i < inputs.size(); ++i)
        if (inputs[i] == name) return static_cast<int>(i);
    return -1;
}

int Bundle::output_index(const std::string& name) const {
    for (size_t i = 0; i < outputs.size(); ++i)
        if (outputs[i] == name) return static_cast<int>(i);
    return -1;
}

Bundle Bundle::parse(const void* data, size_t size) {
    const auto* bytes = static_cast<const unsigned char*>(data);
    if (!data || size < kBundleMagicSize + 4 || std::memcmp(bytes, kBundleMagic, kBundleMagicSize) != 0)
        bad("kernel bundle has no moetrt header (wrong or truncated data)");
    uint32_t header_len = 0;
    for (int i = 3; i >= 0; --i) header_len = (header_len << 8) | bytes[kBundleMagicSize + i];
    size_t start = kBundleMagicSize + 4;
    if (header_len > size - start) bad("kernel bundle is truncated (its header runs past the end)");
    json::Value header = json::parse(std::string_view(reinterpret_cast<const char*>(bytes + start), header_len));
    const json::Value* version = header.find("version");
    if (!version || version->kind != json::Value::Kind::Number || version->as_int() != kBundleVersion)
        bad("kernel bundle version " + (version ? std::to_string(version->as_int()) : std::string("?")) +
            " is not " + std::to_string(kBundleVersion));

    Bundle b;
    b.attrs = header.at("attrs");
    b.shape.num_experts = b.attrs.at("num_experts").as_int();
    b.shape.top_k = b.attrs.at("top_k").as_int();
    b.shape.hidden_size = b.attrs.at("hidden_size").as_int();
    b.shape.intermediate_size = b.attrs.at("intermediate_size").as_int();
    const json::Value* shared = b.attrs.find("shared_intermediate_size");
    b.shape.shared_intermediate_size = shared ? shared->as_int() : 0;
    b.dtype = header.at("dtype").as_string();
    b.element_size();
    b.sm = header.at("sm").as_int();
    b.triton_version = header.at("triton_version").as_string();
    b.io_dtype = header.at("io_dtype").as_string();
    for (const auto& name : header.at("inputs").as_array()) b.inputs.push_back(name.as_string());
    for (const auto& name : header.at("outputs").as_array()) b.outputs.push_back(name.as_string());
    const json::Value& dtypes = header.at("input_dtypes");
    const json::Value& shapes = header.at("input_shapes");
    for (const std::string& name : b.inputs) {
        const json::Value& d = dtypes.at(name);
        b.input_dtypes.push_back(d.is_null() ? std::string() : d.as_string());
        std::vector<int64_t> dims;
        for (const auto& dim : shapes.at(name).as_array()) dims.push_back(dim.is_null() ? -1 : dim.as_int());
        b.input_shapes.push_back(std::move(dims));
    }
    if (b.inputs.empty() || b.inputs[0] != "hidden_states" || b.outputs.empty() || b.outputs[0] != "output")
        bad("kernel bundle lists no hidden_states input or output");

    size_t blob_start = start + header_len;
    std::map<std::string, size_t> index;
    for (const auto& k : header.at("kernels").as_array()) {
        Kernel kernel;
        kernel.key = k.at("key").as_string();
        kernel.name = k.at("name").as_string();
        kernel.num_warps = static_cast<int>(k.at("num_warps").as_int());
        kernel.shared = static_cast<int>(k.at("shared").as_int());
        kernel.scratch_params = static_cast<int>(k.at("scratch_params").as_int());
        for (const auto& t : k.at("param_types").as_array()) kernel.params.push_back(param_kind(t.as_string()));
        for (const auto& s : k.at("param_sources").as_array()) {
            const auto& pair = s.as_array();
            if (pair.size() != 2) bad("kernel bundle has a malformed parameter source");
            kernel.sources.push_back({pair[0].as_string(), pair[1].as_string()});
        }
        if (kernel.sources.size() != kernel.params.size())
            bad("kernel " + kernel.key + " has " + std::to_string(kernel.params.size()) + " parameters but " +
                std::to_string(kernel.sources.size()) + " sources");
        int64_t offset = k.at("offset").as_int(), length = k.at("size").as_int();
        if (offset < 0 || length <= 0 || static_cast<uint64_t>(offset + length) > size - blob_start)
            bad("kernel bundle is truncated (a cubin runs past its end)");
        kernel.cubin.assign(reinterpret_cast<const char*>(bytes + blob_start + offset), static_cast<size_t>(length));
        index[kernel.key] = b.kernels.size();
        b.kernels.push_back(std::move(kernel));
    }
    for (const auto& [bucket_name, bucket] : header.at("buckets").members) {
        Bucket out;
        const json::Value& bound = bucket.at("bound");
        if (!bound.is_null()) out.bound = bound.as_int();
        out.config = bucket.at("config");
        const json::Value& constexprs = bucket.at("constexprs");
        for (const auto& [stage, key] : bucket.at("variants").members) {
            auto it = index.find(key.as_string());
            if (it == index.end()) bad("bucket " + bucket_name + " names kernel " + key.as_string() + ", absent");
            out.stages.push_back({stage, it->second, constexprs.at(key.as_string())});
        }
        b.buckets.push_back(std::move(out));
    }
    if (b.buckets.empty()) bad("kernel bundle has no token bucket");
    const json::Value& state = header.at("state");
    b.state_bytes = state.at("bytes").as_int();
    for (const auto& [region, span] : state.at("regions").members) {
        const auto& pair = span.as_array();
        if (pair.size() != 2) bad("kernel bundle has a malformed state region " + region);
        int64_t offset = pair[0].as_int(), bytes = pair[1].as_int();
        b.state_offsets[region] = offset;
        if (offset < 0 || bytes <= 0 || offset + bytes > b.state_bytes)
            bad("kernel bundle's state region " + region + " lies outside its " + std::to_string(b.state_bytes) +
                " bytes");
    }
    return b;
}

}  // namespace moetrt
