// The TensorRT plugin's rules without TensorRT: fields, shapes, formats, workspace and enqueue arguments.
// moe_plugin.cpp converts TensorRT's objects to these plain values, so every rule is tested on a CPU.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bundle.h"

namespace moetrt::plugin {

constexpr int32_t kFieldsVersion = 1;  // trt/fields.py FIELDS_VERSION
constexpr char kKernelsPrefix[] = "kernels_sm";

// The field types the plugin reads and writes (TensorRT's PluginFieldType members of the same name).
enum class FieldType { Int32, Float32, Char, Int8, Other };

struct Field {
    std::string name;
    FieldType type;
    int32_t other_type = 0;  // TensorRT's code when type is Other (kept to write the field back unchanged)
    std::string data;        // raw bytes
    int32_t length = 0;      // elements, as TensorRT counts them
};

// Everything one plugin instance needs: the fields it was made from (written back unchanged, so engines keep
// their format) and the kernel bundle of each SM they carry.
class State {
public:
    // Fields from the ONNX parser (the node's attributes, with the kernels `moetrt build` put there) or from
    // an engine. Throws moetrt::Error: a newer fields version, no kernels, kernels for other attributes.
    static State from_fields(const std::vector<Field>& fields);
    std::vector<Field> to_fields() const;
    // The bundle for `sm`; throws naming the SMs the fields carry.
    const Bundle& bundle_for(int64_t sm) const { return *shared_bundle_for(sm); }
    std::shared_ptr<const Bundle> shared_bundle_for(int64_t sm) const;
    // Any bundle: the op's I/O is the same in all of them (shape and format rules).
    const Bundle& any_bundle() const { return *bundles_.begin()->second; }
    const std::map<int64_t, std::shared_ptr<const Bundle>>& bundles() const { return bundles_; }

private:
    std::vector<Field> fields_;
    std::map<int64_t, std::shared_ptr<const Bundle>> bundles_;
};

// The fields the creator asks TensorRT's ONNX parser for (it passes only those): the op's attributes (as
// op/spec.py MoEAttributes names them), io_dtype, float_attrs_f64, fields_version and kernels_sm<NN> for every
// SM moetrt compiles for (kernels/aot.py SUPPORTED_SMS). Tests compare both lists with Python's.
const std::vector<std::string>& creator_field_names();

// dtype name ("fp32", "fp16", "bf16", "uint8", ...) each position (inputs, then outputs) must have.
std::string expected_dtype(const Bundle& bundle, size_t pos);
// TensorRT asks position by position; in_out[i] = (dtype name, linear format?).
bool supports_format_combination(const Bundle& bundle, int pos, const std::vector<std::pair<std::string, bool>>& in_out,
                                 int num_inputs);
// Throws moetrt::Error naming every input whose dims (-1: dynamic) do not match the op's.
void check_input_dims(const Bundle& bundle, const std::vector<std::vector<int64_t>>& dims);
// T: the product of hidden_states' leading dims.
int64_t num_tokens(const std::vector<int64_t>& hidden_dims);
// Workspace for every token count from `least` to `most` (each bucket's need grows within the bucket).
int64_t workspace_size(const Bundle& bundle, int64_t least, int64_t most);
// Checks enqueue's tensors (count, dtypes, hidden size, null pointers); T, or 0 when there is nothing to do.
int64_t enqueue_tokens(const Bundle& bundle, const std::vector<std::vector<int64_t>>& input_dims,
                       const std::vector<std::string>& dtypes, const std::vector<uint64_t>& pointers);

}  // namespace moetrt::plugin
