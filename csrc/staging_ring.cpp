#include "staging_ring.h"

#include <algorithm>
#include <string>

#include "driver_api.h"
#include "errors.h"
#include "size_math.h"

namespace gpusleep {

StagingRing::StagingRing(int device, size_t slot_bytes, DeviceWaits& waits)
    : device_(device), slot_bytes_(std::max<size_t>(round_up(slot_bytes, 4096), 4096)), waits_(waits) {}

StagingRing::~StagingRing() { release(); }

void StagingRing::ensure_slots() {
  if (undrained_) {  // a wait ran out earlier: the slots are reused only once their streams drained
    const DeviceWaits::Clock::time_point deadline = waits_.deadline();
    bool refused = false;
    for (Slot& slot : slots_) {
      CUresult result = CUDA_SUCCESS;
      if (waits_.synchronize_stream(slot.stream.get(), deadline, &result) == DeviceWaits::Outcome::kTimedOut) {
        throw waits_.timeout_error(device_, "waiting for its staging ring stream: cuStreamSynchronize");
      }
      refused = refused || result != CUDA_SUCCESS;
    }
    undrained_ = false;
    if (refused) quarantine();
  }
  if (!slots_.empty()) return;
  std::vector<Slot> slots;
  for (size_t i = 0; i < kSlots; ++i)
    slots.push_back(Slot{PinnedHostBuffer(slot_bytes_, -1), Stream(Stream::Create{})});
  slots_ = std::move(slots);
}

void StagingRing::wait(Slot& slot) {
  waits_.synchronize_stream_or_throw(device_, slot.stream.get(), "staging ring stream");
}

void StagingRing::drain_after_failure() noexcept {
  bool refused = false, stuck = false;
  for (Slot& slot : slots_) {
    CUresult result = CUDA_SUCCESS;
    if (waits_.drain_stream(slot.stream.get(), &result)) continue;
    (result != CUDA_SUCCESS ? refused : stuck) = true;
  }
  if (refused) {
    quarantine();
  } else if (stuck) {
    undrained_ = true;  // work that did not finish by the deadline: kept, reused once drained (ensure_slots)
  }
}

void StagingRing::quarantine() noexcept {
  // A DMA may still read or write a slot: never reuse or free it (a deliberate, counted leak).
  slots_quarantined_ += slots_.size();
  new std::vector<Slot>(std::move(slots_));
  slots_.clear();
}

void StagingRing::device_to_host(CUdeviceptr source, HostCopy& destination, size_t offset, size_t n) {
  if (n == 0) return;
  ensure_slots();
  const size_t pieces = (n + slot_bytes_ - 1) / slot_bytes_;
  auto length = [&](size_t k) { return std::min(slot_bytes_, n - k * slot_bytes_); };
  try {
    for (size_t k = 0; k <= pieces; ++k) {
      if (k < pieces) {
        Slot& slot = slots_[k % kSlots];
        GPUSLEEP_CU_CHECK(
            cuMemcpyDtoHAsync,
            format_bytes(length(k)) + " from device " + std::to_string(device_) + " into the staging ring",
            static_cast<void*>(slot.buffer.data()), source + k * slot_bytes_, length(k), slot.stream.get());
      }
      if (k > 0) {  // the previous piece: wait for its DMA, then write it out while piece k is copied
        Slot& previous = slots_[(k - 1) % kSlots];
        wait(previous);
        destination.write(offset + (k - 1) * slot_bytes_, previous.buffer.data(), length(k - 1), slot_bytes_);
      }
    }
  } catch (...) {
    drain_after_failure();
    throw;
  }
}

void StagingRing::host_to_device(CUdeviceptr destination, const HostCopy& source, size_t offset, size_t n) {
  if (n == 0) return;
  ensure_slots();
  const size_t pieces = (n + slot_bytes_ - 1) / slot_bytes_;
  try {
    for (size_t k = 0; k < pieces; ++k) {
      Slot& slot = slots_[k % kSlots];
      if (k >= kSlots) wait(slot);  // piece k - 2's DMA still reads this slot
      const size_t len = std::min(slot_bytes_, n - k * slot_bytes_);
      source.read(offset + k * slot_bytes_, slot.buffer.data(), len, slot_bytes_);
      GPUSLEEP_CU_CHECK(
          cuMemcpyHtoDAsync, format_bytes(len) + " to device " + std::to_string(device_) + " from the staging ring",
          destination + k * slot_bytes_, static_cast<const void*>(slot.buffer.data()), len, slot.stream.get());
    }
    for (Slot& slot : slots_) wait(slot);
  } catch (...) {
    drain_after_failure();
    throw;
  }
}

size_t StagingRing::bytes_pinned() const noexcept { return slots_.size() * slot_bytes_; }

void StagingRing::release() noexcept {
  // Nothing is queued, normally. A stream whose work does not finish by the deadline may still use its slot: the
  // ring is quarantined, not freed (a refused synchronize frees it, as before).
  const DeviceWaits::Clock::time_point deadline = waits_.deadline();
  bool stuck = false;
  for (Slot& slot : slots_) {
    CUresult result = CUDA_SUCCESS;
    stuck = waits_.synchronize_stream(slot.stream.get(), deadline, &result) == DeviceWaits::Outcome::kTimedOut || stuck;
  }
  if (stuck) quarantine();
  slots_.clear();
}

}  // namespace gpusleep
