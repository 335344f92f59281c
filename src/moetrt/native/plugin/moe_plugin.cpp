// libmoetrt_plugin.so: the moetrt::MoE TensorRT plugin (IPluginV3, OneCore / OneBuild / OneRuntime) and its
// creator. A thin adapter: TensorRT's objects become plain values for plugin_rules.h, and enqueue calls the
// native launcher (launcher.h) on TensorRT's stream and workspace. No CUDA runtime call, no Triton.
#include <NvInferRuntime.h>

#include <cstring>
#include <iostream>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "driver.h"
#include "errors.h"
#include "launcher.h"
#include "plugin_rules.h"

using namespace nvinfer1;

namespace moetrt::plugin {
namespace {

constexpr char kName[] = "MoE";  // op/spec.py PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE
constexpr char kVersion[] = "1";
constexpr char kNamespace[] = "moetrt";
void report(const std::exception& err) { std::cerr << "moetrt::MoE plugin: " << err.what() << std::endl; }

std::string dtype_name(DataType type) {
    switch (type) {
        case DataType::kFLOAT: return "fp32";
        case DataType::kHALF: return "fp16";
        case DataType::kBF16: return "bf16";
        case DataType::kUINT8: return "uint8";
        default: return "other";
    }
}

FieldType field_type(PluginFieldType type) {
    switch (type) {
        case PluginFieldType::kINT32: return FieldType::Int32;
        case PluginFieldType::kFLOAT32: return FieldType::Float32;
        case PluginFieldType::kCHAR: return FieldType::Char;
        case PluginFieldType::kINT8: return FieldType::Int8;
        default: return FieldType::Other;
    }
}

size_t element_bytes(PluginFieldType type) {
    switch (type) {
        case PluginFieldType::kFLOAT64:
        case PluginFieldType::kINT64: return 8;
        case PluginFieldType::kFLOAT32:
        case PluginFieldType::kINT32: return 4;
        case PluginFieldType::kFLOAT16:
        case PluginFieldType::kBF16:
        case PluginFieldType::kINT16: return 2;
        default: return 1;
    }
}

std::vector<Field> fields_of(PluginFieldCollection const* fc) {
    std::vector<Field> out;
    for (int32_t i = 0; fc && i < fc->nbFields; ++i) {
        const PluginField& f = fc->fields[i];
        Field field{f.name ? f.name : "", field_type(f.type), static_cast<int32_t>(f.type), {}, f.length};
        size_t bytes = element_bytes(f.type) * static_cast<size_t>(f.length > 0 ? f.length : 0);
        if (f.data && bytes) field.data.assign(static_cast<const char*>(f.data), bytes);
        out.push_back(std::move(field));
    }
    return out;
}

PluginFieldType trt_type(const Field& f) {
    switch (f.type) {
        case FieldType::Int32: return PluginFieldType::kINT32;
        case FieldType::Float32: return PluginFieldType::kFLOAT32;
        case FieldType::Char: return PluginFieldType::kCHAR;
        case FieldType::Int8: return PluginFieldType::kINT8;
        default: return static_cast<PluginFieldType>(f.other_type);
    }
}

// One launcher (loaded modules) per bundle, shared by every plugin instance and execution context.
std::shared_ptr<Launcher> launcher_for(const std::shared_ptr<const Bundle>& bundle) {
    static std::mutex mutex;
    static std::vector<std::pair<const Bundle*, std::weak_ptr<Launcher>>> cache;
    std::lock_guard<std::mutex> lock(mutex);
    for (auto& [key, weak] : cache)
        if (key == bundle.get())
            if (auto alive = weak.lock()) return alive;
    auto made = std::make_shared<Launcher>(bundle);
    cache.emplace_back(bundle.get(), made);
    return made;
}

}  // namespace

class MoEPlugin : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
public:
    explicit MoEPlugin(std::shared_ptr<const State> state) : state_(std::move(state)) {}

    // IPluginV3
    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
        switch (type) {
            case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
            case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
            case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        }
        return nullptr;
    }
    IPluginV3* clone() noexcept override {
        try {
            return new MoEPlugin(state_);  // the state is immutable: clones share it
        } catch (const std::exception& err) {
            report(err);
            return nullptr;
        }
    }

    // IPluginV3OneCore
    AsciiChar const* getPluginName() const noexcept override { return kName; }
    AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
    AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override { return static_cast<int32_t>(bundle().outputs.size()); }

    int32_t getOutputDataTypes(DataType* out, int32_t nbOutputs, DataType const* in, int32_t nbInputs) const noexcept override {
        if (nbInputs < 1 || nbOutputs != getNbOutputs()) return -1;
        for (int32_t i = 0; i < nbOutputs; ++i) out[i] = in[0];  // every output has hidden_states' dtype
        return 0;
    }

    int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
                            int32_t nbOutputs, IExprBuilder& builder) noexcept override {
        if (nbInputs != static_cast<int32_t>(bundle().inputs.size()) || nbOutputs != getNbOutputs() ||
            inputs[0].nbDims < 2)
            return -1;
        outputs[0] = inputs[0];  // output: hidden_states' dims (a dynamic token count stays dynamic)
        if (nbOutputs > 1) {     // router_logits: [..., E]
            outputs[1] = inputs[0];
            outputs[1].d[inputs[0].nbDims - 1] = builder.constant(bundle().shape.num_experts);
        }
        return 0;
    }

    bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override {
        std::vector<std::pair<std::string, bool>> descs;
        for (int32_t i = 0; i < nbInputs + nbOutputs; ++i)
            descs.emplace_back(dtype_name(inOut[i].desc.type), inOut[i].desc.format == TensorFormat::kLINEAR);
        return supports_format_combination(bundle(), pos, descs, nbInputs);
    }

    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
                            int32_t) noexcept override {
        try {
            check_input_dims(bundle(), dims_of(in, nbInputs, [](const DynamicPluginTensorDesc& d) { return d.desc.dims; }));
            return 0;
        } catch (const std::exception& err) {
            report(err);
            return -1;
        }
    }

    size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
                            int32_t) const noexcept override {
        try {
            if (nbInputs < 1) return 0;
            std::vector<int64_t> lo(in[0].min.d, in[0].min.d + in[0].min.nbDims);
            std::vector<int64_t> hi(in[0].max.d, in[0].max.d + in[0].max.nbDims);
            return static_cast<size_t>(workspace_size(bundle(), num_tokens(lo), num_tokens(hi)));
        } catch (const std::exception& err) {
            report(err);
            return 0;
        }
    }

    char const* getTimingCacheID() noexcept override { return nullptr; }

    // IPluginV3OneRuntime
    int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*, int32_t) noexcept override {
        try {
            check_input_dims(bundle(), dims_of(in, nbInputs, [](const PluginTensorDesc& d) { return d.dims; }));
            return 0;
        } catch (const std::exception& err) {
            report(err);
            return -1;
        }
    }

    int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc, void const* const* inputs,
                    void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
        try {
            if (!launcher_) launcher_ = launcher_for(state_->shared_bundle_for(current_device_sm()));
            const Bundle& b = launcher_->bundle();
            size_t n_in = b.inputs.size(), n_out = b.outputs.size();
            std::vector<std::vector<int64_t>> dims = dims_of(inputDesc, static_cast<int32_t>(n_in),
                                                              [](const PluginTensorDesc& d) { return d.dims; });
            std::vector<std::string> types;
            std::vector<uint64_t> pointers;
            for (size_t i = 0; i < n_in; ++i) {
                types.push_back(dtype_name(inputDesc[i].type));
                pointers.push_back(reinterpret_cast<uint64_t>(inputs[i]));
            }
            for (size_t i = 0; i < n_out; ++i) {
                types.push_back(dtype_name(outputDesc[i].type));
                pointers.push_back(reinterpret_cast<uint64_t>(outputs[i]));
            }
            int64_t t = enqueue_tokens(b, dims, types, pointers);
            if (t == 0) return 0;
            launcher_->enqueue(t, pointers.data(), n_in, pointers.data() + n_in, n_out,
                               reinterpret_cast<uint64_t>(workspace), reinterpret_cast<CUstream>(stream));
            return 0;
        } catch (const std::exception& err) {
            report(err);
            return -1;
        }
    }

    IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override {
        try {
            serialized_ = state_->to_fields();  // TensorRT reads these after we return: keep them
            trt_fields_.clear();
            for (const Field& f : serialized_)
                trt_fields_.emplace_back(f.name.c_str(), f.data.data(), trt_type(f), f.length);
            collection_.nbFields = static_cast<int32_t>(trt_fields_.size());
            collection_.fields = trt_fields_.data();
            return &collection_;
        } catch (const std::exception& err) {
            report(err);
            return nullptr;
        }
    }

private:
    std::shared_ptr<const State> state_;
    std::shared_ptr<Launcher> launcher_;
    std::vector<Field> serialized_;
    std::vector<PluginField> trt_fields_;
    PluginFieldCollection collection_{};

    const Bundle& bundle() const { return state_->any_bundle(); }

    template <typename Desc, typename GetDims>
    static std::vector<std::vector<int64_t>> dims_of(Desc const* descs, int32_t n, GetDims get) {
        std::vector<std::vector<int64_t>> out;
        for (int32_t i = 0; i < n; ++i) {
            Dims d = get(descs[i]);
            out.emplace_back(d.d, d.d + d.nbDims);
        }
        return out;
    }
};

class MoEPluginCreator : public IPluginCreatorV3One {
public:
    MoEPluginCreator() {
        names_ = creator_field_names();
        for (const std::string& name : names_) fields_.emplace_back(name.c_str(), nullptr, PluginFieldType::kUNKNOWN, 0);
        collection_.nbFields = static_cast<int32_t>(fields_.size());
        collection_.fields = fields_.data();
    }

    IPluginV3* createPlugin(AsciiChar const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
        try {
            return new MoEPlugin(std::make_shared<const State>(State::from_fields(fields_of(fc))));
        } catch (const std::exception& err) {
            report(err);
            return nullptr;
        }
    }
    PluginFieldCollection const* getFieldNames() noexcept override { return &collection_; }
    AsciiChar const* getPluginName() const noexcept override { return kName; }
    AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
    AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }

private:
    std::vector<std::string> names_;
    std::vector<PluginField> fields_;
    PluginFieldCollection collection_{};
};

}  // namespace moetrt::plugin

// The entry point TensorRT's plugin registry (loadLibrary, trtexec --dynamicPlugins) looks for.
extern "C" __attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    static moetrt::plugin::MoEPluginCreator creator;
    static IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}
