// The C ABI over Bundle / plan_for / Launcher: exceptions become status codes and a per-thread message.
#include <cstring>
#include <memory>
#include <new>
#include <string>

#include "bundle.h"
#include "errors.h"
#include "launcher.h"
#include "moetrt/moetrt.h"
#include "plan.h"

struct moetrt_bundle {
    std::shared_ptr<const moetrt::Bundle> bundle;
};

struct moetrt_launcher {
    std::unique_ptr<moetrt::Launcher> launcher;
};

namespace {

thread_local std::string last_error, last_hint;

template <typename F>
int guarded(F&& body) {
    try {
        body();
        last_error.clear();
        last_hint.clear();
        return MOETRT_OK;
    } catch (const moetrt::Error& err) {
        last_error = err.what();
        last_hint = err.hint();
        return static_cast<int>(err.kind());
    } catch (const std::bad_alloc&) {
        last_error = "out of host memory";
        last_hint.clear();
        return MOETRT_ERROR_INTERNAL;
    } catch (const std::exception& err) {
        last_error = err.what();
        last_hint.clear();
        return MOETRT_ERROR_INTERNAL;
    }
}

void require(const void* p, const char* what) {
    if (!p) throw moetrt::Error(moetrt::ErrorKind::Invalid, std::string(what) + " is null", "pass a valid pointer");
}

}  // namespace

extern "C" {

int moetrt_abi_version(void) { return MOETRT_ABI_VERSION; }

const char* moetrt_last_error(void) { return last_error.c_str(); }

const char* moetrt_last_error_hint(void) { return last_hint.c_str(); }

int moetrt_bundle_parse(const void* data, size_t size, moetrt_bundle** out) {
    return guarded([&] {
        require(out, "out");
        *out = nullptr;
        auto parsed = std::make_shared<const moetrt::Bundle>(moetrt::Bundle::parse(data, size));
        *out = new moetrt_bundle{std::move(parsed)};
    });
}

void moetrt_bundle_free(moetrt_bundle* bundle) { delete bundle; }

int moetrt_bundle_sm(const moetrt_bundle* bundle, int64_t* sm) {
    return guarded([&] {
        require(bundle, "bundle");
        require(sm, "sm");
        *sm = bundle->bundle->sm;
    });
}

int moetrt_bundle_num_inputs(const moetrt_bundle* bundle, int64_t* count) {
    return guarded([&] {
        require(bundle, "bundle");
        require(count, "count");
        *count = static_cast<int64_t>(bundle->bundle->inputs.size());
    });
}

int moetrt_bundle_num_outputs(const moetrt_bundle* bundle, int64_t* count) {
    return guarded([&] {
        require(bundle, "bundle");
        require(count, "count");
        *count = static_cast<int64_t>(bundle->bundle->outputs.size());
    });
}

int moetrt_workspace_size(const moetrt_bundle* bundle, int64_t num_tokens, uint64_t* bytes) {
    return guarded([&] {
        require(bundle, "bundle");
        require(bytes, "bytes");
        *bytes = static_cast<uint64_t>(moetrt::plan_for(*bundle->bundle, num_tokens).workspace_bytes);
    });
}

int moetrt_plan_json(const moetrt_bundle* bundle, int64_t num_tokens, char* buffer, size_t capacity, size_t* needed) {
    return guarded([&] {
        require(bundle, "bundle");
        std::string text = moetrt::describe(*bundle->bundle, moetrt::plan_for(*bundle->bundle, num_tokens));
        if (needed) *needed = text.size() + 1;
        if (buffer && capacity) {
            size_t n = text.size() < capacity - 1 ? text.size() : capacity - 1;
            std::memcpy(buffer, text.data(), n);
            buffer[n] = '\0';
        }
    });
}

int moetrt_check_sm(const moetrt_bundle* bundle, int64_t sm) {
    return guarded([&] {
        require(bundle, "bundle");
        moetrt::check_sm(*bundle->bundle, sm);
    });
}

int moetrt_launch_slots(const moetrt_bundle* bundle, int64_t num_tokens, int64_t index, const uint64_t* inputs,
                        size_t num_inputs, const uint64_t* outputs, size_t num_outputs, uint64_t workspace,
                        uint64_t state, uint64_t* slots, size_t capacity, size_t* count) {
    return guarded([&] {
        require(bundle, "bundle");
        const moetrt::Bundle& b = *bundle->bundle;
        moetrt::check_pointer_counts(b, num_inputs, num_outputs);
        moetrt::Plan plan = moetrt::plan_for(b, num_tokens);
        if (index < 0 || index >= static_cast<int64_t>(plan.launches.size()))
            throw moetrt::Error(moetrt::ErrorKind::Invalid, "launch index " + std::to_string(index) + " is outside the plan",
                                "");
        std::vector<uint64_t> packed =
            moetrt::launch_slots(b, plan.launches[static_cast<size_t>(index)], num_tokens, inputs, outputs, workspace,
                                 state);
        if (count) *count = packed.size();
        for (size_t i = 0; i < packed.size() && i < capacity && slots; ++i) slots[i] = packed[i];
    });
}

int moetrt_launcher_create(const moetrt_bundle* bundle, moetrt_launcher** out) {
    return guarded([&] {
        require(bundle, "bundle");
        require(out, "out");
        *out = nullptr;
        auto launcher = std::make_unique<moetrt::Launcher>(bundle->bundle);
        *out = new moetrt_launcher{std::move(launcher)};
    });
}

void moetrt_launcher_free(moetrt_launcher* launcher) { delete launcher; }

int moetrt_launcher_enqueue_range(moetrt_launcher* launcher, int64_t num_tokens, const uint64_t* inputs,
                                  size_t num_inputs, const uint64_t* outputs, size_t num_outputs,
                                  uint64_t workspace, void* stream, int first, int count) {
    return guarded([&] {
        require(launcher, "launcher");
        if (num_inputs) require(inputs, "inputs");
        if (num_outputs) require(outputs, "outputs");
        launcher->launcher->enqueue(num_tokens, inputs, num_inputs, outputs, num_outputs, workspace,
                                    static_cast<CUstream>(stream), first, count);
    });
}

int moetrt_launcher_enqueue(moetrt_launcher* launcher, int64_t num_tokens, const uint64_t* inputs,
                            size_t num_inputs, const uint64_t* outputs, size_t num_outputs, uint64_t workspace,
                            void* stream) {
    return moetrt_launcher_enqueue_range(launcher, num_tokens, inputs, num_inputs, outputs, num_outputs, workspace,
                                         stream, 0, -1);
}

}  // extern "C"
