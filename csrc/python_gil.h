// GilReleasedWhileWaiting: lets other Python threads run while this thread waits for the allocator's lock.
//
// Note [Waiting without the GIL]
// Rationale: the _C bindings release the GIL before they take the allocator's lock, but PyTorch calls the
// pluggable-allocator entry points from C++, and some of its paths hold the GIL when they allocate (a tensor made
// from Python data, for one). Such an allocation, made while a sleep or wake holds the lock, used to freeze every
// Python thread of the process for the whole transition: the HTTP loop, /is_sleeping and /metrics with it
// (review finding 9). Approach: a call that finds the lock taken gives up the GIL, if this thread holds it, for as
// long as it waits and works, and takes it back only after it has let go of the lock; a call that gets the lock
// at once changes nothing. The core links no Python: the CPython functions it needs are looked up once with dlsym
// in the process; without them (no Python in the process) nothing is released. "This thread holds the GIL" is
// "the GIL's thread state (PyThreadState_GetUnchecked, _PyThreadState_UncheckedGet before 3.13) is this thread's
// own (PyGILState_GetThisThreadState)": before Python 3.12 the former is a process-wide global, so alone it says
// only that some thread holds the GIL (releasing another thread's GIL crashes), and PyGILState_Check answers yes
// for any thread of a sub-interpreter. A thread of a sub-interpreter is never released: it waits as before.
// Lock order: a thread that holds the lock never waits for the GIL (it is released until the lock is), and every
// thread that holds the GIL and waits for the lock releases it first (the bindings, and this): no deadlock.
// Limitations: the GIL is released only when the lock is found taken; a call that gets the lock and then waits
// inside (a device wait of its own) keeps the GIL, as any C call does.
#pragma once

namespace gpusleep {

class GilReleasedWhileWaiting {
 public:
  GilReleasedWhileWaiting() = default;
  GilReleasedWhileWaiting(const GilReleasedWhileWaiting&) = delete;
  GilReleasedWhileWaiting& operator=(const GilReleasedWhileWaiting&) = delete;
  ~GilReleasedWhileWaiting() { restore(); }

  // Releases the GIL if this thread holds it; otherwise (or called again) does nothing.
  void release() noexcept;
  // Takes the GIL back if release() gave it up.
  void restore() noexcept;
  bool released() const noexcept { return saved_thread_state_ != nullptr; }

 private:
  void* saved_thread_state_ = nullptr;  // the PyThreadState* PyEval_SaveThread returned
};

}  // namespace gpusleep
