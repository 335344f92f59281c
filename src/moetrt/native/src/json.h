// A small JSON reader for the kernel bundle header (written by Python's json.dumps).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace moetrt::json {

struct Value {
    enum class Kind { Null, Bool, Number, String, Array, Object };
    Kind kind = Kind::Null;
    bool boolean = false;
    double number = 0.0;
    bool integral = false;  // the literal had no fraction or exponent
    int64_t integer = 0;
    std::string text;
    std::vector<Value> items;
    std::vector<std::pair<std::string, Value>> members;  // in document order

    bool is_null() const { return kind == Kind::Null; }
    // nullptr when absent (or not an object)
    const Value* find(std::string_view key) const;
    // throws moetrt::Error naming `key` when absent
    const Value& at(std::string_view key) const;
    int64_t as_int() const;  // integers and booleans
    double as_number() const;
    const std::string& as_string() const;
    const std::vector<Value>& as_array() const;
};

// Throws moetrt::Error on malformed text.
Value parse(std::string_view text);

}  // namespace moetrt::json
