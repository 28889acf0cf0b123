// DeviceWaiter: waits for all the work queued on one device, with a deadline. DeviceWaits: every wait of one
// Allocator for device work (device-wide and per stream), each with that deadline, and the count of those that ran
// out.
//
// Note [Device waits with a deadline]
// Rationale: before unmapping, gpusleep must wait for every kernel and copy that may touch the memory (VMM unmap
// does not wait, docs/driver-rules.md section 7), and it cannot enumerate the streams of PyTorch, NCCL or a user,
// so the wait is device-wide: cuCtxSynchronize. But work may never finish: a collective waiting for a peer that
// died, a persistent kernel (NVSHMEM- or DeepEP-style all-to-all). An unbounded cuCtxSynchronize under the
// allocator's lock then hangs the sleep and every allocation of the process for ever (review 2026-12-06,
// finding 9). The driver has no cuCtxSynchronize with a timeout, and an event recorded on the legacy stream
// would miss non-blocking streams (PyTorch's pool streams are non-blocking).
// Approach: the cuCtxSynchronize runs on a helper thread with the device's context current, and the caller
// waits for it on a condition variable until the deadline. Running out raises DeviceWaitTimeout (a CudaError,
// CUDA_ERROR_TIMEOUT, naming the device and what was waited for) before anything was changed, so the
// transaction that asked leaves the old state (invariant 2). The abandoned wait keeps running: the next wait on
// that device first waits for it (no second thread piles up behind a stuck one), then starts a fresh
// cuCtxSynchronize for the work queued since. Limitations: a helper thread that never returns stays blocked in
// the driver (one per stuck device, not per call); the thread runs in the caller's capture mode, so a capture in
// progress refuses the wait of a caller in GLOBAL mode as before (Note [Captures]).
// gpusleep's own streams (the copy engine's, the staging ring's, the chunk hash stream) wait for work queued behind
// the same stuck work (a copy engine stalled by a hung DMA, a copy ordered after a kernel that never ends), and
// ReleaseQueue::retry waits device-wide for devices a failed wake left undrained: every one of those waits has the
// same deadline (issue 24). A stream can be asked whether its work is done (cuStreamQuery, allowed wherever
// cuStreamSynchronize is), so a stream wait needs no thread: it polls with back-off (first at once, then sleeping a
// 32nd of the time waited so far, at most 500 us: at most about 3% or half a millisecond later than the work ends,
// against copies of milliseconds to seconds) until the stream is idle or the deadline passed, and then calls
// cuStreamSynchronize once, which returns at once with the stream's own answer (the error of a failed copy, as
// before). Nothing is left blocked in the driver, and a stream the allocator destroys later has no waiter. A
// transaction whose wait ran out drains its streams before it gives its memory back (invariant 2); such a drain
// (drain_stream) of a stream whose last wait ran out queries it once instead of waiting a second deadline, and
// reports it undrained, so its host memory is quarantined as after a refused drain. ReleaseQueue::retry uses the
// device's DeviceWaiter (never a second thread behind a stuck one); a device still stuck stays undrained, its
// objects untried, for the next call. Running out is counted in counters["device_wait_timeouts"].
//
// Thread safety: one DeviceWaits per Allocator (one DeviceWaiter per device), used under the Allocator's lock.
#pragma once

#include <cuda.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "driver_api.h"
#include "errors.h"

namespace gpusleep {

class DeviceWaiter {
 public:
  enum class Outcome { kFinished, kTimedOut };

  // Waits until every piece of work queued on `context` so far has finished, or `deadline` passed.
  // On kFinished, *result is cuCtxSynchronize's answer. Never throws (but std::thread may: std::system_error).
  Outcome synchronize(CUcontext context, std::chrono::steady_clock::time_point deadline, CUresult* result) {
    if (in_flight_ && !wait_for(*in_flight_, deadline)) return Outcome::kTimedOut;  // still stuck
    in_flight_.reset();
    // The helper waits in the caller's capture mode (a wake's retry of refused releases runs RELAXED: Note
    // [Captures]); a driver without the call leaves it in the default GLOBAL mode.
    CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_GLOBAL;
    if (GPUSLEEP_CU(cuThreadExchangeStreamCaptureMode, &mode) == CUDA_SUCCESS) {
      CUstreamCaptureMode back = mode;
      GPUSLEEP_CU(cuThreadExchangeStreamCaptureMode, &back);
    } else {
      mode = CU_STREAM_CAPTURE_MODE_GLOBAL;
    }
    auto wait = std::make_shared<Wait>();
    std::thread([wait, context, mode] {
      if (mode != CU_STREAM_CAPTURE_MODE_GLOBAL) {
        CUstreamCaptureMode set = mode;
        GPUSLEEP_CU(cuThreadExchangeStreamCaptureMode, &set);
      }
      CUresult answer = GPUSLEEP_CU(cuCtxSetCurrent, context);
      if (answer == CUDA_SUCCESS) answer = GPUSLEEP_CU(cuCtxSynchronize);
      std::lock_guard<std::mutex> lock(wait->mutex);
      wait->result = answer;
      wait->done = true;
      wait->finished.notify_all();
    }).detach();
    if (!wait_for(*wait, deadline)) {
      in_flight_ = std::move(wait);
      return Outcome::kTimedOut;
    }
    *result = wait->result;
    return Outcome::kFinished;
  }

  // Whether an abandoned wait is still blocked in the driver.
  bool stuck() const noexcept {
    if (!in_flight_) return false;
    std::lock_guard<std::mutex> lock(in_flight_->mutex);
    return !in_flight_->done;
  }

 private:
  struct Wait {
    mutable std::mutex mutex;
    std::condition_variable finished;
    bool done = false;
    CUresult result = CUDA_SUCCESS;
  };
  static bool wait_for(Wait& wait, std::chrono::steady_clock::time_point deadline) {
    std::unique_lock<std::mutex> lock(wait.mutex);
    return wait.finished.wait_until(lock, deadline, [&] { return wait.done; });
  }

  std::shared_ptr<Wait> in_flight_;  // a wait that ran out of time and is still (or was) blocked
};

class DeviceWaits {
 public:
  using Outcome = DeviceWaiter::Outcome;
  using Clock = std::chrono::steady_clock;

  explicit DeviceWaits(double timeout_seconds) : timeout_seconds_(timeout_seconds) {}
  DeviceWaits(const DeviceWaits&) = delete;
  DeviceWaits& operator=(const DeviceWaits&) = delete;

  double timeout_seconds() const noexcept { return timeout_seconds_; }
  void set_timeout_seconds(double seconds) noexcept { timeout_seconds_ = seconds; }
  // Calls that raised because a wait ran out, since construction (counters["device_wait_timeouts"]).
  uint64_t timeouts() const noexcept { return timeouts_; }
  // When a wait starting now runs out.
  Clock::time_point deadline() const noexcept;

  // cuCtxSynchronize of `context` (of `device`) on the device's DeviceWaiter, until the deadline. On kFinished,
  // *result is its answer. Never throws (but std::thread may: std::system_error).
  Outcome synchronize_context(int device, CUcontext context, CUresult* result) {
    return waiters_[device].synchronize(context, deadline(), result);
  }
  // Waits for the work queued on `stream` so far, until `deadline` (see the Note). On kFinished, *result is
  // cuStreamSynchronize's answer; kTimedOut marks the stream for drain_stream. Never throws.
  Outcome synchronize_stream(CUstream stream, Clock::time_point deadline, CUresult* result) noexcept;
  // The same, throwing: the stream's error as a CudaError, running out as timeout_error(device, what).
  void synchronize_stream_or_throw(int device, CUstream stream, const std::string& what);
  // After a failure (cleanup paths): whether the stream's work finished without error, waiting until the deadline,
  // or querying once when its last wait ran out. *refused_with: cuStreamSynchronize's error, if it answered one.
  // Never throws.
  bool drain_stream(CUstream stream, CUresult* refused_with = nullptr) noexcept;

  // The error of a wait that ran out, counted (timeouts()): a CudaError CUDA_ERROR_TIMEOUT naming the device and
  // `what` was waited for ("waiting for the work using the memory: cuCtxSynchronize").
  CudaError timeout_error(int device, const std::string& what);

 private:
  double timeout_seconds_;
  uint64_t timeouts_ = 0;
  std::map<int, DeviceWaiter> waiters_;  // per device
  std::set<CUstream> timed_out_streams_;  // whose last wait ran out (drain_stream queries them once)
};

}  // namespace gpusleep
