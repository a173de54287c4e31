// A minimal check harness for the C++ tests, so that ctest needs no external framework.
//
// Each CHECK* macro counts one passed or one failed check; a failed check prints its file, line and what
// differed, and the test carries on. A test's main() ends with `return conveyor_test::report();`, which
// prints the final line "N passed, M failed" and returns non-zero when any check failed, so ctest sees it.
#pragma once

#include <cmath>
#include <cstdio>
#include <exception>
#include <string>

namespace conveyor_test {

struct Counts {
  int passed = 0;
  int failed = 0;
};

inline Counts& counts() {
  static Counts c;
  return c;
}

// Records one check's outcome; on failure prints where and why. Returns `ok`.
inline bool record(bool ok, const char* file, int line, const std::string& what) {
  if (ok) {
    ++counts().passed;
  } else {
    ++counts().failed;
    std::printf("FAILED %s:%d: %s\n", file, line, what.c_str());
    std::fflush(stdout);
  }
  return ok;
}

// |actual - expected| <= atol + rtol * |expected|, and both finite.
inline bool near(double actual, double expected, double atol, double rtol) {
  return std::isfinite(actual) && std::isfinite(expected) &&
         std::fabs(actual - expected) <= atol + rtol * std::fabs(expected);
}

inline int report() {
  std::printf("%d passed, %d failed\n", counts().passed, counts().failed);
  return counts().failed == 0 ? 0 : 1;
}

}  // namespace conveyor_test

// CHECK(cond): cond holds.
#define CHECK(cond) ::conveyor_test::record(static_cast<bool>(cond), __FILE__, __LINE__, "CHECK(" #cond ")")

// CHECK_MSG(cond, message): cond holds; `message` (a std::string) says what was checked on failure.
#define CHECK_MSG(cond, message) ::conveyor_test::record(static_cast<bool>(cond), __FILE__, __LINE__, (message))

// CHECK_NEAR(actual, expected, atol, rtol): |actual - expected| <= atol + rtol * |expected|.
#define CHECK_NEAR(actual, expected, atol, rtol)                                                                \
  do {                                                                                                          \
    const double check_a_ = static_cast<double>(actual), check_e_ = static_cast<double>(expected);              \
    ::conveyor_test::record(::conveyor_test::near(check_a_, check_e_, (atol), (rtol)), __FILE__, __LINE__,      \
                            std::string("CHECK_NEAR(" #actual ", " #expected "): ") + std::to_string(check_a_) + \
                                " vs " + std::to_string(check_e_));                                             \
  } while (0)

// CHECK_THROWS(statement, ExceptionType, substring): the statement throws exactly ExceptionType (or a type
// derived from it) and the exception's what() contains `substring`.
#define CHECK_THROWS(statement, ExceptionType, substring)                                                       \
  do {                                                                                                          \
    std::string check_why_ = "no exception";                                                                    \
    bool check_ok_ = false;                                                                                     \
    try {                                                                                                       \
      statement;                                                                                                \
    } catch (const ExceptionType& check_e_) {                                                                   \
      const std::string check_msg_ = check_e_.what();                                                           \
      check_ok_ = check_msg_.find(substring) != std::string::npos;                                              \
      check_why_ = "what() = \"" + check_msg_ + "\"";                                                           \
    } catch (const std::exception& check_e_) {                                                                  \
      check_why_ = std::string("another exception type, what() = \"") + check_e_.what() + "\"";                 \
    } catch (...) {                                                                                             \
      check_why_ = "a non-std exception";                                                                       \
    }                                                                                                           \
    ::conveyor_test::record(check_ok_, __FILE__, __LINE__,                                                      \
                            "CHECK_THROWS(" #statement ", " #ExceptionType ", \"" + std::string(substring) +    \
                                "\"): " + check_why_);                                                          \
  } while (0)
