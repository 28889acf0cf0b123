#include "python_gil.h"

#include <dlfcn.h>

namespace gpusleep {
namespace {

// The CPython functions Note [Waiting without the GIL] needs, found in the process (all or none).
struct PythonApi {
  int (*is_initialized)() = nullptr;
  // The thread state holding the GIL: this thread's from Python 3.12 on, any thread's before (a global then).
  void* (*current_thread_state)() = nullptr;
  void* (*this_thread_state)() = nullptr;  // PyGILState_GetThisThreadState: this thread's, attached or not
  void* (*save_thread)() = nullptr;           // PyEval_SaveThread
  void (*restore_thread)(void*) = nullptr;    // PyEval_RestoreThread

  PythonApi() {
    is_initialized = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "Py_IsInitialized"));
    current_thread_state = reinterpret_cast<void* (*)()>(dlsym(RTLD_DEFAULT, "PyThreadState_GetUnchecked"));
    if (current_thread_state == nullptr) {  // before Python 3.13
      current_thread_state = reinterpret_cast<void* (*)()>(dlsym(RTLD_DEFAULT, "_PyThreadState_UncheckedGet"));
    }
    this_thread_state = reinterpret_cast<void* (*)()>(dlsym(RTLD_DEFAULT, "PyGILState_GetThisThreadState"));
    save_thread = reinterpret_cast<void* (*)()>(dlsym(RTLD_DEFAULT, "PyEval_SaveThread"));
    restore_thread = reinterpret_cast<void (*)(void*)>(dlsym(RTLD_DEFAULT, "PyEval_RestoreThread"));
  }
  bool complete() const {
    return is_initialized && current_thread_state && this_thread_state && save_thread && restore_thread;
  }
};

const PythonApi& python_api() {
  static const PythonApi api;
  return api;
}

}  // namespace

void GilReleasedWhileWaiting::release() noexcept {
  if (saved_thread_state_ != nullptr) return;
  const PythonApi& api = python_api();
  if (!api.complete() || !api.is_initialized()) return;
  // Holding the GIL: the GIL's thread state is this thread's own. (Before 3.12 the current thread state is a
  // process-wide global: non-null only says that some thread holds the GIL.)
  void* holder = api.current_thread_state();
  if (holder == nullptr || holder != api.this_thread_state()) return;
  saved_thread_state_ = api.save_thread();
}

void GilReleasedWhileWaiting::restore() noexcept {
  if (saved_thread_state_ == nullptr) return;
  python_api().restore_thread(saved_thread_state_);
  saved_thread_state_ = nullptr;
}

}  // namespace gpusleep
