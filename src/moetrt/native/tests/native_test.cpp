// CPU tests of the native library, driven by tests/test_native_cmake.py (which builds this with CMake):
//   native_test selftest BUNDLE          JSON reader cases and every refusal of a damaged bundle
//   native_test plan BUNDLE T...         the plan of each T, one JSON line each (compared with plan.py)
//   native_test fields IN OUT            plugin fields read and written back (compared with trt/fields.py)
//   native_test rules BUNDLE             the plugin's dtype, dims and workspace rules as JSON (vs io_rules.py)
//   native_test names                    the fields the plugin creator asks the ONNX parser for
#include <cstring>
#include <functional>
#include <iostream>
#include <string>

#include "bundle.h"
#include "errors.h"
#include "io_files.h"
#include "json.h"
#include "launcher.h"
#include "plan.h"
#include "plugin_rules.h"

using namespace moetrt;

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
    if (!ok) {
        std::cerr << "FAILED: " << what << std::endl;
        ++failures;
    }
}

void expect_error(const std::function<void()>& body, const std::string& fragment, const std::string& what) {
    try {
        body();
        expect(false, what + ": no error");
    } catch (const Error& err) {
        expect(std::string(err.what()).find(fragment) != std::string::npos,
               what + ": message \"" + err.what() + "\" lacks \"" + fragment + "\"");
    }
}

int selftest(const std::string& path) {
    json::Value v = json::parse(R"({"a": [1, -2, 3.5e2, true, false, null], "s": "x\"\u00e9\ud83d\ude00", "o": {}})");
    expect(v.at("a").as_array().size() == 6, "array size");
    expect(v.at("a").as_array()[1].as_int() == -2, "negative int");
    expect(v.at("a").as_array()[2].as_number() == 350.0 && !v.at("a").as_array()[2].integral, "exponent");
    expect(v.at("a").as_array()[3].boolean && !v.at("a").as_array()[4].boolean, "booleans");
    expect(v.at("a").as_array()[5].is_null(), "null");
    expect(v.at("s").as_string() == "x\"\xc3\xa9\xf0\x9f\x98\x80", "escapes and surrogate pairs");
    for (const char* bad : {"", "{", "[1,]", "{\"a\" 1}", "tru", "\"open", "{} x", "-"})
        expect_error([&] { json::parse(bad); }, "not valid JSON", std::string("reject ") + bad);

    std::string data = testing::read_file(path);
    Bundle b = Bundle::parse(data.data(), data.size());
    expect(!b.kernels.empty() && !b.buckets.empty(), "bundle parses");
    expect_error([&] { Bundle::parse(data.data(), 10); }, "no moetrt header", "too short");
    expect_error([&] { Bundle::parse(data.data(), 40); }, "truncated", "header cut");
    expect_error([&] { Bundle::parse(data.data(), data.size() - 1); }, "truncated", "cubin cut");
    std::string magic = data;
    magic[0] = 'X';
    expect_error([&] { Bundle::parse(magic.data(), magic.size()); }, "no moetrt header", "wrong magic");
    std::string version = data;
    size_t at = version.find("\"version\": " + std::to_string(kBundleVersion));
    expect(at != std::string::npos, "header has its version");
    // another version of as many digits: the header's length prefix stays right
    const std::string current = std::to_string(kBundleVersion);
    std::string other = std::to_string(kBundleVersion + 1);
    if (other.size() != current.size()) other = std::to_string(kBundleVersion - 1);
    version.replace(at + 11, current.size(), other);
    expect_error([&] { Bundle::parse(version.data(), version.size()); },
                 "version " + other + " is not " + current, "other version");
    expect_error([&] { check_sm(b, b.sm + 1); }, "the GPU is sm_" + std::to_string(b.sm + 1), "SM mismatch");
    check_sm(b, b.sm);
    expect_error([&] { plan_for(b, -1); }, "negative token count", "negative T");
    expect(plan_for(b, 0).launches.empty(), "no launches for T = 0");
    // persistent grids: at most one program per SM of the device; other grids as planned
    Launch persistent{"down_rows", 0, {264, 1, 1}, {}, false, true};
    expect(device_grid(persistent, 114)[0] == 114 && device_grid(persistent, 400)[0] == 264, "persistent grid");
    Launch tiled{"down_rows", 0, {264, 1, 1}, {}, false, false};
    expect(device_grid(tiled, 114)[0] == 264, "one program per tile");
    std::cout << (failures ? "FAILED" : "ok") << std::endl;
    return failures ? 1 : 0;
}

int plans(const std::string& path, int argc, char** argv) {
    std::string data = testing::read_file(path);
    Bundle b = Bundle::parse(data.data(), data.size());
    for (int i = 0; i < argc; ++i) std::cout << describe(b, plan_for(b, std::stoll(argv[i]))) << "\n";
    return 0;
}

int fields(const std::string& in, const std::string& out) {
    plugin::State state = plugin::State::from_fields(testing::read_fields(in));
    testing::write_fields(out, state.to_fields());
    return 0;
}

int rules(const std::string& path) {
    std::string data = testing::read_file(path);
    Bundle b = Bundle::parse(data.data(), data.size());
    size_t positions = b.inputs.size() + b.outputs.size();
    std::cout << "{\"expected_dtypes\": [";
    for (size_t p = 0; p < positions; ++p) std::cout << (p ? ", " : "") << '"' << plugin::expected_dtype(b, p) << '"';
    std::vector<std::pair<std::string, bool>> io;
    for (size_t p = 0; p < positions; ++p) io.emplace_back(plugin::expected_dtype(b, p), true);
    std::cout << "], \"supports_expected\": [";
    for (size_t p = 0; p < positions; ++p)
        std::cout << (p ? ", " : "") << (plugin::supports_format_combination(b, static_cast<int>(p), io, static_cast<int>(b.inputs.size())) ? "true" : "false");
    auto strided = io;
    strided[0].second = false;
    std::cout << "], \"supports_strided_hidden\": "
              << (plugin::supports_format_combination(b, 0, strided, static_cast<int>(b.inputs.size())) ? "true" : "false");
    std::cout << ", \"workspace\": [";
    const int64_t ranges[][2] = {{1, 1}, {1, 16}, {1, 4096}, {17, 600}, {600, 600}};
    for (size_t r = 0; r < 5; ++r)
        std::cout << (r ? ", " : "") << '[' << ranges[r][0] << ", " << ranges[r][1] << ", "
                  << plugin::workspace_size(b, ranges[r][0], ranges[r][1]) << ']';
    std::vector<std::vector<int64_t>> dims = b.input_shapes;
    dims[0] = {2, 3, b.shape.hidden_size};
    for (auto& d : dims)
        for (auto& x : d)
            if (x < 0) x = -1;
    plugin::check_input_dims(b, dims);
    std::vector<std::string> types;
    for (size_t p = 0; p < positions; ++p) types.push_back(plugin::expected_dtype(b, p));
    std::vector<uint64_t> pointers(positions, 256);
    std::cout << "], \"enqueue_tokens\": " << plugin::enqueue_tokens(b, dims, types, pointers);
    dims[1][0] += 1;  // router_weight with one expert too many
    std::string message;
    try {
        plugin::check_input_dims(b, dims);
    } catch (const Error& err) {
        message = err.message();
    }
    std::cout << ", \"bad_dims\": \"" << message << "\"}" << std::endl;
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        std::string cmd = argc > 1 ? argv[1] : "";
        if (cmd == "selftest" && argc == 3) return selftest(argv[2]);
        if (cmd == "plan" && argc >= 3) return plans(argv[2], argc - 3, argv + 3);
        if (cmd == "fields" && argc == 4) return fields(argv[2], argv[3]);
        if (cmd == "rules" && argc == 3) return rules(argv[2]);
        if (cmd == "names" && argc == 2) {
            for (const auto& name : plugin::creator_field_names()) std::cout << name << "\n";
            return 0;
        }
        std::cerr << "usage: native_test selftest|plan|fields|rules ..." << std::endl;
        return 2;
    } catch (const std::exception& err) {
        std::cerr << "error: " << err.what() << std::endl;
        return 1;
    }
}
