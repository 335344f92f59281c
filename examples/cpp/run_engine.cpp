// Runs an engine built by `moetrt build` from C++: checks the plan against manifest.json, loads
// libmoetrt_plugin.so into TensorRT's plugin registry, binds every input (filled with small deterministic
// values) and output, runs once on a stream and prints each output's shape and first values.
//
//   run_engine BUILD_DIR PLUGIN_SO [TOKENS]
//
// TensorRT (libnvinfer) and the CUDA driver are opened at run time, so this builds with TensorRT's headers only.
#include <NvInferRuntime.h>
#include <dlfcn.h>

#include <cstring>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "driver.h"
#include "json.h"
#include "launcher.h"

using namespace nvinfer1;

namespace {

class Logger : public ILogger {
    void log(Severity severity, AsciiChar const* msg) noexcept override {
        if (severity <= Severity::kWARNING) std::cerr << "TensorRT: " << msg << std::endl;
    }
};

[[noreturn]] void fail(const std::string& what, const std::string& hint) {
    std::cerr << "error: " << what << "; " << hint << std::endl;
    std::exit(1);
}

std::string read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) fail("cannot read " + path, "pass a directory written by `moetrt build`");
    return std::string(std::istreambuf_iterator<char>(in), {});
}

size_t element_size(DataType t) {
    switch (t) {
        case DataType::kFLOAT:
        case DataType::kINT32: return 4;
        case DataType::kHALF:
        case DataType::kBF16: return 2;
        case DataType::kINT64: return 8;
        default: return 1;
    }
}

// The manifest's checks a C++ loader can make without hashing: listed, built, same size, same SM.
void check_plan(const std::string& dir, const std::string& plan, int64_t device_sm) {
    moetrt::json::Value manifest = moetrt::json::parse(read_file(dir + "/manifest.json"));
    const moetrt::json::Value* engine = manifest.find("engine");
    const moetrt::json::Value* files = manifest.find("files");
    const moetrt::json::Value* entry = files ? files->find("model.plan") : nullptr;
    const moetrt::json::Value* built = engine ? engine->find("built") : nullptr;
    if (!entry || !built || !built->boolean) fail("model.plan is not listed in its manifest", "rebuild with `moetrt build`");
    if (static_cast<int64_t>(plan.size()) != entry->at("bytes").as_int())
        fail("model.plan does not match its manifest (corrupt, truncated or replaced)", "rebuild with `moetrt build`");
    int64_t built_for = manifest.at("target").at("sm").as_int();
    bool runs_here = built_for == device_sm;
    if (const moetrt::json::Value* sms = engine->find("runs_on_sms"); sms && !sms->is_null())
        for (const auto& sm : sms->as_array()) runs_here |= sm.as_int() == device_sm;
    if (!runs_here)
        fail("model.plan was built for SM " + std::to_string(built_for) + ", this GPU is SM " + std::to_string(device_sm),
             "rebuild on this GPU with `moetrt build ... --target sm_" + std::to_string(device_sm) + "`");
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 3) {
        std::cerr << "usage: run_engine BUILD_DIR PLUGIN_SO [TOKENS]" << std::endl;
        return 2;
    }
    std::string dir = argv[1];
    int64_t tokens = argc > 3 ? std::stoll(argv[3]) : 0;  // 0: each input's optimal profile shape
    try {
        const moetrt::Driver& drv = moetrt::Driver::get();
        CUdevice device;
        CUcontext ctx;
        drv.check(drv.device_get(&device, 0), "opening device 0");
        drv.check(drv.primary_ctx_retain(&ctx, device), "retaining the primary context");
        drv.check(drv.ctx_set_current(ctx), "making it current");
        std::string plan = read_file(dir + "/model.plan");
        check_plan(dir, plan, moetrt::device_sm(device));

        void* nvinfer = nullptr;
        for (const char* name : {"libnvinfer.so", "libnvinfer.so.11", "libnvinfer.so.10"})
            if ((nvinfer = dlopen(name, RTLD_NOW | RTLD_GLOBAL))) break;
        if (!nvinfer) fail("cannot open libnvinfer", "install TensorRT 10.8 or later and add its lib/ to LD_LIBRARY_PATH");
        using Create = void* (*)(void*, int32_t);
        auto create = reinterpret_cast<Create>(dlsym(nvinfer, "createInferRuntime_INTERNAL"));
        Logger logger;
        IRuntime* runtime = create ? static_cast<IRuntime*>(create(&logger, NV_TENSORRT_VERSION)) : nullptr;
        if (!runtime) fail("TensorRT refused to create a runtime", "check that libnvinfer matches these headers' version");
        if (!runtime->getPluginRegistry().loadLibrary(argv[2]))
            fail(std::string("TensorRT could not load ") + argv[2], "build libmoetrt_plugin.so (src/moetrt/native, -DTensorRT_ROOT)");
        ICudaEngine* engine = runtime->deserializeCudaEngine(plan.data(), plan.size());
        if (!engine) fail("TensorRT could not deserialize model.plan", "see TensorRT's message above");
        IExecutionContext* context = engine->createExecutionContext();

        auto cu_alloc = reinterpret_cast<decltype(&cuMemAlloc)>(dlsym(RTLD_DEFAULT, "cuMemAlloc_v2"));
        auto cu_htod = reinterpret_cast<decltype(&cuMemcpyHtoD)>(dlsym(RTLD_DEFAULT, "cuMemcpyHtoD_v2"));
        auto cu_dtoh = reinterpret_cast<decltype(&cuMemcpyDtoH)>(dlsym(RTLD_DEFAULT, "cuMemcpyDtoH_v2"));
        auto cu_stream = reinterpret_cast<decltype(&cuStreamCreate)>(dlsym(RTLD_DEFAULT, "cuStreamCreate"));
        auto cu_sync = reinterpret_cast<decltype(&cuStreamSynchronize)>(dlsym(RTLD_DEFAULT, "cuStreamSynchronize"));
        if (!cu_alloc || !cu_htod || !cu_dtoh || !cu_stream || !cu_sync) fail("the CUDA driver lacks a memory call", "update the driver");

        std::vector<std::pair<std::string, CUdeviceptr>> outputs;
        for (int32_t i = 0; i < engine->getNbIOTensors(); ++i) {
            const char* name = engine->getIOTensorName(i);
            if (engine->getTensorIOMode(name) != TensorIOMode::kINPUT) continue;
            Dims dims = engine->getProfileShape(name, 0, OptProfileSelector::kOPT);
            if (tokens > 0 && dims.nbDims >= 2) dims.d[dims.nbDims - 2] = tokens;  // [..., T, H]: the token dim
            if (!context->setInputShape(name, dims)) fail(std::string("input shape of ") + name + " is outside the profile", "pass another TOKENS");
            size_t count = 1;
            for (int32_t d = 0; d < dims.nbDims; ++d) count *= static_cast<size_t>(dims.d[d]);
            DataType type = engine->getTensorDataType(name);
            std::vector<unsigned char> host(count * element_size(type), 0);
            for (size_t j = 0; j < count; ++j) {  // small values every input type accepts (ids, positions, states)
                if (type == DataType::kFLOAT) { float v = 0.01f * static_cast<float>(j % 7); std::memcpy(&host[j * 4], &v, 4); }
                else if (type == DataType::kHALF) { uint16_t v = 0x2000 + (j % 7); std::memcpy(&host[j * 2], &v, 2); }
                else if (type == DataType::kBF16) { uint16_t v = 0x3c00 + (j % 7); std::memcpy(&host[j * 2], &v, 2); }
                else if (type == DataType::kINT64) { int64_t v = static_cast<int64_t>(j % 7); std::memcpy(&host[j * 8], &v, 8); }
                else if (type == DataType::kINT32) { int32_t v = static_cast<int32_t>(j % 7); std::memcpy(&host[j * 4], &v, 4); }
            }
            CUdeviceptr ptr = 0;
            drv.check(cu_alloc(&ptr, std::max<size_t>(host.size(), 256)), "allocating an input");
            if (!host.empty()) drv.check(cu_htod(ptr, host.data(), host.size()), "copying an input");
            context->setTensorAddress(name, reinterpret_cast<void*>(ptr));
        }
        for (int32_t i = 0; i < engine->getNbIOTensors(); ++i) {
            const char* name = engine->getIOTensorName(i);
            if (engine->getTensorIOMode(name) != TensorIOMode::kOUTPUT) continue;
            Dims dims = context->getTensorShape(name);
            size_t count = 1;
            for (int32_t d = 0; d < dims.nbDims; ++d) count *= static_cast<size_t>(dims.d[d]);
            CUdeviceptr ptr = 0;
            drv.check(cu_alloc(&ptr, std::max<size_t>(count * element_size(engine->getTensorDataType(name)), 256)), "allocating an output");
            context->setTensorAddress(name, reinterpret_cast<void*>(ptr));
            outputs.emplace_back(name, ptr);
        }
        CUstream stream;
        drv.check(cu_stream(&stream, 0), "creating a stream");
        if (!context->enqueueV3(reinterpret_cast<cudaStream_t>(stream))) fail("enqueueV3 failed", "see TensorRT's message above");
        drv.check(cu_sync(stream), "running the engine");
        for (const auto& [name, ptr] : outputs) {
            Dims dims = context->getTensorShape(name.c_str());
            std::cout << name << " [";
            for (int32_t d = 0; d < dims.nbDims; ++d) std::cout << (d ? ", " : "") << dims.d[d];
            std::cout << "]";
            if (engine->getTensorDataType(name.c_str()) == DataType::kFLOAT) {
                float head[4] = {0, 0, 0, 0};
                drv.check(cu_dtoh(head, ptr, sizeof head), "copying an output");
                std::cout << " first values: " << head[0] << " " << head[1] << " " << head[2] << " " << head[3];
            }
            std::cout << std::endl;
        }
        return 0;
    } catch (const std::exception& err) {
        std::cerr << "error: " << err.what() << std::endl;
        return 1;
    }
}
