#include "plugin_rules.h"

#include <cstring>
#include <set>

#include "errors.h"
#include "plan.h"

namespace moetrt::plugin {
namespace {

const char* kRebuild = "rebuild the engine with `moetrt build`";

std::string text_of(const Field& f) {
    std::string s = f.data;
    size_t nul = s.find('\0');
    return nul == std::string::npos ? s : s.substr(0, nul);
}

int64_t int_of(const Field& f) {
    if (f.type == FieldType::Int32 && f.data.size() >= 4) {
        int32_t v;
        std::memcpy(&v, f.data.data(), 4);
        return v;
    }
    throw Error(ErrorKind::Invalid, "MoE plugin field " + f.name + " is not an int32", kRebuild);
}

std::string join(const std::vector<std::string>& items) {
    std::string out;
    for (const auto& s : items) out += (out.empty() ? "" : ", ") + s;
    return out;
}

}  // namespace

State State::from_fields(const std::vector<Field>& fields) {
    State state;
    bool have_version = false;
    for (const Field& f : fields) {
        if (f.name == "plugin_version" || f.name == "plugin_namespace") continue;  // the parser's own
        if (f.name == "fields_version") {
            have_version = true;
            if (int_of(f) > kFieldsVersion)
                throw Error(ErrorKind::Invalid,
                            "the engine's MoE plugin fields are version " + std::to_string(int_of(f)) +
                                ", this moetrt reads up to " + std::to_string(kFieldsVersion),
                            "upgrade moetrt or rebuild the engine with this version");
        }
        if (f.name.rfind(kKernelsPrefix, 0) == 0) {
            if (f.type != FieldType::Int8) throw Error(ErrorKind::Invalid, "MoE plugin field " + f.name + " is not int8", kRebuild);
            int64_t sm = std::stoll(f.name.substr(std::strlen(kKernelsPrefix)));
            auto bundle = std::make_shared<const Bundle>(Bundle::parse(f.data.data(), f.data.size()));
            if (bundle->sm != sm)
                throw Error(ErrorKind::Bundle, "MoE plugin field " + f.name + " holds kernels for sm_" + std::to_string(bundle->sm),
                            kRebuild);
            state.bundles_[sm] = std::move(bundle);
        }
        state.fields_.push_back(f);
    }
    if (state.bundles_.empty())
        throw Error(ErrorKind::Invalid, "the MoE node carries no kernels (no kernels_sm* field)",
                    "build the engine with `moetrt build`, which compiles them into the node");
    if (!have_version) {
        Field version{"fields_version", FieldType::Int32, 0, std::string(4, '\0'), 1};
        std::memcpy(version.data.data(), &kFieldsVersion, 4);
        state.fields_.push_back(version);
    }
    // Every bundle must be for the attributes the fields name (the integers that size the op).
    const Bundle& first = state.any_bundle();
    for (const Field& f : state.fields_) {
        const json::Value* attr = first.attrs.find(f.name);
        if (attr && f.type == FieldType::Int32 && attr->kind == json::Value::Kind::Number && int_of(f) != attr->as_int())
            throw Error(ErrorKind::Bundle, "the MoE node's " + f.name + " is " + std::to_string(int_of(f)) +
                                               ", its kernels were compiled for " + std::to_string(attr->as_int()),
                        kRebuild);
        if (f.name == "io_dtype" && text_of(f) != first.io_dtype)
            throw Error(ErrorKind::Bundle, "the MoE node's io_dtype is " + text_of(f) + ", its kernels are for " + first.io_dtype,
                        kRebuild);
    }
    for (const auto& [sm, bundle] : state.bundles_)
        if (bundle->io_dtype != first.io_dtype || bundle->inputs != first.inputs || bundle->outputs != first.outputs)
            throw Error(ErrorKind::Bundle, "the MoE node's kernels for different SMs disagree on the op's I/O", kRebuild);
    return state;
}

std::vector<Field> State::to_fields() const {
    std::vector<Field> out = fields_;
    bool have_dtype = false;
    for (const Field& f : out) have_dtype |= f.name == "io_dtype";
    if (!have_dtype) {
        std::string name = any_bundle().io_dtype;
        out.push_back({"io_dtype", FieldType::Char, 0, name + '\0', static_cast<int32_t>(name.size() + 1)});
    }
    return out;
}

std::shared_ptr<const Bundle> State::shared_bundle_for(int64_t sm) const {
    auto it = bundles_.find(sm);
    if (it == bundles_.end()) {
        std::vector<std::string> have;
        for (const auto& [s, _] : bundles_) have.push_back("sm_" + std::to_string(s));
        throw Error(ErrorKind::Unsupported,
                    "the engine's MoE plugin carries no kernels for SM " + std::to_string(sm) + " (it has " + join(have) + ")",
                    "rebuild the engine with `moetrt build ... --target sm_" + std::to_string(sm) + "` on this GPU");
    }
    return it->second;
}

const std::vector<std::string>& creator_field_names() {
    static const std::vector<std::string> names = [] {
        std::vector<std::string> out = {
            "num_experts", "top_k", "hidden_size", "intermediate_size", "scoring", "topk_before_score",
            "norm_topk_prob", "n_group", "topk_group", "routed_scaling_factor", "activation", "swiglu_alpha",
            "swiglu_limit", "has_router_bias", "has_score_correction_bias", "has_expert_bias",
            "shared_intermediate_size", "has_shared_gate", "output_router_logits", "weight_format", "weight_block",
            "has_weight_zero_point", "activation_format", "io_dtype", "float_attrs_f64", "fields_version"};
        for (int sm : {80, 86, 87, 89, 90, 100, 120}) out.push_back(std::string(kKernelsPrefix) + std::to_string(sm));
        return out;
    }();
    return names;
}

std::string expected_dtype(const Bundle& b, size_t pos) {
    if (pos < b.input_dtypes.size() && !b.input_dtypes[pos].empty()) return b.input_dtypes[pos];
    return b.io_dtype;
}

bool supports_format_combination(const Bundle& b, int pos, const std::vector<std::pair<std::string, bool>>& in_out,
                                 int num_inputs) {
    if (num_inputs != static_cast<int>(b.inputs.size()) || in_out.size() != b.inputs.size() + b.outputs.size()) return false;
    if (pos < 0 || pos >= static_cast<int>(in_out.size())) return false;
    const auto& [dtype, linear] = in_out[static_cast<size_t>(pos)];
    return linear && dtype == expected_dtype(b, static_cast<size_t>(pos));
}

void check_input_dims(const Bundle& b, const std::vector<std::vector<int64_t>>& dims) {
    if (dims.size() != b.inputs.size())
        throw Error(ErrorKind::Invalid,
                    "MoE plugin got " + std::to_string(dims.size()) + " inputs, its attributes name " +
                        std::to_string(b.inputs.size()) + " (" + join(b.inputs) + ")",
                    "re-fuse the model so the node's inputs match its has_* attributes");
    std::vector<std::string> problems;
    for (size_t i = 0; i < dims.size(); ++i) {
        std::vector<int64_t> got = dims[i], want = b.input_shapes[i];
        if (i == 0) {  // hidden_states: any leading dims, then H
            got = got.empty() ? got : std::vector<int64_t>{got.back()};
            want = {b.shape.hidden_size};
        }
        bool ok = got.size() == want.size();
        for (size_t d = 0; ok && d < got.size(); ++d) ok = got[d] == want[d] || got[d] == -1 || want[d] == -1;
        if (!ok) {
            std::string g, w;
            for (auto v : got) g += (g.empty() ? "" : ",") + std::to_string(v);
            for (auto v : want) w += (w.empty() ? "" : ",") + std::to_string(v);
            problems.push_back(b.inputs[i] + " (" + g + ") != (" + w + ")");
        }
    }
    if (!problems.empty())
        throw Error(ErrorKind::Invalid, "MoE plugin inputs do not match its attributes: " + join(problems),
                    "re-export and re-fuse the model");
}

int64_t num_tokens(const std::vector<int64_t>& hidden_dims) {
    int64_t t = 1;
    for (size_t i = 0; i + 1 < hidden_dims.size(); ++i) t *= hidden_dims[i];
    return t;
}

int64_t workspace_size(const Bundle& b, int64_t least, int64_t most) {
    std::set<int64_t> candidates{most};
    for (const Bucket& bucket : b.buckets)
        if (bucket.bound && least <= *bucket.bound && *bucket.bound <= most) candidates.insert(*bucket.bound);
    int64_t size = 0;
    for (int64_t t : candidates)
        if (t > 0) size = std::max(size, plan_for(b, t).workspace_bytes);
    return size;
}

int64_t enqueue_tokens(const Bundle& b, const std::vector<std::vector<int64_t>>& input_dims,
                       const std::vector<std::string>& dtypes, const std::vector<uint64_t>& pointers) {
    size_t want = b.inputs.size() + b.outputs.size();
    if (input_dims.size() != b.inputs.size() || dtypes.size() != want || pointers.size() != want)
        throw Error(ErrorKind::Invalid,
                    "MoE plugin enqueue got " + std::to_string(input_dims.size()) + " inputs / " +
                        std::to_string(pointers.size() - std::min(pointers.size(), input_dims.size())) + " outputs, expected " +
                        std::to_string(b.inputs.size()) + " / " + std::to_string(b.outputs.size()),
                    "rebuild the engine");
    std::vector<std::string> wrong;
    for (size_t pos = 0; pos < want; ++pos)
        if (dtypes[pos] != expected_dtype(b, pos)) wrong.push_back(dtypes[pos]);
    if (!wrong.empty())
        throw Error(ErrorKind::Invalid, "MoE plugin built for " + b.io_dtype + " got tensors of " + join(wrong),
                    "rebuild the engine");
    const auto& hidden = input_dims[0];
    if (hidden.empty() || hidden.back() != b.shape.hidden_size)
        throw Error(ErrorKind::Invalid, "MoE hidden size " + (hidden.empty() ? std::string("?") : std::to_string(hidden.back())) +
                                            " != " + std::to_string(b.shape.hidden_size),
                    "rebuild the engine");
    int64_t t = num_tokens(hidden);
    if (t == 0) return 0;
    for (uint64_t p : pointers)
        if (!p) throw Error(ErrorKind::Invalid, "MoE plugin got a null tensor pointer", "check the engine's bindings");
    return t;
}

}  // namespace moetrt::plugin
