/* moetrt native launcher: the C ABI.
 *
 * A bundle is the bytes `moetrt build` / `moetrt aot` write for one (MoE attributes, dtype, SM): cubins and
 * launch configurations. Parsing and planning need no GPU; a launcher loads the cubins into the current CUDA
 * context and enqueues the op on a stream. Every function returns 0 on success or a moetrt_status code;
 * moetrt_last_error() then says what went wrong and what to do (per thread). */
#ifndef MOETRT_MOETRT_H
#define MOETRT_MOETRT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOETRT_ABI_VERSION 1

#if defined(_WIN32)
#define MOETRT_API __declspec(dllexport)
#else
#define MOETRT_API __attribute__((visibility("default")))
#endif

typedef enum moetrt_status {
    MOETRT_OK = 0,
    MOETRT_ERROR_INVALID = 1,     /* an argument is wrong (count, null pointer, token count) */
    MOETRT_ERROR_BUNDLE = 2,      /* the bundle is damaged, truncated or from another version */
    MOETRT_ERROR_CUDA = 3,        /* the CUDA driver failed or is missing */
    MOETRT_ERROR_UNSUPPORTED = 4, /* the bundle's SM is not the GPU's */
    MOETRT_ERROR_INTERNAL = 5
} moetrt_status;

typedef struct moetrt_bundle moetrt_bundle;
typedef struct moetrt_launcher moetrt_launcher;

MOETRT_API int moetrt_abi_version(void);
/* The last error of this thread as one line, "what went wrong; what to do" ("" when none). */
MOETRT_API const char* moetrt_last_error(void);
/* Just the "what to do" part of it. */
MOETRT_API const char* moetrt_last_error_hint(void);

/* Parses (and copies) `size` bytes. */
MOETRT_API int moetrt_bundle_parse(const void* data, size_t size, moetrt_bundle** out);
MOETRT_API void moetrt_bundle_free(moetrt_bundle* bundle);
MOETRT_API int moetrt_bundle_sm(const moetrt_bundle* bundle, int64_t* sm);
/* Number of input / output pointers enqueue takes (present inputs / outputs of the op). */
MOETRT_API int moetrt_bundle_num_inputs(const moetrt_bundle* bundle, int64_t* count);
MOETRT_API int moetrt_bundle_num_outputs(const moetrt_bundle* bundle, int64_t* count);
/* Bytes of device workspace an enqueue of `num_tokens` needs (0 for no tokens). */
MOETRT_API int moetrt_workspace_size(const moetrt_bundle* bundle, int64_t num_tokens, uint64_t* bytes);
/* The plan for `num_tokens` as JSON (launches, grids, arguments, workspace layout). Writes at most `capacity`
 * bytes including the terminating NUL; `*needed` receives the full size. */
MOETRT_API int moetrt_plan_json(const moetrt_bundle* bundle, int64_t num_tokens, char* buffer, size_t capacity,
                     size_t* needed);

/* MOETRT_ERROR_UNSUPPORTED, naming both, unless the bundle was compiled for `sm` (e.g. 90 for 9.0). */
MOETRT_API int moetrt_check_sm(const moetrt_bundle* bundle, int64_t sm);
/* The kernel parameter slots of launch `index` of the plan for `num_tokens`: one 8-byte slot per parameter
 * (pointers whole, i32 in the low 4 bytes), as cuLaunchKernel receives them. `state`: where a launcher's
 * per-stream state would be (the launcher keeps its own; a plan's "state" arguments point into it). Writes at
 * most `capacity`; `*count` receives the number of slots. */
MOETRT_API int moetrt_launch_slots(const moetrt_bundle* bundle, int64_t num_tokens, int64_t index,
                                   const uint64_t* inputs, size_t num_inputs, const uint64_t* outputs,
                                   size_t num_outputs, uint64_t workspace, uint64_t state, uint64_t* slots,
                                   size_t capacity, size_t* count);

/* Loads the bundle's cubins into the current CUDA context (device 0's primary context when none is current). */
MOETRT_API int moetrt_launcher_create(const moetrt_bundle* bundle, moetrt_launcher** out);
MOETRT_API void moetrt_launcher_free(moetrt_launcher* launcher);
/* Enqueues the op for `num_tokens` tokens on `stream` (a CUstream; 0: the legacy default stream).
 * inputs / outputs: device pointers in the op's node order (present ones only); workspace: at least
 * moetrt_workspace_size bytes. Asynchronous; nothing is launched for 0 tokens. */
MOETRT_API int moetrt_launcher_enqueue(moetrt_launcher* launcher, int64_t num_tokens, const uint64_t* inputs,
                            size_t num_inputs, const uint64_t* outputs, size_t num_outputs, uint64_t workspace,
                            void* stream);
/* Enqueues launches [first, first + count) of the plan only (per-stage timing). */
MOETRT_API int moetrt_launcher_enqueue_range(moetrt_launcher* launcher, int64_t num_tokens, const uint64_t* inputs,
                                  size_t num_inputs, const uint64_t* outputs, size_t num_outputs,
                                  uint64_t workspace, void* stream, int first, int count);

#ifdef __cplusplus
}
#endif

#endif /* MOETRT_MOETRT_H */
