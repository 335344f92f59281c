// Drives libmoetrt_plugin.so through TensorRT's plugin interfaces on a GPU, with no TensorRT library: what
// TensorRT would call, in its order (tests/gpu/test_native_plugin.py prepares the files and checks the output).
//   moetrt_plugin_harness PLUGIN_SO FIELDS INPUTS OUTPUTS [TIMED_ITERATIONS]
// FIELDS: the plugin fields Python's writer made (trt/fields.py); INPUTS: the op's inputs; OUTPUTS: written.
#include <NvInferRuntime.h>
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "driver.h"
#include "io_files.h"

using namespace nvinfer1;
using moetrt::testing::Tensor;

namespace {

int failures = 0;
void expect(bool ok, const std::string& what) {
    if (!ok) {
        std::cerr << "FAILED: " << what << std::endl;
        ++failures;
    }
}

struct Cuda {
    decltype(&cuMemAlloc) alloc;
    decltype(&cuMemFree) free;
    decltype(&cuMemcpyHtoD) htod;
    decltype(&cuMemcpyDtoH) dtoh;
    decltype(&cuStreamCreate) stream_create;
    decltype(&cuStreamSynchronize) sync;
    decltype(&cuEventCreate) event_create;
    decltype(&cuEventRecord) event_record;
    decltype(&cuEventElapsedTime) elapsed;
    Cuda() {
        void* lib = dlopen("libcuda.so.1", RTLD_NOW);
        if (!lib) throw std::runtime_error("no libcuda.so.1");
        alloc = reinterpret_cast<decltype(alloc)>(dlsym(lib, "cuMemAlloc_v2"));
        free = reinterpret_cast<decltype(free)>(dlsym(lib, "cuMemFree_v2"));
        htod = reinterpret_cast<decltype(htod)>(dlsym(lib, "cuMemcpyHtoD_v2"));
        dtoh = reinterpret_cast<decltype(dtoh)>(dlsym(lib, "cuMemcpyDtoH_v2"));
        stream_create = reinterpret_cast<decltype(stream_create)>(dlsym(lib, "cuStreamCreate"));
        sync = reinterpret_cast<decltype(sync)>(dlsym(lib, "cuStreamSynchronize"));
        event_create = reinterpret_cast<decltype(event_create)>(dlsym(lib, "cuEventCreate"));
        event_record = reinterpret_cast<decltype(event_record)>(dlsym(lib, "cuEventRecord"));
        elapsed = reinterpret_cast<decltype(elapsed)>(dlsym(lib, "cuEventElapsedTime_v2"));
        if (!elapsed) elapsed = reinterpret_cast<decltype(elapsed)>(dlsym(lib, "cuEventElapsedTime"));
    }
};

DataType trt_dtype(const std::string& name) {
    if (name == "fp32") return DataType::kFLOAT;
    if (name == "fp16") return DataType::kHALF;
    if (name == "bf16") return DataType::kBF16;
    if (name == "uint8") return DataType::kUINT8;
    throw std::runtime_error("unknown dtype " + name);
}

Dims dims_of(const std::vector<int64_t>& d) {
    Dims out{};
    out.nbDims = static_cast<int32_t>(d.size());
    for (size_t i = 0; i < d.size(); ++i) out.d[i] = d[i];
    return out;
}

PluginFieldCollection collection(const std::vector<moetrt::plugin::Field>& fields, std::vector<PluginField>& storage) {
    static const PluginFieldType kTypes[] = {PluginFieldType::kINT32, PluginFieldType::kFLOAT32, PluginFieldType::kCHAR,
                                             PluginFieldType::kINT8};
    storage.clear();
    for (const auto& f : fields)
        storage.emplace_back(f.name.c_str(), f.data.data(), kTypes[static_cast<int>(f.type)], f.length);
    return PluginFieldCollection{static_cast<int32_t>(storage.size()), storage.data()};
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 5) {
        std::cerr << "usage: moetrt_plugin_harness PLUGIN_SO FIELDS INPUTS OUTPUTS [TIMED_ITERATIONS]" << std::endl;
        return 2;
    }
    try {
        void* lib = dlopen(argv[1], RTLD_NOW);
        if (!lib) throw std::runtime_error(dlerror());
        using GetCreators = IPluginCreatorInterface* const* (*)(int32_t&);
        auto get_creators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
        expect(get_creators != nullptr, "the library exports getCreators");
        int32_t n = 0;
        IPluginCreatorInterface* const* creators = get_creators(n);
        expect(n == 1, "one creator");
        auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
        expect(std::string(creator->getInterfaceInfo().kind) == "PLUGIN CREATOR_V3ONE", "creator kind");
        expect(std::string(creator->getPluginName()) == "MoE" && std::string(creator->getPluginVersion()) == "1" &&
                   std::string(creator->getPluginNamespace()) == "moetrt",
               "creator names moetrt::MoE version 1");
        bool lists_kernels = false;
        for (int32_t i = 0; i < creator->getFieldNames()->nbFields; ++i)
            lists_kernels |= std::string(creator->getFieldNames()->fields[i].name) == "kernels_sm90";
        expect(lists_kernels, "the creator asks for kernels_sm90");

        std::vector<moetrt::plugin::Field> fields = moetrt::testing::read_fields(argv[2]);
        std::vector<Tensor> inputs = moetrt::testing::read_tensors(argv[3]);
        std::vector<PluginField> storage;
        PluginFieldCollection fc = collection(fields, storage);
        IPluginV3* built = creator->createPlugin("moe", &fc, TensorRTPhase::kBUILD);
        expect(built != nullptr, "createPlugin (build phase)");
        if (!built) return 1;
        auto* core = static_cast<IPluginV3OneCore*>(built->getCapabilityInterface(PluginCapabilityType::kCORE));
        auto* build = static_cast<IPluginV3OneBuild*>(built->getCapabilityInterface(PluginCapabilityType::kBUILD));
        expect(std::string(core->getPluginName()) == "MoE", "core capability");
        int32_t n_out = build->getNbOutputs();
        int32_t n_in = static_cast<int32_t>(inputs.size());
        std::vector<DataType> in_types, out_types(n_out);
        for (const auto& t : inputs) in_types.push_back(trt_dtype(t.dtype));
        expect(build->getOutputDataTypes(out_types.data(), n_out, in_types.data(), n_in) == 0, "getOutputDataTypes");
        for (auto t : out_types) expect(t == in_types[0], "outputs have hidden_states' dtype");

        std::vector<DynamicPluginTensorDesc> descs(n_in + n_out);
        for (int32_t i = 0; i < n_in + n_out; ++i) {
            std::vector<int64_t> d = i < n_in ? inputs[i].dims : inputs[0].dims;
            descs[i].desc.dims = dims_of(d);
            descs[i].desc.type = i < n_in ? in_types[i] : in_types[0];
            descs[i].desc.format = TensorFormat::kLINEAR;
            descs[i].min = descs[i].max = descs[i].opt = dims_of(d);
        }
        for (int32_t pos = 0; pos < n_in + n_out; ++pos)
            expect(build->supportsFormatCombination(pos, descs.data(), n_in, n_out), "format of position " + std::to_string(pos));
        auto wrong = descs;
        wrong[0].desc.type = in_types[0] == DataType::kFLOAT ? DataType::kHALF : DataType::kFLOAT;
        expect(!build->supportsFormatCombination(0, wrong.data(), n_in, n_out), "a dtype the kernels lack is refused");
        wrong = descs;
        wrong[0].desc.format = TensorFormat::kHWC8;
        expect(!build->supportsFormatCombination(0, wrong.data(), n_in, n_out), "a non-linear format is refused");
        expect(build->configurePlugin(descs.data(), n_in, descs.data() + n_in, n_out) == 0, "configurePlugin");
        auto bad = descs;
        bad[1].desc.dims.d[0] += 1;
        expect(build->configurePlugin(bad.data(), n_in, bad.data() + n_in, n_out) != 0, "wrong router dims are refused");
        size_t workspace_bytes = build->getWorkspaceSize(descs.data(), n_in, descs.data() + n_in, n_out);
        expect(workspace_bytes > 0 || moetrt::plugin::num_tokens(inputs[0].dims) == 0, "workspace size");

        IPluginV3* copy = built->clone();
        expect(copy != nullptr, "clone");
        auto* copy_runtime = static_cast<IPluginV3OneRuntime*>(copy->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        const PluginFieldCollection* serialized = copy_runtime->getFieldsToSerialize();
        expect(serialized && serialized->nbFields >= static_cast<int32_t>(fields.size()), "serialize");
        std::vector<moetrt::plugin::Field> again;
        for (int32_t i = 0; serialized && i < serialized->nbFields; ++i) {
            const PluginField& f = serialized->fields[i];
            size_t width = f.type == PluginFieldType::kINT32 || f.type == PluginFieldType::kFLOAT32 ? 4 : 1;
            moetrt::plugin::Field field{f.name, moetrt::plugin::FieldType::Other, 0,
                                        std::string(static_cast<const char*>(f.data), width * f.length), f.length};
            field.type = f.type == PluginFieldType::kINT32     ? moetrt::plugin::FieldType::Int32
                         : f.type == PluginFieldType::kFLOAT32 ? moetrt::plugin::FieldType::Float32
                         : f.type == PluginFieldType::kCHAR    ? moetrt::plugin::FieldType::Char
                                                               : moetrt::plugin::FieldType::Int8;
            again.push_back(field);
        }
        // The fields it was made from, in order, then only what the parser's collection lacks (fields_version).
        bool same = again.size() >= fields.size();
        for (size_t i = 0; same && i < fields.size(); ++i)
            same = again[i].name == fields[i].name && again[i].data == fields[i].data && again[i].type == fields[i].type;
        for (size_t i = fields.size(); same && i < again.size(); ++i) same = again[i].name == "fields_version";
        expect(same, "serialized fields are the fields it was made from (engines keep their format)");
        PluginFieldCollection fc2 = collection(again, storage);
        IPluginV3* runtime_plugin = creator->createPlugin("moe", &fc2, TensorRTPhase::kRUNTIME);
        expect(runtime_plugin != nullptr, "createPlugin (runtime phase, from the serialized fields)");
        auto* runtime = static_cast<IPluginV3OneRuntime*>(runtime_plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
        IPluginV3* attached = runtime->attachToContext(nullptr);
        auto* run = static_cast<IPluginV3OneRuntime*>(attached->getCapabilityInterface(PluginCapabilityType::kRUNTIME));

        std::vector<PluginTensorDesc> in_desc(n_in), out_desc(n_out);
        for (int32_t i = 0; i < n_in; ++i) in_desc[i] = descs[i].desc;
        for (int32_t i = 0; i < n_out; ++i) out_desc[i] = descs[n_in + i].desc;
        expect(run->onShapeChange(in_desc.data(), n_in, out_desc.data(), n_out) == 0, "onShapeChange");

        int64_t num_experts = 0;
        for (const auto& f : fields)
            if (f.name == "num_experts") {
                int32_t e;
                std::memcpy(&e, f.data.data(), 4);
                num_experts = e;
            }
        if (n_out > 1) out_desc[1].dims.d[out_desc[1].dims.nbDims - 1] = num_experts;

        // device buffers
        const moetrt::Driver& drv = moetrt::Driver::get();
        CUdevice device;
        CUcontext ctx;
        drv.check(drv.device_get(&device, 0), "device 0");
        drv.check(drv.primary_ctx_retain(&ctx, device), "primary context");
        drv.check(drv.ctx_set_current(ctx), "set context");
        Cuda cuda;
        std::vector<CUdeviceptr> in_ptrs(n_in), out_ptrs(n_out);
        for (int32_t i = 0; i < n_in; ++i) {
            drv.check(cuda.alloc(&in_ptrs[i], std::max<size_t>(inputs[i].data.size(), 256)), "alloc");
            drv.check(cuda.htod(in_ptrs[i], inputs[i].data.data(), inputs[i].data.size()), "copy in");
        }
        int64_t tokens = moetrt::plugin::num_tokens(inputs[0].dims);
        size_t esize = inputs[0].dtype == "fp32" ? 4 : 2;
        std::vector<Tensor> outputs(n_out);
        for (int32_t i = 0; i < n_out; ++i) {
            outputs[i].dtype = inputs[0].dtype;
            outputs[i].dims = inputs[0].dims;
            if (i == 1) outputs[i].dims.back() = num_experts;  // router_logits: [..., E]
        }
        for (int32_t i = 0; i < n_out; ++i) {
            size_t bytes = 1;
            for (auto d : outputs[i].dims) bytes *= static_cast<size_t>(d);
            outputs[i].data.assign(bytes * esize, '\0');
            drv.check(cuda.alloc(&out_ptrs[i], std::max<size_t>(outputs[i].data.size(), 256)), "alloc out");
        }
        CUdeviceptr workspace;
        drv.check(cuda.alloc(&workspace, std::max<size_t>(workspace_bytes, 256)), "alloc workspace");
        CUstream stream;
        drv.check(cuda.stream_create(&stream, 0), "stream");
        std::vector<const void*> in_void(n_in);
        std::vector<void*> out_void(n_out);
        for (int32_t i = 0; i < n_in; ++i) in_void[i] = reinterpret_cast<const void*>(in_ptrs[i]);
        for (int32_t i = 0; i < n_out; ++i) out_void[i] = reinterpret_cast<void*>(out_ptrs[i]);
        int status = run->enqueue(in_desc.data(), out_desc.data(), in_void.data(), out_void.data(),
                                  reinterpret_cast<void*>(workspace), reinterpret_cast<cudaStream_t>(stream));
        expect(status == 0, "enqueue");
        drv.check(cuda.sync(stream), "synchronize");
        for (int32_t i = 0; i < n_out; ++i)
            if (!outputs[i].data.empty())
                drv.check(cuda.dtoh(outputs[i].data.data(), out_ptrs[i], outputs[i].data.size()), "copy out");
        moetrt::testing::write_tensors(argv[4], outputs);

        int iterations = argc > 5 ? std::stoi(argv[5]) : 0;
        if (iterations > 0 && tokens > 0) {
            CUevent start, stop;
            drv.check(cuda.event_create(&start, 0), "event");
            drv.check(cuda.event_create(&stop, 0), "event");
            for (int i = 0; i < 20; ++i)
                run->enqueue(in_desc.data(), out_desc.data(), in_void.data(), out_void.data(),
                             reinterpret_cast<void*>(workspace), reinterpret_cast<cudaStream_t>(stream));
            drv.check(cuda.sync(stream), "warm-up");
            auto host0 = std::chrono::steady_clock::now();
            drv.check(cuda.event_record(start, stream), "record");
            for (int i = 0; i < iterations; ++i)
                run->enqueue(in_desc.data(), out_desc.data(), in_void.data(), out_void.data(),
                             reinterpret_cast<void*>(workspace), reinterpret_cast<cudaStream_t>(stream));
            drv.check(cuda.event_record(stop, stream), "record");
            auto host1 = std::chrono::steady_clock::now();
            drv.check(cuda.sync(stream), "synchronize");
            float ms = 0;
            drv.check(cuda.elapsed(&ms, start, stop), "elapsed");
            double host_us = std::chrono::duration<double, std::micro>(host1 - host0).count() / iterations;
            std::cout << "{\"tokens\": " << tokens << ", \"iterations\": " << iterations
                      << ", \"gpu_us_per_enqueue\": " << ms * 1000.0 / iterations
                      << ", \"host_us_per_enqueue\": " << host_us << "}" << std::endl;
        }
        delete attached;
        delete runtime_plugin;
        delete copy;
        delete built;
        std::cerr << (failures ? "FAILED" : "plugin harness: ok") << std::endl;
        return failures ? 1 : 0;
    } catch (const std::exception& err) {
        std::cerr << "error: " << err.what() << std::endl;
        return 1;
    }
}
