// fakecuda: a host-memory double of the CUDA driver API subset gpusleep uses.
//
// Internal state shared by fakecuda.cpp (the cu* entry points) and
// fakecuda_state.cpp (bookkeeping, scheduler, control API).  Everything here is
// guarded by one global mutex, g_mu; every function in namespace fc assumes
// the caller holds it.  See tests/fakecuda/README.md for the rules the double enforces.
#pragma once

#include <cuda.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

// The opaque driver types: the double gives CUcontext a real definition (one
// static object per device, valid for the whole process).
struct CUctx_st {
  int dev;                 // device ordinal of this primary context
  int retain;              // cuDevicePrimaryCtxRetain references (all callers)
  int harness_retain;      // the part of `retain` held by the Python harness's helpers
  CUresult sticky;         // CUDA_SUCCESS or a sticky error (ILLEGAL_ADDRESS)
};

namespace fc {

constexpr int kMaxDevices = 16;
constexpr uint8_t kPoison = 0xA5;

// Every exported cu* entry point, for call counting and fault injection.
// clang-format off: an X-macro list without separators, laid out by hand
#define FAKECUDA_ENTRY_POINTS(X)                                              \
  X(cuInit) X(cuDriverGetVersion) X(cuDeviceGet) X(cuDeviceGetCount)          \
  X(cuDeviceGetName) X(cuDeviceGetAttribute) X(cuDevicePrimaryCtxRetain)      \
  X(cuDevicePrimaryCtxRelease_v2) X(cuCtxSetCurrent) X(cuCtxGetCurrent)       \
  X(cuCtxGetDevice) X(cuCtxSynchronize) X(cuGetErrorName) X(cuGetErrorString) \
  X(cuMemGetInfo_v2) X(cuMemGetAllocationGranularity) X(cuMemAddressReserve)  \
  X(cuMemAddressFree) X(cuMemCreate) X(cuMemRelease) X(cuMemMap)              \
  X(cuMemUnmap) X(cuMemSetAccess) X(cuMemHostAlloc) X(cuMemFreeHost)         \
  X(cuMemHostRegister_v2) X(cuMemHostUnregister) X(cuMemcpyHtoDAsync_v2)      \
  X(cuMemcpyDtoHAsync_v2) X(cuMemcpyDtoDAsync_v2) X(cuMemcpyHtoD_v2)         \
  X(cuMemcpyDtoH_v2) X(cuMemsetD8Async) X(cuMemsetD8_v2) X(cuStreamCreate)    \
  X(cuStreamDestroy_v2) X(cuStreamSynchronize) X(cuStreamQuery)               \
  X(cuStreamWaitEvent) X(cuEventCreate) X(cuEventRecord) X(cuEventQuery)      \
  X(cuEventSynchronize) X(cuEventDestroy_v2) X(cuEventElapsedTime_v2)         \
  X(cuStreamIsCapturing) X(cuThreadExchangeStreamCaptureMode)                 \
  X(cuStreamBeginCapture_v2) X(cuStreamEndCapture) X(cuStreamGetCaptureInfo_v3) \
  X(cuGraphDestroy) X(cuDeviceCanAccessPeer) X(cuMemcpyPeerAsync)              \
  X(cuDevicePrimaryCtxGetState) X(cuMemGetAccess) X(cuMemRetainAllocationHandle) \
  X(cuModuleLoadData) X(cuModuleLoadDataEx) X(cuModuleUnload) X(cuModuleGetFunction) X(cuLaunchKernel) X(cuFuncLoad)
// clang-format on

// clang-format off: the X-macro expands to a list clang-format cannot see
enum Fn {
#define FC_ENUM(name) FN_##name,
  FAKECUDA_ENTRY_POINTS(FC_ENUM)
#undef FC_ENUM
  FN_COUNT
};
// clang-format on
extern const char* const kFnNames[FN_COUNT];
int fn_index(const char* name);  // exact or unversioned name; -1 if unknown

// What a real primary context costs on an H100/H200 is several hundred MiB;
// the default is smaller so that 1 GiB test devices stay roomy (README).
constexpr size_t kDefaultContextOverhead = size_t(32) << 20;
constexpr int kHostNumaUnsupported = -0x7fffffff;  // attribute unknown to this "driver"

struct Device {
  size_t capacity = size_t(1) << 30;
  size_t overhead = kDefaultContextOverhead;  // charged while the primary context is active
  size_t foreign = 0;   // memory taken by "another process"
  size_t used = 0;      // live physical bytes (refcounted handles)
  bool rdma_vmm = true;       // CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED
  int host_numa_id = 0;       // CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID (-1: no NUMA)
  bool host_register = true;  // CU_DEVICE_ATTRIBUTE_HOST_REGISTER_SUPPORTED (0: cuMemHostRegister NOT_SUPPORTED)
  uint64_t retain_calls = 0;  // successful retains outside the harness since reset
};

struct Handle {
  int dev = 0;
  size_t size = 0;
  int fd = -1;
  unsigned char* shadow = nullptr;  // private RW view used by the copy engine
  bool released = false;            // cuMemRelease was called (every reference released)
  int retained = 0;                 // references from cuMemRetainAllocationHandle not yet released
  int maps = 0;                     // live mappings
  bool rdma = false;                // created with allocFlags.gpuDirectRDMACapable
};

struct Reservation {
  size_t size = 0;
};

struct Mapping {
  size_t size = 0;
  uint64_t handle = 0;
  uintptr_t res = 0;                // base of the owning reservation
  uint8_t access[kMaxDevices] = {}; // CU_MEM_ACCESS_FLAGS_PROT_* per device
};

struct Pinned {
  size_t size = 0;
  size_t map_len = 0;    // for cuMemHostAlloc (munmap length)
  bool registered = false;  // cuMemHostRegister (true) or cuMemHostAlloc
};

struct Capture {
  uint64_t id = 0;
  uint64_t origin = 0;  // stream id
  int mode = CU_STREAM_CAPTURE_MODE_GLOBAL;
  std::thread::id thread;
  int ctx = 0;
  bool invalidated = false;
  std::set<uint64_t> members;  // stream ids (origin included)
};

struct Stream {
  uint64_t id = 0;
  int ctx = 0;
  unsigned flags = 0;
  bool legacy = false;
  bool destroyed = false;   // user destroyed it; kept until its queue drains
  bool stalled = false;     // fakecuda_stall_stream: its ops never run until released (work that never finishes)
  std::deque<uint64_t> q;   // pending op ids, ascending
  // capture
  uint64_t cap = 0;         // capture id or 0
  uint64_t cap_tail = 0;    // node counter of the last captured node
  uint64_t cap_joined = 0;  // cap_tail when last joined back
};

struct Event {
  uint64_t id = 0;
  int ctx = 0;
  unsigned flags = 0;
  bool recorded = false;
  uint64_t rec_op = 0;      // pending record op, 0 when complete
  double ts_ms = 0;
  bool captured = false;    // last recorded in a capturing stream
  uint64_t cap = 0, cap_stream = 0, cap_tail = 0;
};

enum class OpKind { HtoD, DtoH, DtoD, Memset, Record, Wait, Kernel };

// A module loaded with cuModuleLoadData: PTX text, JIT-compiled "by name" (README, Kernels).
struct Module {
  int ctx = 0;
  std::map<std::string, std::vector<std::string>> entries;  // .entry name -> its parameter types (".u64", ...)
};

struct Function {
  uint64_t module = 0;
  std::string name;
};

// fakecuda_corrupt_copy(): what goes wrong in an armed copy when it executes.
enum class Corruption { kNone = 0, kFlipByte = 1, kWrongOffset = 2, kLostTail = 3 };

struct CopyCorruption {
  int fn;         // Fn of the copy entry point it counts
  int remaining;  // calls until it is armed on one
  Corruption kind;
};

struct Range {
  uintptr_t lo = 0, hi = 0;
  bool device = false;
  bool write = false;
};

struct Op {
  uint64_t id = 0;
  uint64_t stream = 0;
  int ctx = 0;
  OpKind kind = OpKind::Wait;
  const char* fn = "";
  CUdeviceptr dst = 0, src = 0;
  size_t n = 0;
  void* hdst = nullptr;
  const void* hsrc = nullptr;
  std::vector<unsigned char> staged;  // snapshot of a pageable sync HtoD source
  bool use_staged = false;
  unsigned char val = 0;
  uint64_t event = 0;
  std::vector<uint64_t> deps;         // op ids this op waits for
  std::vector<Range> ranges;
  std::vector<uint64_t> handles;      // physical handles touched at enqueue
  Corruption corrupt = Corruption::kNone;  // a copy that goes wrong when it executes
  std::string kernel;                 // kernel ops: the function's name
  std::vector<uint64_t> params;       // kernel ops: the 8-byte parameters
  unsigned grid = 0, block = 0;       // kernel ops: gridDim.x, blockDim.x
};

struct Fault {
  int remaining;
  int error;
};

struct Seg {
  unsigned char* p;
  size_t len;
  uint64_t handle;
};

struct State {
  bool initialized = false;
  int ndev = 2;
  size_t gran = 2u << 20;
  size_t rec_gran = 2u << 20;
  uint64_t seed = 0;
  std::mt19937_64 rng;
  Device dev[kMaxDevices];
  std::map<uint64_t, Handle> handles;
  std::map<uintptr_t, Reservation> reservations;
  std::map<uintptr_t, Mapping> mappings;
  std::map<uintptr_t, Pinned> pinned;
  std::map<uint64_t, Stream> streams;
  std::map<uint64_t, Event> events;
  std::map<uint64_t, Capture> captures;
  std::set<uint64_t> graphs;
  std::map<uint64_t, Module> modules;
  std::map<uint64_t, Function> functions;
  std::vector<CopyCorruption> corruptions;
  uint64_t kernels_run = 0;  // kernel ops executed since reset
  std::map<uint64_t, Op> ops;  // pending (enqueued, not executed)
  uint64_t next_id = 0x1000;
  uint64_t calls[FN_COUNT] = {};
  std::vector<Fault> faults[FN_COUNT];
  std::vector<Fault> any_faults;   // fire on the nth call of any entry point
  std::vector<int> stall_on[FN_COUNT];  // fakecuda_stall_on_call: ops still to enqueue before the stall, per entry
  size_t stalls_armed = 0;
  std::vector<uint8_t> call_log;   // Fn of every counted call since reset, in order
  bool peer[kMaxDevices][kMaxDevices];  // peer[a][b]: device a can access memory of device b
  uint64_t pageable_async = 0;
  uint64_t pageable_sync = 0;
  uint64_t spanning_copies = 0;  // copies refused: host range across two separate pinned ranges (section 8b)
  // What the JIT accepts (fakecuda_set_jit_limits): PTX ISA up to jit_max_ptx (major*10 + minor; a CUDA 12.0
  // driver: 8.0) and targets up to sm_<jit_device_sm> (9.0).
  int jit_max_ptx = 80;
  int jit_device_sm = 90;
  std::vector<std::string> violations;
  bool honor_hints = false;
  bool abort_on_violation = false;
  bool race_detection = true;
};

extern std::mutex g_mu;
extern State g;
extern CUctx_st g_ctx[kMaxDevices];
extern uint64_t g_capture_counter;
extern thread_local CUctx_st* t_ctx;
extern thread_local int t_capture_mode;
extern thread_local int t_harness;  // > 0 while the Python harness's own helpers call in

// Device memory a device's active primary context takes (0 when not retained).
size_t context_charge(int dev);
size_t device_free(int dev);

// Handles as opaque, never-dereferenceable pointer values.
uint64_t new_id();
CUstream stream_handle(uint64_t id);
CUevent event_handle(uint64_t id);
CUgraph graph_handle(uint64_t id);
uint64_t handle_id(const void* h, uint64_t tag);  // 0 if not of that kind
constexpr uint64_t kStreamTag = 0xFAC5000000000000ull;
constexpr uint64_t kEventTag = 0xFAC6000000000000ull;
constexpr uint64_t kGraphTag = 0xFAC7000000000000ull;
constexpr uint64_t kCaptureGraphTag = 0xFAC8000000000000ull;
constexpr uint64_t kModuleTag = 0xFAC9000000000000ull;
constexpr uint64_t kFunctionTag = 0xFACA000000000000ull;
inline uint64_t legacy_stream_id(int dev) { return uint64_t(dev) + 1; }

void violation(const std::string& msg);
std::string live_summary(int* total);
void reset_state(int devices, size_t capacity, size_t gran, uint64_t seed);
size_t default_granularity();

// Device memory lookup.
const Mapping* mapping_at(uintptr_t p, uintptr_t* base);
// Resolve [p, p+n) for device `dev` needing `need` access; on failure returns
// false and explains in *why.
bool resolve(int dev, CUdeviceptr p, size_t n, unsigned need, std::vector<Seg>* out, std::string* why);
bool overlaps_reservation(uintptr_t lo, uintptr_t hi);
void maybe_free_handle(uint64_t id);

// Scheduler.
uint64_t enqueue(Op&& op);  // assigns id, deps, race check; returns op id
CUresult drive_ops(const std::vector<uint64_t>& targets, int err_ctx);
CUresult drive_stream(uint64_t stream_id);
CUresult drive_ctx(int ctx);
bool step_towards(const std::vector<uint64_t>& targets);  // run one ready op
int progress(int max_ops);
bool op_pending(uint64_t id);
// Pending ops touching [lo, hi) (device or host); description of the first.
bool pending_touching(uintptr_t lo, uintptr_t hi, bool device, std::string* what);
bool pending_touching_handle(uint64_t h, std::string* what);

std::string hex(uint64_t v);

}  // namespace fc
