// Files the native tests exchange with Python (tests/moetrt_testing/native_files.py writes and reads them):
//   fields file:  u32 count, then per field: u32 name bytes, name, i32 type (0 int32, 1 float32, 2 char,
//                 3 int8), i32 length (elements), u64 bytes, data
//   tensors file: u32 count, then per tensor: u32 dtype-name bytes, dtype name, u32 rank, i64 dims[rank],
//                 u64 bytes, data
#pragma once

#include <cstdint>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "plugin_rules.h"

namespace moetrt::testing {

struct Tensor {
    std::string dtype;
    std::vector<int64_t> dims;
    std::string data;
};

template <typename T>
T get(std::ifstream& in) {
    T v{};
    if (!in.read(reinterpret_cast<char*>(&v), sizeof v)) throw std::runtime_error("file is truncated");
    return v;
}

inline std::string get_bytes(std::ifstream& in, uint64_t n) {
    std::string s(n, '\0');
    if (n && !in.read(s.data(), static_cast<std::streamsize>(n))) throw std::runtime_error("file is truncated");
    return s;
}

template <typename T>
void put(std::ofstream& out, T v) {
    out.write(reinterpret_cast<const char*>(&v), sizeof v);
}

inline std::vector<plugin::Field> read_fields(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot open " + path);
    std::vector<plugin::Field> out;
    for (uint32_t n = get<uint32_t>(in); n; --n) {
        plugin::Field f;
        f.name = get_bytes(in, get<uint32_t>(in));
        f.type = static_cast<plugin::FieldType>(get<int32_t>(in));
        f.length = get<int32_t>(in);
        f.data = get_bytes(in, get<uint64_t>(in));
        out.push_back(std::move(f));
    }
    return out;
}

inline void write_fields(const std::string& path, const std::vector<plugin::Field>& fields) {
    std::ofstream out(path, std::ios::binary);
    put<uint32_t>(out, static_cast<uint32_t>(fields.size()));
    for (const auto& f : fields) {
        put<uint32_t>(out, static_cast<uint32_t>(f.name.size()));
        out.write(f.name.data(), static_cast<std::streamsize>(f.name.size()));
        put<int32_t>(out, static_cast<int32_t>(f.type));
        put<int32_t>(out, f.length);
        put<uint64_t>(out, f.data.size());
        out.write(f.data.data(), static_cast<std::streamsize>(f.data.size()));
    }
}

inline std::vector<Tensor> read_tensors(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot open " + path);
    std::vector<Tensor> out;
    for (uint32_t n = get<uint32_t>(in); n; --n) {
        Tensor t;
        t.dtype = get_bytes(in, get<uint32_t>(in));
        for (uint32_t r = get<uint32_t>(in); r; --r) t.dims.push_back(get<int64_t>(in));
        t.data = get_bytes(in, get<uint64_t>(in));
        out.push_back(std::move(t));
    }
    return out;
}

inline void write_tensors(const std::string& path, const std::vector<Tensor>& tensors) {
    std::ofstream out(path, std::ios::binary);
    put<uint32_t>(out, static_cast<uint32_t>(tensors.size()));
    for (const auto& t : tensors) {
        put<uint32_t>(out, static_cast<uint32_t>(t.dtype.size()));
        out.write(t.dtype.data(), static_cast<std::streamsize>(t.dtype.size()));
        put<uint32_t>(out, static_cast<uint32_t>(t.dims.size()));
        for (int64_t d : t.dims) put<int64_t>(out, d);
        put<uint64_t>(out, t.data.size());
        out.write(t.data.data(), static_cast<std::streamsize>(t.data.size()));
    }
}

inline std::string read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot open " + path);
    return std::string(std::istreambuf_iterator<char>(in), {});
}

}  // namespace moetrt::testing
