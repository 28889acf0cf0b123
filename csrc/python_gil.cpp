#include "python_gil.h"

#include <Python.h>
#include <unistd.h>

namespace gpusleep {
namespace {

bool python_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

// The thread state holding the GIL: this thread's own from Python 3.12 on, whichever thread's before (a
// process-wide global then).
PyThreadState* gil_holder() {
#if PY_VERSION_HEX >= 0x030D0000
  return PyThreadState_GetUnchecked();
#else
  return _PyThreadState_UncheckedGet();
#endif
}

// Takes the GIL back, unless the interpreter began to finalize meanwhile: then PyEval_RestoreThread would end this
// thread (pthread_exit, Python 3.10-3.13) with an unwind through noexcept frames, std::terminate. Such a thread
// (a daemon: Python waits for the others before it finalizes) stays here until the process exits instead,
// holding nothing of gpusleep's.
void take_back(void* saved_thread_state) noexcept {
  while (python_finalizing()) pause();
  PyEval_RestoreThread(static_cast<PyThreadState*>(saved_thread_state));
}

}  // namespace

void GilReleasedWhileWaiting::release() noexcept {
  if (saved_thread_state_ != nullptr || !Py_IsInitialized() || python_finalizing()) return;
  PyThreadState* holder = gil_holder();
  if (holder == nullptr || holder != PyGILState_GetThisThreadState()) return;  // not this thread's GIL
  saved_thread_state_ = PyEval_SaveThread();
}

void GilReleasedWhileWaiting::restore() noexcept {
  if (saved_thread_state_ == nullptr) return;
  take_back(saved_thread_state_);
  saved_thread_state_ = nullptr;
}

GilReleasedForCall::GilReleasedForCall() noexcept : saved_thread_state_(PyEval_SaveThread()) {}

GilReleasedForCall::~GilReleasedForCall() { take_back(saved_thread_state_); }

}  // namespace gpusleep
