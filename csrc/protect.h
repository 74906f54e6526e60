// The shim's error convention, shared by every C++ file of the shim: each extern "C" entry
// point runs its body inside LO_PROTECT, which returns 0 when the body completes and -1 when it
// throws, with the exception's message stored in a thread-local slot that lo_last_error()
// (shim.h) reads. No C++ exception crosses into Rust.
#pragma once

#include <c10/util/Exception.h>

#include <exception>

namespace lo {

// Stores `msg` in the calling thread's error slot (defined once, in shim.cpp).
void set_error(const char* msg);

}  // namespace lo

#define LO_PROTECT(...)                                               \
  try {                                                               \
    __VA_ARGS__;                                                      \
    return 0;                                                         \
  } catch (const c10::Error& e) {                                     \
    ::lo::set_error(e.what_without_backtrace());                      \
    return -1;                                                        \
  } catch (const std::exception& e) {                                 \
    ::lo::set_error(e.what());                                        \
    return -1;                                                        \
  } catch (...) {                                                     \
    ::lo::set_error("unknown C++ exception in layerwise-offload shim"); \
    return -1;                                                        \
  }
