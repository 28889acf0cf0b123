// GilReleasedWhileWaiting: lets other Python threads run while this thread waits for the allocator's lock.
//
// Note [Waiting without the GIL]
// Rationale: the _C bindings release the GIL before they take the allocator's lock, but PyTorch calls the
// pluggable-allocator entry points from C++, and some of its paths hold the GIL when they allocate (a tensor made
// from Python data, for one). Such an allocation, made while a sleep or wake holds the lock, used to freeze every
// Python thread of the process for the whole transition: the HTTP loop, /is_sleeping and /metrics with it
// (review finding 9).
// Approach: in global mode, a torch_malloc that finds the lock taken gives up the GIL, if this thread holds it,
// for as long as it waits and works, and takes it back only after it has let go of the lock; a call that gets the
// lock at once changes nothing (counters["gil_released_while_waiting"] counts the others). Only in global mode:
// there PyTorch's CUDAPluggableAllocator calls us holding none of its locks, while in pool mode its
// DeviceCachingAllocator calls us holding its device mutex, which a thread freeing a tensor with the GIL takes:
// releasing the GIL there would trade a freeze for a deadlock, so pool mode waits with the GIL as before.
// "This thread holds the GIL" is "the GIL's thread state is this thread's own (PyGILState_GetThisThreadState)":
// before Python 3.12 the current thread state is a process-wide global, so alone it says only that some thread
// holds the GIL (releasing another thread's GIL crashes). A thread whose interpreter began to finalize while it
// waited is not handed back to Python (3.10-3.13 would end it inside PyEval_RestoreThread through noexcept frames):
// it stays parked until the process exits.
// Lock order: a thread that holds the lock never waits for the GIL (it is released until the lock is), and every
// thread that holds the GIL and waits for the lock releases it first (the bindings, this), so the two cannot
// deadlock; no Python runs between taking the GIL back and returning to PyTorch.
// Limitations: the GIL is released only when the lock is found taken; a call that gets the lock and then waits
// inside (a device wait of its own) keeps it, as any C call does. A PyTorch caller that holds a lock of its own in
// global mode while it allocates (none found; c10d not checked) and that another GIL-holding thread also takes
// could deadlock as in pool mode. A caller that keeps borrowed Python references across an allocation may now see
// other threads run in between (no such PyTorch path found). Finalizing that begins between the check and taking
// the GIL back is not caught.
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

// The bindings' call guard (py::call_guard<GilReleasedForCall>): releases the GIL for the call, as
// py::gil_scoped_release does, but a daemon thread that comes back while the interpreter finalizes stays parked
// instead of being ended inside PyEval_RestoreThread through the binding's frames (std::terminate); see
// Note [Waiting without the GIL].
class GilReleasedForCall {
 public:
  GilReleasedForCall() noexcept;
  ~GilReleasedForCall();
  GilReleasedForCall(const GilReleasedForCall&) = delete;
  GilReleasedForCall& operator=(const GilReleasedForCall&) = delete;

 private:
  void* saved_thread_state_ = nullptr;
};

}  // namespace gpusleep
