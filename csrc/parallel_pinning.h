// Parallel pinning: populating and registering one host mapping in large pieces, on several threads.
//
// Note [Parallel pinning]
// Rationale: a level-1 sleep's backup is pinned once and reused (host_arena.h), but that once is on the
// critical path of the first sleep and of reserve_host_memory(): one cuMemHostRegister of 140 GB of 4 KiB
// pages ran at the 2-4 GB/s on record, 35-70 s. Both halves of that call are per-page work on one thread:
// faulting the pages in (the kernel zeroes each one) and pinning them (the driver walks and locks each
// page). Large hosts also cap one registration (a single cudaHostRegister of 512 GiB or more fails, vLLM
// issue 51080), and other projects pin big pools in pieces for the same reasons (vLLM PR 51081, SGLang PR
// 36798, TensorRT-LLM PR 17773).
// Approach (PinnedHostBuffer's placed path, Note [Placing pinned backups]):
// - the mapping starts on a 2 MiB boundary and is madvise(MADV_HUGEPAGE)d before it is populated, so that
//   where transparent huge pages are enabled the kernel backs it with 2 MiB pages (512 times fewer pages to
//   fault, zero and pin); where THP is off the advice is refused or ignored and nothing else changes;
// - it is populated in slices (MADV_POPULATE_WRITE, 2 MiB aligned) on up to `threads` threads;
// - it is registered as disjoint pieces of `piece_bytes` (1 GiB, 2 MiB aligned; the last piece is the rest),
//   one cuMemHostRegister each, from up to `threads` threads that each make the caller's context current
//   (and relax their capture mode, as the allocator's own thread does around pinning).
// Every piece or none: if one piece's registration fails, the pieces already registered are unregistered
// before the failure is reported (the caller then unmaps), so a failed pin leaves nothing registered. If the
// driver refuses one of those unregisters, its pages stay pinned: the caller then leaves the whole mapping
// mapped, quarantined for the life of the process (counted in teardown_failures), because a later mapping at
// that address could receive DMA meant for the pages the driver still holds.
// Capture mode: the whole pin, fallback and rollback included, runs in RELAXED mode (PinnedHostBuffer's
// constructor; each worker relaxes its own thread), as PyTorch relaxes cudaHostAlloc (Note [Captures]).
// The consequence for copies: a copy whose host range spans two registrations is refused by the driver
// (docs/driver-rules.md section 8b), so no pinned extent may cross a piece boundary: the HostArena never
// coalesces free memory across one (host_arena.h), and every copy is issued per extent.
// Knobs (read at each pin; for benchmarks and tests): GPUSLEEP_PIN_THREADS (default min(8, hardware
// threads); 1: one thread), GPUSLEEP_PIN_PIECE_BYTES (default 1 GiB, rounded up to 2 MiB; 0: one piece, the
// single registration of earlier versions), GPUSLEEP_PIN_HUGE_PAGES (default 1; 0: no 2 MiB alignment and
// no MADV_HUGEPAGE).
// Measured (benchmarks/RESULTS.md, 2026-12-06, driver double on a 2-core VM; host-bound, the driver's own
// page pinning is not in it): population with huge pages was slower there than with 4 KiB pages (the
// hypervisor backs each fresh 2 MiB page), 0.26-0.42 GB/s for the parallel path against 1.3 GB/s for one
// registration at 2-4 GiB; GPUSLEEP_PIN_HUGE_PAGES=0 turns that half off. The GPU figures are still to come.
// Limitations: the driver may serialize registrations internally; the pieces then still split the
// population's cost and bound each call, and the benchmark (benchmarks/bench_sleep_wake.py, "host pinning")
// measures what a given driver and kernel give. Huge pages are a request: khugepaged and the THP "defrag"
// setting decide; the benchmark reports the bytes that ended on them (/proc/self/smaps AnonHugePages).
#pragma once

#include <cuda.h>

#include <cstddef>
#include <functional>

namespace gpusleep {

constexpr size_t kHugePageBytes = size_t{2} << 20;
constexpr size_t kDefaultPinPieceBytes = size_t{1} << 30;

struct PinningPlan {
  size_t piece_bytes = kDefaultPinPieceBytes;  // registration piece, a multiple of kHugePageBytes
  int threads = 1;                             // threads that populate and register (>= 1)
  bool huge_pages = true;                      // 2 MiB aligned mapping, MADV_HUGEPAGE

  // The defaults, overridden by GPUSLEEP_PIN_THREADS / GPUSLEEP_PIN_PIECE_BYTES / GPUSLEEP_PIN_HUGE_PAGES.
  static PinningPlan from_environment();
  // The piece size for a buffer of `size_bytes` (piece_bytes, or size_bytes when that is 0 or larger).
  size_t piece_bytes_for(size_t size_bytes) const noexcept;
};

// Runs work(i) for every i in [0, count) on up to `threads` threads (the caller's among them); each worker
// first runs `enter` (once). Returns when every item ran. `work` and `enter` must not throw; if one does anyway,
// the exception ends that worker and is dropped (nothing reaches std::terminate), and the items it had not
// reached are left to the other workers; callers record each item's outcome, so an item whose work threw, or
// that no worker reached, reads as not done.
void run_in_parallel(size_t count, int threads, const std::function<void()>& enter,
                     const std::function<void(size_t)>& work);

// Populates [data, data + size_bytes) in 2 MiB aligned slices on up to `threads` threads. False if the kernel
// refused a slice (a kernel without MADV_POPULATE_WRITE counts as success: registration populates then).
bool populate_in_parallel(char* data, size_t size_bytes, int threads);

struct PieceRegistration {
  CUresult result = CUDA_SUCCESS;  // the first failure, or CUDA_SUCCESS (every piece registered)
  bool undone = true;              // after a failure: every registered piece was unregistered again
};

// Registers [data, data + size_bytes) (CU_MEMHOSTREGISTER_PORTABLE) as pieces of `piece_bytes`, from up to
// `threads` threads with `context` current. On a failure every piece that was registered is unregistered
// again and the first failure is returned; `undone` says whether the driver accepted every unregister (a refusal
// is counted with note_teardown_failure). Needs `context` current on the calling thread too.
PieceRegistration register_pieces(CUcontext context, char* data, size_t size_bytes, size_t piece_bytes, int threads);

// Unregisters every piece of a registration by register_pieces. A piece the driver no longer knows
// (HOST_MEMORY_NOT_REGISTERED: unregistered by an earlier, partly refused call) counts as done. Returns the
// first other failure (the remaining pieces are still tried).
CUresult unregister_pieces(char* data, size_t size_bytes, size_t piece_bytes) noexcept;

}  // namespace gpusleep
