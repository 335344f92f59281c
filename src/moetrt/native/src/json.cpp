#include "json.h"

#include <cmath>
#include <cstdlib>

#include "errors.h"

namespace moetrt::json {
namespace {

[[noreturn]] void fail(const std::string& what) {
    throw Error(ErrorKind::Bundle, "kernel bundle header is not valid JSON: " + what,
                "rebuild the kernels with this moetrt version");
}

class Reader {
public:
    explicit Reader(std::string_view text) : s_(text) {}

    Value document() {
        Value v = value(0);
        skip();
        if (pos_ != s_.size()) fail("trailing characters");
        return v;
    }

private:
    std::string_view s_;
    size_t pos_ = 0;

    void skip() {
        while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\t' || s_[pos_] == '\r'))
            ++pos_;
    }
    char peek() {
        skip();
        if (pos_ >= s_.size()) fail("unexpected end");
        return s_[pos_];
    }
    void expect(char c) {
        if (peek() != c) fail(std::string("expected '") + c + "' at byte " + std::to_string(pos_));
        ++pos_;
    }
    bool literal(std::string_view word) {
        if (s_.substr(pos_, word.size()) != word) return false;
        pos_ += word.size();
        return true;
    }

    Value value(int depth) {
        if (depth > 64) fail("nesting too deep");
        Value v;
        char c = peek();
        if (c == '{') {
            v.kind = Value::Kind::Object;
            ++pos_;
            if (peek() == '}') {
                ++pos_;
                return v;
            }
            for (;;) {
                if (peek() != '"') fail("object key is not a string");
                std::string key = string();
                expect(':');
                v.members.emplace_back(std::move(key), value(depth + 1));
                if (peek() == ',') {
                    ++pos_;
                    continue;
                }
                expect('}');
                return v;
            }
        }
        if (c == '[') {
            v.kind = Value::Kind::Array;
            ++pos_;
            if (peek() == ']') {
                ++pos_;
                return v;
            }
            for (;;) {
                v.items.push_back(value(depth + 1));
                if (peek() == ',') {
                    ++pos_;
                    continue;
                }
                expect(']');
                return v;
            }
        }
        if (c == '"') {
            v.kind = Value::Kind::String;
            v.text = string();
            return v;
        }
        if (literal("true") || literal("false")) {
            v.kind = Value::Kind::Bool;
            v.boolean = s_[pos_ - 1] == 'e' && s_[pos_ - 4] == 't';  // "true" is 4 bytes, "false" 5
            return v;
        }
        if (literal("null")) return v;
        return number();
    }

    Value number() {
        size_t start = pos_;
        if (pos_ < s_.size() && s_[pos_] == '-') ++pos_;
        bool integral = true;
        while (pos_ < s_.size()) {
            char c = s_[pos_];
            if (c >= '0' && c <= '9') {
            } else if (c == '.' || c == 'e' || c == 'E' || c == '+' || (c == '-' && pos_ > start)) {
                integral = false;
            } else {
                break;
            }
            ++pos_;
        }
        std::string literal_text(s_.substr(start, pos_ - start));
        if (literal_text.empty() || literal_text == "-") fail("bad value at byte " + std::to_string(start));
        Value v;
        v.kind = Value::Kind::Number;
        char* end = nullptr;
        v.number = std::strtod(literal_text.c_str(), &end);
        if (end != literal_text.c_str() + literal_text.size()) fail("bad number " + literal_text);
        v.integral = integral;
        if (integral) v.integer = std::strtoll(literal_text.c_str(), nullptr, 10);
        return v;
    }

    static void append_utf8(std::string& out, uint32_t cp) {
        if (cp < 0x80) {
            out += static_cast<char>(cp);
        } else if (cp < 0x800) {
            out += static_cast<char>(0xC0 | (cp >> 6));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out += static_cast<char>(0xE0 | (cp >> 12));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        } else {
            out += static_cast<char>(0xF0 | (cp >> 18));
            out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
            out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (cp & 0x3F));
        }
    }

    uint32_t hex4() {
        if (pos_ + 4 > s_.size()) fail("short \\u escape");
        uint32_t cp = 0;
        for (int i = 0; i < 4; ++i) {
            char c = s_[pos_++];
            cp <<= 4;
            if (c >= '0' && c <= '9') cp |= c - '0';
            else if (c >= 'a' && c <= 'f') cp |= c - 'a' + 10;
            else if (c >= 'A' && c <= 'F') cp |= c - 'A' + 10;
            else fail("bad \\u escape");
        }
        return cp;
    }

    std::string string() {
        expect('"');
        std::string out;
        for (;;) {
            if (pos_ >= s_.size()) fail("unterminated string");
            char c = s_[pos_++];
            if (c == '"') return out;
            if (c != '\\') {
                out += c;
                continue;
            }
            if (pos_ >= s_.size()) fail("unterminated escape");
            char e = s_[pos_++];
            switch (e) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': {
                    uint32_t cp = hex4();
                    if (cp >= 0xD800 && cp < 0xDC00 && literal("\\u")) {
                        uint32_t low = hex4();
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                    }
                    append_utf8(out, cp);
                    break;
                }
                default: fail("bad escape");
            }
        }
    }
};

}  // namespace

const Value* Value::find(std::string_view key) const {
    for (const auto& [name, value] : members)
        if (name == key) return &value;
    return nullptr;
}

const Value& Value::at(std::string_view key) const {
    const Value* v = find(key);
    if (!v)
        throw Error(ErrorKind::Bundle, "kernel bundle header lacks \"" + std::string(key) + "\"",
                    "rebuild the kernels with this moetrt version");
    return *v;
}

int64_t Value::as_int() const {
    if (kind == Kind::Bool) return boolean ? 1 : 0;
    if (kind != Kind::Number || !integral) fail("expected an integer");
    return integer;
}

double Value::as_number() const {
    if (kind == Kind::Bool) return boolean ? 1.0 : 0.0;
    if (kind != Kind::Number) fail("expected a number");
    return number;
}

const std::string& Value::as_string() const {
    if (kind != Kind::String) fail("expected a string");
    return text;
}

const std::vector<Value>& Value::as_array() const {
    if (kind != Kind::Array) fail("expected an array");
    return items;
}

Value parse(std::string_view text) { return Reader(text).document(); }

}  // namespace moetrt::json
