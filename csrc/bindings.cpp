// pybind11 module gpusleep._C: the core's classes and the exception translation. Python's
// gpusleep.Allocator (python/gpusleep/allocator.py) is the public face; this layer only converts types
// and releases the GIL around every call that may wait on the GPU or on the allocator lock.
#include <dlfcn.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <vector>

#include "allocator.h"
#include "allocator_counters.h"
#include "chunk_hash.h"
#include "chunk_verifier.h"
#include "device_info.h"
#include "driver_api.h"
#include "errors.h"
#include "host_memory_budget.h"
#include "host_tier.h"
#include "host_tier_faults.h"
#include "python_gil.h"
#include "thread_tag.h"
#include "torch_entry.h"

namespace py = pybind11;
using namespace gpusleep;

namespace {

const char* mode_name(TorchMode mode) {
  switch (mode) {
    case TorchMode::kGlobal: return "global";
    case TorchMode::kPool: return "pool";
    case TorchMode::kNone: break;
  }
  return "none";
}

TorchMode parse_mode(const std::string& name) {
  if (name == "global") return TorchMode::kGlobal;
  if (name == "pool") return TorchMode::kPool;
  throw InvalidArgument("mode must be 'global' or 'pool', got '" + name + "'");
}

std::string library_path() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&gpusleep_torch_malloc), &info) == 0 || info.dli_fname == nullptr) {
    throw std::runtime_error("cannot locate the gpusleep._C shared object");
  }
  return info.dli_fname;
}

void register_exceptions(py::module_& m) {
  py::module_ errors = py::module_::import("gpusleep.errors");
  // Keep the classes alive for the translator (they live as long as the interpreter).
  static py::object cuda_error = errors.attr("CudaError");
  static py::object driver_unavailable = errors.attr("DriverUnavailableError");
  static py::object out_of_memory = errors.attr("OutOfMemoryError");
  static py::object sleep_state_error = errors.attr("SleepStateError");
  static py::object host_out_of_memory = errors.attr("HostOutOfMemoryError");
  static py::object capture_in_progress = errors.attr("CaptureInProgressError");
  static py::object wake_verification = errors.attr("WakeVerificationError");
  py::register_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (const OutOfMemory& e) {
      py::object free_bytes = e.bytes_free() ? py::object(py::int_(*e.bytes_free())) : py::object(py::none());
      py::object exc = out_of_memory(e.what(), e.bytes_needed(), free_bytes, e.device());
      PyErr_SetObject(out_of_memory.ptr(), exc.ptr());
    } catch (const HostOutOfMemory& e) {
      py::object available = e.bytes_available() ? py::object(py::int_(*e.bytes_available())) : py::object(py::none());
      py::object exc = host_out_of_memory(e.what(), e.bytes_needed(), available, e.limited_by());
      PyErr_SetObject(host_out_of_memory.ptr(), exc.ptr());
    } catch (const WakeVerificationFailed& e) {
      py::list blocks;
      for (const MismatchedBlock& b : e.blocks()) blocks.append(py::make_tuple(b.tag, b.address, b.num_bytes));
      py::object exc = wake_verification(e.what(), e.tags(), blocks, e.host_copy_damaged());
      PyErr_SetObject(wake_verification.ptr(), exc.ptr());
    } catch (const CaptureInProgress& e) {
      PyErr_SetString(capture_in_progress.ptr(), e.what());
    } catch (const CudaError& e) {
      py::object exc = cuda_error(e.what(), static_cast<int>(e.code()), e.name());
      PyErr_SetObject(cuda_error.ptr(), exc.ptr());
    } catch (const DriverUnavailable& e) {
      py::object exc = driver_unavailable(e.what(), 0, "");
      PyErr_SetObject(driver_unavailable.ptr(), exc.ptr());
    } catch (const SleepStateError& e) {
      PyErr_SetString(sleep_state_error.ptr(), e.what());
    } catch (const InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const HostIOError& e) {  // a pageable or file host copy's system call (Note [Host tiers]): OSError
      py::object exc = py::reinterpret_borrow<py::object>(PyExc_OSError)(e.error_number(), e.what());
      PyErr_SetObject(PyExc_OSError, exc.ptr());
    }
  });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gpusleep C++ core (see python/gpusleep/allocator.py for the public API)";
  register_exceptions(m);

  py::class_<HostPlacementRecord>(m, "HostPlacement")
      .def_readonly("tag", &HostPlacementRecord::tag)
      .def_readonly("tier", &HostPlacementRecord::tier)
      .def_readonly("bytes", &HostPlacementRecord::bytes);
  py::class_<SleepReport>(m, "SleepReport")
      .def_readonly("level", &SleepReport::level)
      .def_readonly("tags", &SleepReport::tags)
      .def_readonly("bytes_offloaded", &SleepReport::bytes_offloaded)
      .def_readonly("bytes_reused", &SleepReport::bytes_reused)
      .def_readonly("pieces_changed", &SleepReport::pieces_changed)
      .def_readonly("bytes_hashed", &SleepReport::bytes_hashed)
      .def_readonly("bytes_discarded", &SleepReport::bytes_discarded)
      .def_readonly("bytes_freed", &SleepReport::bytes_freed)
      .def_readonly("bytes_release_pending", &SleepReport::bytes_release_pending)
      .def_readonly("bytes_freed_measured", &SleepReport::bytes_freed_measured)
      .def_readonly("seconds", &SleepReport::seconds)
      .def_readonly("copy_seconds", &SleepReport::copy_seconds)
      .def_readonly("verify_seconds", &SleepReport::verify_seconds)
      .def_readonly("host_pin_seconds", &SleepReport::host_pin_seconds)
      .def_readonly("bytes_pinned_tier", &SleepReport::bytes_pinned_tier)
      .def_readonly("bytes_pageable_tier", &SleepReport::bytes_pageable_tier)
      .def_readonly("bytes_file_tier", &SleepReport::bytes_file_tier)
      .def_readonly("placements", &SleepReport::placements);
  py::class_<WakeReport>(m, "WakeReport")
      .def_readonly("tags", &WakeReport::tags)
      .def_readonly("bytes_restored", &WakeReport::bytes_restored)
      .def_readonly("bytes_zeroed", &WakeReport::bytes_zeroed)
      .def_readonly("bytes_mapped", &WakeReport::bytes_mapped)
      .def_readonly("bytes_verified_by_hash", &WakeReport::bytes_verified_by_hash)
      .def_readonly("bytes_verified_by_read_back", &WakeReport::bytes_verified_by_read_back)
      .def_readonly("seconds", &WakeReport::seconds)
      .def_readonly("copy_seconds", &WakeReport::copy_seconds)
      .def_readonly("verify_seconds", &WakeReport::verify_seconds);
  py::class_<DeviceInfoRecord>(m, "DeviceInfo")
      .def_readonly("device", &DeviceInfoRecord::device)
      .def_readonly("name", &DeviceInfoRecord::name)
      .def_readonly("driver_version", &DeviceInfoRecord::driver_version)
      .def_readonly("compute_capability_major", &DeviceInfoRecord::compute_capability_major)
      .def_readonly("compute_capability_minor", &DeviceInfoRecord::compute_capability_minor)
      .def_readonly("total_bytes", &DeviceInfoRecord::total_bytes)
      .def_readonly("free_bytes", &DeviceInfoRecord::free_bytes)
      .def_readonly("vmm_supported", &DeviceInfoRecord::vmm_supported)
      .def_readonly("granularity_minimum_bytes", &DeviceInfoRecord::granularity_minimum_bytes)
      .def_readonly("granularity_recommended_bytes", &DeviceInfoRecord::granularity_recommended_bytes)
      .def_readonly("rdma_with_vmm_supported", &DeviceInfoRecord::rdma_with_vmm_supported)
      .def_readonly("host_register_supported", &DeviceInfoRecord::host_register_supported)
      .def_readonly("host_numa_node", &DeviceInfoRecord::host_numa_node)
      .def_readonly("primary_context_was_active", &DeviceInfoRecord::primary_context_was_active)
      .def_readonly("peers", &DeviceInfoRecord::peers);
  m.def("device_count", &device_count, py::call_guard<GilReleasedForCall>());
  m.def("device_info", &device_info, py::arg("device"), py::call_guard<GilReleasedForCall>());

  py::class_<WakePlanRecord>(m, "WakePlan")
      .def_readonly("device", &WakePlanRecord::device)
      .def_readonly("bytes_needed", &WakePlanRecord::bytes_needed)
      .def_readonly("bytes_free", &WakePlanRecord::bytes_free)
      .def_readonly("bytes_reclaimable", &WakePlanRecord::bytes_reclaimable);
  py::class_<HostMemoryReport>(m, "HostMemoryReport")
      .def_readonly("bytes_pinned", &HostMemoryReport::bytes_pinned)
      .def_readonly("bytes_in_use", &HostMemoryReport::bytes_in_use)
      .def_readonly("bytes_newly_pinned", &HostMemoryReport::bytes_newly_pinned)
      .def_readonly("pin_seconds", &HostMemoryReport::pin_seconds)
      .def_readonly("numa_node", &HostMemoryReport::numa_node)
      .def_readonly("bytes_pageable", &HostMemoryReport::bytes_pageable)
      .def_readonly("bytes_file", &HostMemoryReport::bytes_file)
      .def_readonly("bytes_staging", &HostMemoryReport::bytes_staging)
      .def_readonly("pinned_budget_bytes", &HostMemoryReport::pinned_budget_bytes)
      .def_readonly("pageable_budget_bytes", &HostMemoryReport::pageable_budget_bytes)
      .def_readonly("file_dir", &HostMemoryReport::file_dir);
  // The core's own reading of what may be pinned (host_memory_budget.h); a distributed sleep sums the
  // ranks of one node against it. Constructible so that the ranks' readings, exchanged, can be asked too.
  py::class_<HostMemoryBudget>(m, "HostMemoryBudget")
      .def(py::init([](std::optional<size_t> host_available_bytes, std::optional<size_t> cgroup_available_bytes) {
             return HostMemoryBudget{host_available_bytes, cgroup_available_bytes};
           }),
           py::arg("host_available_bytes"), py::arg("cgroup_available_bytes"))
      .def_readonly("host_available_bytes", &HostMemoryBudget::host_available_bytes)
      .def_readonly("cgroup_available_bytes", &HostMemoryBudget::cgroup_available_bytes)
      .def_property_readonly("available_bytes", &HostMemoryBudget::available_bytes)
      .def_property_readonly("limited_by", &HostMemoryBudget::limited_by)
      .def_property_readonly("headroom_bytes",
                             [](const HostMemoryBudget& self) {
                               const std::optional<size_t> available = self.available_bytes();
                               return available ? pinning_headroom(*available) : size_t{0};
                             })
      .def("fits", &HostMemoryBudget::fits, py::arg("num_bytes"));
  m.def("read_host_memory_budget", &read_host_memory_budget, py::call_guard<GilReleasedForCall>(),
        "MemAvailable and this process's cgroup limit, as the core reads them before it pins.");
  py::class_<TagStatsRecord>(m, "TagStats")
      .def_readonly("tag", &TagStatsRecord::tag)
      .def_readonly("policy", &TagStatsRecord::policy)
      .def_readonly("is_sleeping", &TagStatsRecord::is_sleeping)
      .def_readonly("allocations", &TagStatsRecord::allocations)
      .def_readonly("bytes_reserved", &TagStatsRecord::bytes_reserved)
      .def_readonly("bytes_mapped", &TagStatsRecord::bytes_mapped)
      .def_readonly("bytes_asleep", &TagStatsRecord::bytes_asleep)
      .def_readonly("bytes_backed_up", &TagStatsRecord::bytes_backed_up)
      .def_readonly("host_tier", &TagStatsRecord::host_tier)
      .def_readonly("bytes_pinned", &TagStatsRecord::bytes_pinned)
      .def_readonly("bytes_pageable", &TagStatsRecord::bytes_pageable)
      .def_readonly("bytes_file", &TagStatsRecord::bytes_file)
      .def_readonly("last_sleep_seconds", &TagStatsRecord::last_sleep_seconds)
      .def_readonly("last_wake_seconds", &TagStatsRecord::last_wake_seconds);
  py::class_<AllocatorStatsRecord>(m, "AllocatorStats")
      .def_readonly("tags", &AllocatorStatsRecord::tags)
      .def_readonly("is_sleeping", &AllocatorStatsRecord::is_sleeping)
      .def_readonly("host", &AllocatorStatsRecord::host)
      .def_readonly("bytes_cached", &AllocatorStatsRecord::bytes_cached)
      .def_readonly("has_sleep", &AllocatorStatsRecord::has_sleep)
      .def_readonly("last_sleep", &AllocatorStatsRecord::last_sleep)
      .def_readonly("has_wake", &AllocatorStatsRecord::has_wake)
      .def_readonly("last_wake", &AllocatorStatsRecord::last_wake)
      .def_readonly("bytes_release_pending", &AllocatorStatsRecord::bytes_release_pending)
      .def_readonly("objects_release_pending", &AllocatorStatsRecord::objects_release_pending)
      .def_readonly("verify", &AllocatorStatsRecord::verify)
      .def_readonly("verify_fallback_reason", &AllocatorStatsRecord::verify_fallback_reason)
      .def_readonly("counters", &AllocatorStatsRecord::counters);

  using OptTags = std::optional<std::vector<std::string>>;
  py::class_<Allocator>(m, "Allocator")
      .def(py::init([](size_t chunk_bytes, int copy_streams, std::string verify, double wait_timeout_seconds,
                       std::optional<size_t> pinned_budget_bytes, std::optional<size_t> pageable_budget_bytes,
                       std::string file_dir, size_t staging_bytes) {
             AllocatorOptions options{chunk_bytes, copy_streams, 0, std::move(verify), wait_timeout_seconds};
             options.pinned_budget_bytes = pinned_budget_bytes;
             options.pageable_budget_bytes = pageable_budget_bytes;
             options.file_dir = std::move(file_dir);
             options.staging_bytes = staging_bytes;
             return new Allocator(std::move(options));
           }),
           py::arg("chunk_bytes") = 0, py::arg("copy_streams") = 0, py::arg("verify") = "",
           py::arg("wait_timeout_seconds") = 0.0, py::arg("pinned_budget_bytes") = py::none(),
           py::arg("pageable_budget_bytes") = py::none(), py::arg("file_dir") = "", py::arg("staging_bytes") = 0)
      .def("set_wait_timeout", &Allocator::set_wait_timeout, py::arg("seconds"), py::call_guard<GilReleasedForCall>())
      .def_property_readonly("wait_timeout", &Allocator::wait_timeout)
      .def("allocate", &Allocator::allocate, py::arg("size_bytes"), py::arg("tag"), py::arg("device"),
           py::call_guard<GilReleasedForCall>())
      .def("free", &Allocator::free, py::arg("address"), py::call_guard<GilReleasedForCall>())
      .def("sleep", &Allocator::sleep, py::arg("level"), py::arg("offload_tags"), py::arg("only_tags") = py::none(),
           py::call_guard<GilReleasedForCall>())
      .def(
          "read_host_backup",
          [](Allocator& self, CUdeviceptr address, size_t num_bytes) {
            std::string data;
            {
              GilReleasedForCall release;
              data = self.read_host_backup(address, num_bytes);
            }
            return py::bytes(data);
          },
          py::arg("address"), py::arg("num_bytes"))
      .def("flip_host_backup_byte", &Allocator::flip_host_backup_byte, py::arg("address"),
           py::call_guard<GilReleasedForCall>())
      .def("device_chunk_hashes", &Allocator::device_chunk_hashes, py::arg("address"),
           py::call_guard<GilReleasedForCall>())
      .def("trust_host_copies", &Allocator::trust_host_copies, py::arg("tags"), py::call_guard<GilReleasedForCall>())
      .def("wake_up", &Allocator::wake_up, py::arg("tags"), py::arg("zero_fill"), py::call_guard<GilReleasedForCall>())
      .def("plan_wake", &Allocator::plan_wake, py::arg("tags"), py::call_guard<GilReleasedForCall>())
      .def(
          "set_policy",
          [](Allocator& self, const std::string& tag, const std::string& policy, bool keep_host_copy,
             bool verify_kept_copy, const std::string& host_tier) {
            self.set_policy(tag, parse_tag_policy(policy), keep_host_copy, verify_kept_copy,
                            parse_host_tier(host_tier));
          },
          py::arg("tag"), py::arg("policy"), py::arg("keep_host_copy") = false, py::arg("verify_kept_copy") = false,
          py::arg("host_tier") = "pinned", py::call_guard<GilReleasedForCall>())
      .def("set_file_dir", &Allocator::set_file_dir, py::arg("directory"), py::call_guard<GilReleasedForCall>())
      .def(
          "host_tier",
          [](Allocator& self, const std::string& tag) { return std::string(host_tier_name(self.host_tier(tag))); },
          py::arg("tag"), py::call_guard<GilReleasedForCall>())
      .def("mark_changed", &Allocator::mark_changed, py::arg("tag"), py::call_guard<GilReleasedForCall>())
      .def(
          "policy",
          [](Allocator& self, const std::string& tag) { return std::string(tag_policy_name(self.policy(tag))); },
          py::call_guard<GilReleasedForCall>())
      .def("is_sleeping", &Allocator::is_sleeping, py::call_guard<GilReleasedForCall>())
      .def("sleeping_tags", &Allocator::sleeping_tags, py::call_guard<GilReleasedForCall>())
      .def("known_tags", &Allocator::known_tags, py::call_guard<GilReleasedForCall>())
      .def(
          "reserve_host_memory",
          [](Allocator& self, long long num_bytes) {
            GilReleasedForCall release;
            return self.reserve_host_memory(num_bytes < 0 ? std::nullopt
                                                          : std::optional<size_t>(static_cast<size_t>(num_bytes)));
          },
          py::arg("num_bytes"))
      .def("host_bytes_to_pin_for_level1", &Allocator::host_bytes_to_pin_for_level1,
           py::call_guard<GilReleasedForCall>())
      .def("release_host_memory", &Allocator::release_host_memory, py::call_guard<GilReleasedForCall>())
      .def("refresh_peer_access", &Allocator::refresh_peer_access, py::call_guard<GilReleasedForCall>())
      .def(
          "write_device",
          [](Allocator& self, CUdeviceptr address, py::bytes data) {
            std::string bytes = data;  // copied while the GIL is held
            GilReleasedForCall release;
            self.write_device(address, bytes);
          },
          py::arg("address"), py::arg("data"))
      .def(
          "read_device",
          [](Allocator& self, CUdeviceptr address, size_t num_bytes) {
            std::string data;
            {
              GilReleasedForCall release;
              data = self.read_device(address, num_bytes);
            }
            return py::bytes(data);
          },
          py::arg("address"), py::arg("num_bytes"))
      .def("empty_cache", &Allocator::empty_cache, py::call_guard<GilReleasedForCall>())
      .def("stats", &Allocator::stats, py::call_guard<GilReleasedForCall>())
      .def(
          "set_mode", [](Allocator& self, const std::string& mode) { self.set_torch_mode(parse_mode(mode)); },
          py::call_guard<GilReleasedForCall>())
      .def(
          "mode", [](Allocator& self) { return std::string(mode_name(self.torch_mode())); },
          py::call_guard<GilReleasedForCall>())
      // ---- Shared CUDA graph pools (Note [Shared graph pools], csrc/graph_pools.h) ----
      .def(
          "begin_graph_pool_capture",
          [](Allocator& self, std::uintptr_t stream, GraphPoolHandle pool) {
            self.begin_graph_pool_capture(reinterpret_cast<CUstream>(stream), pool);
          },
          py::arg("stream"), py::arg("pool"), py::call_guard<GilReleasedForCall>())
      .def(
          "end_graph_pool_capture",
          [](Allocator& self, std::uintptr_t stream) {
            self.end_graph_pool_capture(reinterpret_cast<CUstream>(stream));
          },
          py::arg("stream"), py::call_guard<GilReleasedForCall>())
      .def("release_graph_pool", &Allocator::release_graph_pool, py::arg("pool"), py::call_guard<GilReleasedForCall>())
      .def("graph_pool_graphs", &Allocator::graph_pool_graphs, py::arg("pool"), py::call_guard<GilReleasedForCall>())
      // ---- end of shared CUDA graph pools ----
      .def("close", &Allocator::close, py::call_guard<GilReleasedForCall>());

  m.def("set_current_tag", [](std::string tag) {
    if (tag.empty()) throw InvalidArgument("a tag must be a non-empty string");
    return exchange_thread_tag(std::move(tag));
  });
  m.def("current_tag", []() { return current_thread_tag(); });
  m.def(
      "chunk_hash_pieces",
      [](py::bytes data, size_t piece_bytes) {
        if (piece_bytes == 0 || piece_bytes % 8 != 0)
          throw InvalidArgument("piece_bytes must be a nonzero multiple of 8");
        const std::string_view view = data;
        return chunk_hash_pieces(reinterpret_cast<const unsigned char*>(view.data()), view.size(), piece_bytes);
      },
      py::arg("data"), py::arg("piece_bytes"),
      "The chunk hash of `data` per piece of `piece_bytes` (the host twin of the GPU kernel, chunk_hash.h).");
  m.def("chunk_hash_piece_bytes", []() { return ChunkVerifier::kPieceBytes; });
  m.def("library_path", &library_path, "Path of the shared object that exports gpusleep_torch_malloc/free.");
  m.def(
      "torch_malloc",
      [](long long size, int device, std::uintptr_t stream) {
        GilReleasedForCall release;
        return reinterpret_cast<std::uintptr_t>(
            torch_malloc_entry(static_cast<ssize_t>(size), device, reinterpret_cast<void*>(stream)));
      },
      py::arg("size"), py::arg("device"), py::arg("stream"),
      "The pluggable-allocator malloc entry point; returns 0 on failure (see last_torch_error()).");
  m.def(
      "torch_free",
      [](std::uintptr_t ptr, long long size, int device, std::uintptr_t stream) {
        GilReleasedForCall release;
        torch_free_entry(reinterpret_cast<void*>(ptr), static_cast<ssize_t>(size), device,
                         reinterpret_cast<void*>(stream));
      },
      py::arg("ptr"), py::arg("size"), py::arg("device"), py::arg("stream"));
  m.def(
      "_pluggable_malloc",
      [](long long size, int device, std::uintptr_t stream) {
        // Calls the exported symbol itself, as PyTorch does, so tests see what PyTorch would see: a pointer,
        // nullptr (pool mode), or a C++ exception (global mode), which pybind11 translates here.
        GilReleasedForCall release;
        return reinterpret_cast<std::uintptr_t>(
            gpusleep_torch_malloc(static_cast<ssize_t>(size), device, reinterpret_cast<void*>(stream)));
      },
      py::arg("size"), py::arg("device"), py::arg("stream"));
  m.def(
      "last_torch_error", []() { return last_torch_error(); }, "Why the last torch_malloc on this thread returned 0.");
  m.def("driver_library_path", &driver_library_path);
  m.def("_fail_host_tier_call", &fail_host_tier_call, py::arg("call"), py::arg("nth"), py::arg("error_number"),
        "Tests: make the nth file_write / file_read / file_create / pageable_alloc from now fail with error_number "
        "(0: a short read or write).");
  m.def("_clear_host_tier_faults", &clear_host_tier_faults);
  m.def("driver_counters", []() {
    py::dict out;
    for (const DriverCounterSnapshot& c : driver_counters())
      out[py::str(c.name)] = py::make_tuple(c.calls, c.nanoseconds);
    return out;
  });
  m.def("reset_driver_counters", &reset_driver_counters);
  m.def("counter_descriptions", &counter_descriptions,
        "(name, what it counts) of every counter in Allocator.stats().counters, in order (Note [Typed counters]).");
  m.def("last_teardown_failure", &last_teardown_failure);
}
