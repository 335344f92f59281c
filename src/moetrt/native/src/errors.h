// One error type for the native library: what went wrong and what to do about it.
#pragma once

#include <stdexcept>
#include <string>

namespace moetrt {

enum class ErrorKind { Invalid = 1, Bundle = 2, Cuda = 3, Unsupported = 4 };

class Error : public std::runtime_error {
public:
    // what(): "message; hint", the one-line form the Python package prints too
    Error(ErrorKind kind, const std::string& message, const std::string& hint)
        : std::runtime_error(hint.empty() ? message : message + "; " + hint),
          kind_(kind),
          message_(message),
          hint_(hint) {}
    ErrorKind kind() const { return kind_; }
    const std::string& message() const { return message_; }
    const std::string& hint() const { return hint_; }

private:
    ErrorKind kind_;
    std::string message_;
    std::string hint_;
};

}  // namespace moetrt
