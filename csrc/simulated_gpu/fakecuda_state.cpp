// fakecuda: bookkeeping, the deferred-op scheduler and the fakecuda_* control API.
#include "fakecuda_state.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "chunk_hash.h"  // csrc/: the host twin of gpusleep's kernel

namespace fc {

const char* const kFnNames[FN_COUNT] = {
#define FC_NAME(name) #name,
    FAKECUDA_ENTRY_POINTS(FC_NAME)
#undef FC_NAME
};

std::mutex g_mu;
// Note [Stalled streams]: a synchronize whose work waits behind a stalled stream blocks, as the real driver
// does for work that never finishes (a collective waiting for a dead peer, a persistent kernel), releasing g_mu
// so that other threads (and the release) can run. It is woken by fakecuda_stall_stream(.., 0) and by
// configure; after g_hang_limit_ms it records a violation ("would block for ever on a GPU") and returns
// CUDA_ERROR_LAUNCH_TIMEOUT, so that a test of code without a deadline fails instead of hanging CI.
static std::condition_variable_any g_stall_cv;
static long g_hang_limit_ms = 10000;
State g;
CUctx_st g_ctx[kMaxDevices];
uint64_t g_capture_counter = 0;
thread_local CUctx_st* t_ctx = nullptr;
thread_local int t_capture_mode = CU_STREAM_CAPTURE_MODE_GLOBAL;
thread_local int t_harness = 0;
static_assert(FN_COUNT < 256, "call_log stores an Fn in a byte");

size_t context_charge(int dev) { return g_ctx[dev].retain > 0 ? g.dev[dev].overhead : 0; }

size_t device_free(int dev) {
  const Device& d = g.dev[dev];
  size_t taken = context_charge(dev) + d.used + d.foreign;
  return taken >= d.capacity ? 0 : d.capacity - taken;
}

static std::string strip_version(const std::string& s) {
  auto pos = s.rfind("_v");
  if (pos != std::string::npos && pos + 2 < s.size() &&
      std::all_of(s.begin() + pos + 2, s.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return s.substr(0, pos);
  return s;
}

int fn_index(const char* name) {
  if (!name) return -1;
  for (int i = 0; i < FN_COUNT; ++i)
    if (std::strcmp(kFnNames[i], name) == 0) return i;
  std::string want = strip_version(name);
  for (int i = 0; i < FN_COUNT; ++i)
    if (strip_version(kFnNames[i]) == want) return i;
  return -1;
}

std::string hex(uint64_t v) {
  char b[32];
  std::snprintf(b, sizeof b, "0x%llx", static_cast<unsigned long long>(v));
  return b;
}

uint64_t new_id() { return ++g.next_id; }
CUstream stream_handle(uint64_t id) { return reinterpret_cast<CUstream>(kStreamTag | (id << 4)); }
CUevent event_handle(uint64_t id) { return reinterpret_cast<CUevent>(kEventTag | (id << 4)); }
CUgraph graph_handle(uint64_t id) { return reinterpret_cast<CUgraph>(kGraphTag | (id << 4)); }
uint64_t handle_id(const void* h, uint64_t tag) {
  auto v = reinterpret_cast<uint64_t>(h);
  if ((v & 0xFFFF000000000000ull) != tag || (v & 0xF)) return 0;
  return (v & 0x0000FFFFFFFFFFFFull) >> 4;
}

void violation(const std::string& msg) {
  g.violations.push_back(msg);
  if (std::getenv("FAKECUDA_VERBOSE")) std::fprintf(stderr, "fakecuda violation: %s\n", msg.c_str());
  if (g.abort_on_violation) {
    std::fprintf(stderr, "fakecuda violation (abort): %s\n", msg.c_str());
    std::abort();
  }
}

std::string live_summary(int* total) {
  int handles = 0, pinned = 0, streams = 0;
  for (auto& kv : g.handles)
    if (!kv.second.released) ++handles;
  for (auto& kv : g.pinned) (void)kv, ++pinned;
  for (auto& kv : g.streams)
    if (!kv.second.legacy && !kv.second.destroyed) ++streams;
  char buf[256];
  std::snprintf(buf, sizeof buf, "handles=%d reservations=%zu mappings=%zu pinned=%d streams=%d events=%zu graphs=%zu",
                handles, g.reservations.size(), g.mappings.size(), pinned, streams, g.events.size(), g.graphs.size());
  if (total)
    *total = handles + int(g.reservations.size()) + int(g.mappings.size()) + pinned + streams + int(g.events.size()) +
             int(g.graphs.size());
  return buf;
}

static size_t default_context_overhead() {
  if (const char* e = std::getenv("FAKECUDA_CONTEXT_OVERHEAD_BYTES")) {
    char* end = nullptr;
    unsigned long long v = std::strtoull(e, &end, 0);
    if (end != e) return size_t(v);
  }
  return kDefaultContextOverhead;
}

size_t default_granularity() {
  if (const char* e = std::getenv("FAKECUDA_GRANULARITY_BYTES")) {
    unsigned long long v = std::strtoull(e, nullptr, 0);
    if (v) return size_t(v);
  }
  return size_t(2) << 20;
}

static void free_handle_memory(Handle& h) {
  if (h.shadow) munmap(h.shadow, h.size);
  if (h.fd >= 0) close(h.fd);
  h.shadow = nullptr;
  h.fd = -1;
  if (g.dev[h.dev].used >= h.size) g.dev[h.dev].used -= h.size;
}

void maybe_free_handle(uint64_t id) {
  auto it = g.handles.find(id);
  if (it == g.handles.end()) return;
  if (it->second.released && it->second.maps == 0) {
    free_handle_memory(it->second);
    g.handles.erase(it);
  }
}

void reset_state(int devices, size_t capacity, size_t gran, uint64_t seed) {
  for (auto& kv : g.handles) free_handle_memory(kv.second);
  for (auto& kv : g.reservations) munmap(reinterpret_cast<void*>(kv.first), kv.second.size);
  for (auto& kv : g.pinned)
    if (!kv.second.registered) munmap(reinterpret_cast<void*>(kv.first), kv.second.map_len);
  g.handles.clear();
  g.reservations.clear();
  g.mappings.clear();
  g.pinned.clear();
  g.streams.clear();
  g.events.clear();
  g.captures.clear();
  g.graphs.clear();
  g.modules.clear();
  g.functions.clear();
  g.corruptions.clear();
  g.kernels_run = 0;
  g.ops.clear();
  g.ndev = devices;
  g.gran = gran;
  g.rec_gran = gran;
  if (const char* e = std::getenv("FAKECUDA_RECOMMENDED_GRANULARITY_BYTES")) {
    unsigned long long v = std::strtoull(e, nullptr, 0);
    if (v >= gran && v % gran == 0) g.rec_gran = size_t(v);
  }
  g.seed = seed;
  g.rng.seed(seed);
  for (int i = 0; i < kMaxDevices; ++i) {
    g.dev[i] = Device{};
    g.dev[i].capacity = capacity;
    g.dev[i].overhead = default_context_overhead();
    // Two sockets: the lower half of the devices sits next to host node 0, the upper half next to node 1.
    g.dev[i].host_numa_id = devices > 1 && i >= devices / 2 ? 1 : 0;
    g_ctx[i].dev = i;
    g_ctx[i].sticky = CUDA_SUCCESS;
    for (int j = 0; j < kMaxDevices; ++j) g.peer[i][j] = true;  // NVLink box: every pair
  }
  for (int i = 0; i < devices; ++i) {
    Stream s;
    s.id = legacy_stream_id(i);
    s.ctx = i;
    s.legacy = true;
    g.streams[s.id] = s;
  }
  for (auto& c : g.calls) c = 0;
  for (auto& f : g.faults) f.clear();
  g.any_faults.clear();
  g.call_log.clear();
  g.pageable_async = 0;
  g.pageable_sync = 0;
  g.spanning_copies = 0;
  g.jit_max_ptx = 80;
  g.jit_device_sm = 90;
  g.violations.clear();
}

namespace {
// FAKECUDA_DEVICES and FAKECUDA_CAPACITY_BYTES (like FAKECUDA_GRANULARITY_BYTES) set what a process starts with
// before anyone configures it: the children of a process that enabled the simulated GPU see the same devices.
size_t env_size(const char* name, size_t fallback) {
  const char* e = std::getenv(name);
  if (e == nullptr || *e == '\0') return fallback;
  const unsigned long long v = std::strtoull(e, nullptr, 0);
  return v ? size_t(v) : fallback;
}

struct Init {
  Init() {
    const int devices = int(std::min<size_t>(env_size("FAKECUDA_DEVICES", 2), kMaxDevices));
    reset_state(devices, env_size("FAKECUDA_CAPACITY_BYTES", size_t(1) << 30), default_granularity(), 0);
    if (const char* e = std::getenv("FAKECUDA_ABORT_ON_VIOLATION")) g.abort_on_violation = *e && *e != '0';
  }
} g_init;
}  // namespace

// ---------------------------------------------------------------- memory lookup

const Mapping* mapping_at(uintptr_t p, uintptr_t* base) {
  auto it = g.mappings.upper_bound(p);
  if (it == g.mappings.begin()) return nullptr;
  --it;
  if (p >= it->first + it->second.size) return nullptr;
  if (base) *base = it->first;
  return &it->second;
}

bool overlaps_reservation(uintptr_t lo, uintptr_t hi) {
  // Reservations never overlap, so only the last one starting below hi can.
  auto it = g.reservations.lower_bound(hi);
  if (it == g.reservations.begin()) return false;
  --it;
  return it->first + it->second.size > lo;
}

bool resolve(int dev, CUdeviceptr p, size_t n, unsigned need, std::vector<Seg>* out, std::string* why) {
  uintptr_t cur = p;
  uintptr_t end = p + n;
  if (end < cur) {
    *why = "address range overflows";
    return false;
  }
  while (cur < end) {
    uintptr_t base = 0;
    const Mapping* m = mapping_at(cur, &base);
    if (!m) {
      *why = "device address " + hex(cur) + " is not mapped";
      return false;
    }
    if ((m->access[dev] & need) != need) {
      *why = "device address " + hex(cur) + " is mapped without " +
             (need == CU_MEM_ACCESS_FLAGS_PROT_READWRITE ? "READWRITE" : "READ") + " access for device " +
             std::to_string(dev);
      return false;
    }
    auto hit = g.handles.find(m->handle);
    if (hit == g.handles.end() || !hit->second.shadow) {
      *why = "mapping at " + hex(base) + " has no backing memory";
      return false;
    }
    size_t off = cur - base;
    size_t len = std::min<uintptr_t>(end, base + m->size) - cur;
    if (out) out->push_back(Seg{hit->second.shadow + off, len, m->handle});
    cur += len;
  }
  return true;
}

// ---------------------------------------------------------------- scheduler

bool op_pending(uint64_t id) { return id && g.ops.count(id); }

static Stream* stream_of(uint64_t id) {
  auto it = g.streams.find(id);
  return it == g.streams.end() ? nullptr : &it->second;
}

static bool ranges_conflict(const Op& a, const Op& b) {
  for (auto& x : a.ranges)
    for (auto& y : b.ranges)
      if (x.device == y.device && (x.write || y.write) && x.lo < y.hi && y.lo < x.hi) return true;
  return false;
}

static const char* kind_name(OpKind k) {
  switch (k) {
    case OpKind::HtoD: return "HtoD copy";
    case OpKind::DtoH: return "DtoH copy";
    case OpKind::DtoD: return "DtoD copy";
    case OpKind::Memset: return "memset";
    case OpKind::Record: return "event record";
    case OpKind::Wait: return "event wait";
    case OpKind::Kernel: return "kernel";
  }
  return "op";
}

static std::string describe(const Op& op) {
  std::string s = std::string(op.fn) + " (" + kind_name(op.kind) + ", stream " + hex(op.stream);
  if (op.kind == OpKind::HtoD || op.kind == OpKind::DtoD || op.kind == OpKind::Memset) s += ", dst " + hex(op.dst);
  if (op.kind == OpKind::DtoH || op.kind == OpKind::DtoD) s += ", src " + hex(op.src);
  if (op.kind == OpKind::Kernel) s += ", " + op.kernel;
  if (op.n) s += ", " + std::to_string(op.n) + " bytes";
  return s + ")";
}

// Closure of pending ops that must run before (and including) the seeds:
// per stream, every pending op up to the largest included id.
using Closure = std::map<uint64_t, uint64_t>;  // stream id -> max included op id

static void close_over(Closure& cl, std::vector<uint64_t> work) {
  while (!work.empty()) {
    uint64_t id = work.back();
    work.pop_back();
    auto it = g.ops.find(id);
    if (it == g.ops.end()) continue;
    uint64_t sid = it->second.stream;
    uint64_t& mx = cl[sid];
    if (id <= mx) continue;
    uint64_t old = mx;
    mx = id;
    Stream* s = stream_of(sid);
    if (!s) continue;
    for (uint64_t qid : s->q) {
      if (qid <= old) continue;
      if (qid > id) break;
      for (uint64_t d : g.ops[qid].deps)
        if (op_pending(d)) work.push_back(d);
    }
  }
}

static bool in_closure(const Closure& cl, uint64_t id) {
  auto it = g.ops.find(id);
  if (it == g.ops.end()) return false;
  auto c = cl.find(it->second.stream);
  return c != cl.end() && id <= c->second;
}

static void race_check(const Op& y) {
  if (!g.race_detection || y.ranges.empty()) return;
  std::vector<const Op*> suspects;
  for (auto& kv : g.ops) {
    const Op& x = kv.second;
    if (x.stream == y.stream) continue;  // same stream: ordered
    if (ranges_conflict(x, y)) suspects.push_back(&x);
  }
  if (suspects.empty()) return;
  Closure cl;
  std::vector<uint64_t> seeds(y.deps.begin(), y.deps.end());
  if (Stream* s = stream_of(y.stream))
    if (!s->q.empty()) seeds.push_back(s->q.back());
  close_over(cl, seeds);
  for (const Op* x : suspects)
    if (!in_closure(cl, x->id))
      violation("race: " + describe(y) + " conflicts with unordered pending " + describe(*x) +
                " on another stream (missing event wait or synchronization)");
}

uint64_t enqueue(Op&& op) {
  Stream* s = stream_of(op.stream);
  op.id = new_id();
  // Legacy-stream implicit synchronization with blocking streams of the context.
  if (s->legacy) {
    for (auto& kv : g.streams) {
      Stream& o = kv.second;
      if (o.legacy || o.ctx != s->ctx || (o.flags & CU_STREAM_NON_BLOCKING) || o.q.empty()) continue;
      op.deps.push_back(o.q.back());
    }
  } else if (!(s->flags & CU_STREAM_NON_BLOCKING)) {
    Stream* l = stream_of(legacy_stream_id(s->ctx));
    if (l && !l->q.empty()) op.deps.push_back(l->q.back());
  }
  race_check(op);
  if (g.stalls_armed > 0) {  // fakecuda_stall_on_call: this op's stream stalls with it (Note [Stalled streams])
    const int fi = fn_index(op.fn);
    if (fi >= 0) {
      std::vector<int>& armed = g.stall_on[fi];
      for (auto it = armed.begin(); it != armed.end();) {
        if (--*it > 0) {
          ++it;
          continue;
        }
        s->stalled = true;
        it = armed.erase(it);
        --g.stalls_armed;
      }
    }
  }
  uint64_t id = op.id;
  s->q.push_back(id);
  g.ops.emplace(id, std::move(op));
  return id;
}

static void pop_op(Op& op) {
  Stream* s = stream_of(op.stream);
  if (s) {
    auto it = std::find(s->q.begin(), s->q.end(), op.id);
    if (it != s->q.end()) s->q.erase(it);
    if (s->destroyed && s->q.empty()) g.streams.erase(op.stream);
  }
  g.ops.erase(op.id);
}

static void make_sticky(int ctx, const std::string& why) {
  g_ctx[ctx].sticky = CUDA_ERROR_ILLEGAL_ADDRESS;
  violation("CUDA_ERROR_ILLEGAL_ADDRESS (sticky) on device " + std::to_string(ctx) + ": " + why);
  std::vector<uint64_t> drop;
  for (auto& kv : g.ops)
    if (kv.second.ctx == ctx) drop.push_back(kv.first);
  for (uint64_t id : drop) pop_op(g.ops[id]);
}

static double now_ms() {
  using namespace std::chrono;
  return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

static void copy_segs(const std::vector<Seg>& dst, const std::vector<Seg>& src) {
  size_t di = 0, si = 0, doff = 0, soff = 0;
  while (di < dst.size() && si < src.size()) {
    size_t len = std::min(dst[di].len - doff, src[si].len - soff);
    std::memmove(dst[di].p + doff, src[si].p + soff, len);
    doff += len;
    soff += len;
    if (doff == dst[di].len) ++di, doff = 0;
    if (soff == src[si].len) ++si, soff = 0;
  }
}

// fakecuda_corrupt_copy(): the copy goes wrong as it executes. `dst` is the copy's destination, `src` its
// source (already the bytes that should land), both n bytes long.
static void corrupt_copy(Corruption kind, unsigned char* dst, const unsigned char* src, size_t n) {
  switch (kind) {
    case Corruption::kNone: std::memcpy(dst, src, n); return;
    case Corruption::kFlipByte:  // one byte in the middle arrives with its bits flipped
      std::memcpy(dst, src, n);
      dst[n / 2] ^= 0xFF;
      return;
    case Corruption::kWrongOffset:  // the data lands 8 bytes late: the first 8 stay stale, the last 8 are lost
      if (n > 8) std::memmove(dst + 8, src, n - 8);
      return;
    case Corruption::kLostTail:  // the last quarter (at least one byte) never arrives
      std::memcpy(dst, src, n - std::max<size_t>(1, n / 4));
      return;
  }
}

// Gathers device bytes into one buffer / scatters them back (segments of one resolved range).
static std::vector<unsigned char> gather(const std::vector<Seg>& segs) {
  std::vector<unsigned char> out;
  for (const Seg& sg : segs) out.insert(out.end(), sg.p, sg.p + sg.len);
  return out;
}
static void scatter(const std::vector<Seg>& segs, const unsigned char* src) {
  for (const Seg& sg : segs) std::memcpy(sg.p, src, sg.len), src += sg.len;
}

// Kernels run "by name" on the host (README, Kernels). False (and the op makes the context sticky) when the
// kernel would fault on the GPU.
static bool run_kernel(Op& op, std::string* why) {
  if (op.kernel == "gpusleep_hash_pieces") {
    // (data, num_bytes, span_words, blocks_per_piece, results): chunk_hash.h's twin of the PTX kernel.
    const uint64_t data = op.params[0], num_bytes = op.params[1], span_words = op.params[2],
                   blocks_per_piece = op.params[3], results = op.params[4];
    if (data % 8 != 0) return *why = "misaligned data pointer " + hex(data), false;
    if (blocks_per_piece == 0) return *why = "division by zero (blocks_per_piece = 0)", false;
    const uint64_t words = (num_bytes + 7) / 8;
    const uint64_t pieces = (uint64_t(op.grid) + blocks_per_piece - 1) / blocks_per_piece;
    std::vector<Seg> d, r;
    if (num_bytes && !resolve(op.ctx, data, num_bytes, CU_MEM_ACCESS_FLAGS_PROT_READ, &d, why)) return false;
    if (results % 8 != 0) return *why = "misaligned results pointer " + hex(results), false;
    if (!resolve(op.ctx, results, pieces * 8, CU_MEM_ACCESS_FLAGS_PROT_READWRITE, &r, why)) return false;
    const std::vector<unsigned char> bytes = gather(d);
    std::vector<unsigned char> sums = gather(r);
    for (uint64_t block = 0; block < op.grid; ++block) {
      const uint64_t first = block * span_words;
      if (first >= words) continue;
      const uint64_t last = std::min(first + span_words, words);
      const uint64_t lo = first * 8, hi = std::min<uint64_t>(last * 8, num_bytes);
      const uint64_t sum = gpusleep::chunk_hash_bytes(bytes.data() + lo, hi - lo, first);
      uint64_t slot;
      std::memcpy(&slot, sums.data() + (block / blocks_per_piece) * 8, 8);
      slot += sum;
      std::memcpy(sums.data() + (block / blocks_per_piece) * 8, &slot, 8);
    }
    scatter(r, sums.data());
    return true;
  }
  *why = "fakecuda cannot run kernel '" + op.kernel + "'";
  return false;
}

static void execute(uint64_t id) {
  Op& op = g.ops[id];
  std::string why;
  std::vector<Seg> d, s;
  switch (op.kind) {
    case OpKind::Record: {
      auto it = g.events.find(op.event);
      if (it != g.events.end() && it->second.rec_op == id) {
        it->second.rec_op = 0;
        it->second.ts_ms = now_ms();
      }
      break;
    }
    case OpKind::Wait: break;
    case OpKind::HtoD:
      if (!resolve(op.ctx, op.dst, op.n, CU_MEM_ACCESS_FLAGS_PROT_READWRITE, &d, &why)) {
        make_sticky(op.ctx, describe(op) + " executed after its memory changed: " + why);
        return;
      }
      if (op.corrupt != Corruption::kNone) {
        std::vector<unsigned char> now = gather(d);
        corrupt_copy(op.corrupt, now.data(),
                     static_cast<const unsigned char*>(op.use_staged ? op.staged.data() : op.hsrc), op.n);
        scatter(d, now.data());
      } else {
        auto src = static_cast<const unsigned char*>(op.use_staged ? op.staged.data() : op.hsrc);
        for (auto& sg : d) std::memcpy(sg.p, src, sg.len), src += sg.len;
      }
      break;
    case OpKind::DtoH:
      if (!resolve(op.ctx, op.src, op.n, CU_MEM_ACCESS_FLAGS_PROT_READ, &s, &why)) {
        make_sticky(op.ctx, describe(op) + " executed after its memory changed: " + why);
        return;
      }
      if (op.corrupt != Corruption::kNone) {
        const std::vector<unsigned char> from = gather(s);
        corrupt_copy(op.corrupt, static_cast<unsigned char*>(op.hdst), from.data(), op.n);
      } else {
        auto dst = static_cast<unsigned char*>(op.hdst);
        for (auto& sg : s) std::memcpy(dst, sg.p, sg.len), dst += sg.len;
      }
      break;
    case OpKind::DtoD:
      if (!resolve(op.ctx, op.src, op.n, CU_MEM_ACCESS_FLAGS_PROT_READ, &s, &why) ||
          !resolve(op.ctx, op.dst, op.n, CU_MEM_ACCESS_FLAGS_PROT_READWRITE, &d, &why)) {
        make_sticky(op.ctx, describe(op) + " executed after its memory changed: " + why);
        return;
      }
      copy_segs(d, s);
      break;
    case OpKind::Memset:
      if (!resolve(op.ctx, op.dst, op.n, CU_MEM_ACCESS_FLAGS_PROT_READWRITE, &d, &why)) {
        make_sticky(op.ctx, describe(op) + " executed after its memory changed: " + why);
        return;
      }
      for (auto& sg : d) std::memset(sg.p, op.val, sg.len);
      break;
    case OpKind::Kernel:
      if (!run_kernel(op, &why)) {
        make_sticky(op.ctx, describe(op) + " faulted: " + why);
        return;
      }
      ++g.kernels_run;
      break;
  }
  pop_op(op);
}

static bool deps_done(const Op& op) {
  for (uint64_t d : op.deps)
    if (op_pending(d)) return false;
  return true;
}

// Ready ops inside the closure (or everywhere if cl == nullptr).
static std::vector<uint64_t> ready_ops(const Closure* cl) {
  std::vector<uint64_t> r;
  auto consider = [&](Stream& s, uint64_t limit) {
    if (s.q.empty()) return;
    uint64_t h = s.q.front();
    if (h > limit || s.stalled) return;
    if (deps_done(g.ops[h])) r.push_back(h);
  };
  if (cl) {
    for (auto& kv : *cl)
      if (Stream* s = stream_of(kv.first)) consider(*s, kv.second);
  } else {
    for (auto& kv : g.streams) consider(kv.second, UINT64_MAX);
  }
  return r;
}

bool step_towards(const std::vector<uint64_t>& targets) {
  Closure cl;
  close_over(cl, targets);
  auto r = ready_ops(&cl);
  if (r.empty()) return false;
  execute(r[g.rng() % r.size()]);
  return true;
}

// Whether some op of the closure is still queued (after ready_ops found none: it waits behind a stall).
static bool closure_pending(const Closure& cl) {
  for (auto& kv : cl) {
    Stream* s = stream_of(kv.first);
    if (s && !s->q.empty() && s->q.front() <= kv.second) return true;
  }
  return false;
}

CUresult drive_ops(const std::vector<uint64_t>& targets, int err_ctx) {
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::milliseconds(g_hang_limit_ms);
  for (;;) {
    Closure cl;  // recomputed after every wait: other threads may have run or destroyed work meanwhile
    close_over(cl, targets);
    for (;;) {
      auto r = ready_ops(&cl);
      if (r.empty()) break;
      execute(r[g.rng() % r.size()]);
    }
    if (!closure_pending(cl)) break;
    // Note [Stalled streams]: wait (g_mu released) for the release, up to the hang limit.
    if (g_stall_cv.wait_until(g_mu, give_up) == std::cv_status::timeout) {
      Closure again;
      close_over(again, targets);
      if (!closure_pending(again)) break;
      violation("a synchronize waited " + std::to_string(g_hang_limit_ms) +
                " ms for work behind a stalled stream "
                "that never finishes: on a GPU this wait blocks for ever (wait with a deadline instead)");
      return CUDA_ERROR_LAUNCH_TIMEOUT;
    }
  }
  if (err_ctx >= 0 && g_ctx[err_ctx].sticky != CUDA_SUCCESS) return g_ctx[err_ctx].sticky;
  return CUDA_SUCCESS;
}

CUresult drive_stream(uint64_t sid) {
  Stream* s = stream_of(sid);
  int ctx = s ? s->ctx : -1;
  std::vector<uint64_t> t;
  if (s && !s->q.empty()) t.push_back(s->q.back());
  return drive_ops(t, ctx);
}

CUresult drive_ctx(int ctx) {
  std::vector<uint64_t> t;
  for (auto& kv : g.streams)
    if (kv.second.ctx == ctx && !kv.second.q.empty()) t.push_back(kv.second.q.back());
  return drive_ops(t, ctx);
}

int progress(int max_ops) {
  int n = 0;
  while (max_ops < 0 || n < max_ops) {
    auto r = ready_ops(nullptr);
    if (r.empty()) break;
    execute(r[g.rng() % r.size()]);
    ++n;
  }
  return n;
}

bool pending_touching(uintptr_t lo, uintptr_t hi, bool device, std::string* what) {
  for (auto& kv : g.ops)
    for (auto& r : kv.second.ranges)
      if (r.device == device && r.lo < hi && lo < r.hi) {
        if (what) *what = describe(kv.second);
        return true;
      }
  return false;
}

bool pending_touching_handle(uint64_t h, std::string* what) {
  for (auto& kv : g.ops)
    for (uint64_t x : kv.second.handles)
      if (x == h) {
        if (what) *what = describe(kv.second);
        return true;
      }
  return false;
}

}  // namespace fc

// ---------------------------------------------------------------- control API

using namespace fc;

extern "C" {

__attribute__((visibility("default"))) int fakecuda_configure(int devices, size_t capacity_bytes,
                                                              size_t granularity_bytes, uint64_t seed) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (granularity_bytes == 0) granularity_bytes = default_granularity();
  long page = sysconf(_SC_PAGESIZE);
  if (devices < 1 || devices > kMaxDevices || (granularity_bytes & (granularity_bytes - 1)) ||
      granularity_bytes % size_t(page))
    return -2;
  int total = 0;
  live_summary(&total);
  reset_state(devices, capacity_bytes, granularity_bytes, seed);
  g_stall_cv.notify_all();  // a synchronize blocked on a stalled stream of the old state returns
  return total ? 1 : 0;
}

__attribute__((visibility("default"))) int fakecuda_set_capacity(int dev, size_t bytes) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (dev < 0 || dev >= g.ndev) return -1;
  g.dev[dev].capacity = bytes;
  return 0;
}

__attribute__((visibility("default"))) int fakecuda_set_foreign_load(int dev, size_t bytes) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (dev < 0 || dev >= g.ndev) return -1;
  g.dev[dev].foreign = bytes;
  return 0;
}

__attribute__((visibility("default"))) int fakecuda_set_context_overhead(int dev, size_t bytes) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (dev < 0 || dev >= g.ndev) return -1;
  g.dev[dev].overhead = bytes;
  return 0;
}

__attribute__((visibility("default"))) int fakecuda_set_recommended_granularity(size_t bytes) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (bytes < g.gran || bytes % g.gran) return -1;
  g.rec_gran = bytes;
  return 0;
}

__attribute__((visibility("default"))) size_t fakecuda_granularity(void) {
  std::lock_guard<std::mutex> lk(g_mu);
  return g.gran;
}

__attribute__((visibility("default"))) int fakecuda_inject_fault(const char* fn, int nth, int error) {
  std::lock_guard<std::mutex> lk(g_mu);
  int i = fn_index(fn);
  if (i < 0 || nth < 1 || error == 0) return -1;
  g.faults[i].push_back(Fault{nth, error});
  return 0;
}

__attribute__((visibility("default"))) int fakecuda_inject_fault_any(int nth, int error) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (nth < 1 || error == 0) return -1;
  g.any_faults.push_back(Fault{nth, error});
  return 0;
}

__attribute__((visibility("default"))) void fakecuda_clear_faults(void) {
  std::lock_guard<std::mutex> lk(g_mu);
  for (auto& f : g.faults) f.clear();
  g.any_faults.clear();
  g.corruptions.clear();
}

// The nth call (from now) of copy entry point `fn` goes wrong when it executes, as `kind` says (Corruption).
__attribute__((visibility("default"))) int fakecuda_corrupt_copy(const char* fn, int nth, int kind) {
  std::lock_guard<std::mutex> lk(g_mu);
  const int i = fn_index(fn);
  if (i < 0 || nth < 1 || kind < 1 || kind > 3) return -1;
  const std::string name = kFnNames[i];
  if (name.find("cuMemcpyHtoD") != 0 && name.find("cuMemcpyDtoH") != 0) return -1;
  g.corruptions.push_back(CopyCorruption{i, nth, Corruption(kind)});
  return 0;
}

__attribute__((visibility("default"))) uint64_t fakecuda_kernels_run(void) {
  std::lock_guard<std::mutex> lk(g_mu);
  return g.kernels_run;
}

// Calls in this thread stop (on > 0) or resume (on == 0) counting: nestable.
__attribute__((visibility("default"))) void fakecuda_harness_scope(int on) {
  if (on)
    ++t_harness;
  else if (t_harness > 0)
    --t_harness;
}

__attribute__((visibility("default"))) size_t fakecuda_call_log(int* out, size_t n) {
  std::lock_guard<std::mutex> lk(g_mu);
  size_t k = std::min(n, g.call_log.size());
  for (size_t i = 0; i < k && out; ++i) out[i] = g.call_log[i];
  return g.call_log.size();
}

__attribute__((visibility("default"))) const char* fakecuda_entry_point_name(int fn) {
  return fn >= 0 && fn < FN_COUNT ? kFnNames[fn] : nullptr;
}

__attribute__((visibility("default"))) size_t fakecuda_used_bytes(int dev) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (dev < 0 || dev >= g.ndev) return 0;
  return g.dev[dev].used;
}

__attribute__((visibility("default"))) size_t fakecuda_free_bytes(int dev) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (dev < 0 || dev >= g.ndev) return 0;
  return device_free(dev);
}

__attribute__((visibility("default"))) uint64_t fakecuda_call_count(const char* fn) {
  std::lock_guard<std::mutex> lk(g_mu);
  int i = fn_index(fn);
  return i < 0 ? UINT64_MAX : g.calls[i];
}

__attribute__((visibility("default"))) uint64_t fakecuda_total_call_count(void) {
  std::lock_guard<std::mutex> lk(g_mu);
  uint64_t t = 0;
  for (auto c : g.calls) t += c;
  return t;
}

__attribute__((visibility("default"))) void fakecuda_reset_call_counts(void) {
  std::lock_guard<std::mutex> lk(g_mu);
  for (auto& c : g.calls) c = 0;
  g.call_log.clear();
  for (int i = 0; i < kMaxDevices; ++i) g.dev[i].retain_calls = 0;
}

__attribute__((visibility("default"))) uint64_t fakecuda_pageable_copy_count(void) {
  std::lock_guard<std::mutex> lk(g_mu);
  return g.pageable_async;
}

__attribute__((visibility("default"))) uint64_t fakecuda_pageable_sync_copy_count(void) {
  std::lock_guard<std::mutex> lk(g_mu);
  return g.pageable_sync;
}

// The live pinned host ranges, ascending: out[3i] = base, out[3i + 1] = size, out[3i + 2] = 1 for a
// cuMemHostRegister registration (0: cuMemHostAlloc). Fills at most n ranges; returns how many there are.
__attribute__((visibility("default"))) size_t fakecuda_host_ranges(uint64_t* out, size_t n) {
  std::lock_guard<std::mutex> lk(g_mu);
  size_t i = 0;
  for (const auto& [base, pinned] : g.pinned) {
    if (i < n && out != nullptr) {
      out[3 * i] = base;
      out[3 * i + 1] = pinned.size;
      out[3 * i + 2] = pinned.registered ? 1 : 0;
    }
    ++i;
  }
  return i;
}

// Copies refused because their host range spans two separate pinned ranges (section 8b), since reset.
__attribute__((visibility("default"))) uint64_t fakecuda_spanning_copy_count(void) {
  std::lock_guard<std::mutex> lk(g_mu);
  return g.spanning_copies;
}

__attribute__((visibility("default"))) int fakecuda_violation_count(void) {
  std::lock_guard<std::mutex> lk(g_mu);
  return int(g.violations.size());
}

__attribute__((visibility("default"))) int fakecuda_violation(int i, char* buf, size_t n) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (i < 0 || size_t(i) >= g.violations.size() || !buf || !n) return -1;
  std::snprintf(buf, n, "%s", g.violations[i].c_str());
  return int(g.violations[i].size());
}

__attribute__((visibility("default"))) void fakecuda_clear_violations(void) {
  std::lock_guard<std::mutex> lk(g_mu);
  g.violations.clear();
}

__attribute__((visibility("default"))) int fakecuda_live_objects(char* buf, size_t n) {
  std::lock_guard<std::mutex> lk(g_mu);
  int total = 0;
  std::string s = live_summary(&total);
  if (buf && n) std::snprintf(buf, n, "%s", s.c_str());
  return total;
}

__attribute__((visibility("default"))) int fakecuda_pending_ops(void) {
  std::lock_guard<std::mutex> lk(g_mu);
  return int(g.ops.size());
}

__attribute__((visibility("default"))) int fakecuda_stall_stream(uint64_t handle, int stalled) {
  std::lock_guard<std::mutex> lk(g_mu);
  for (auto& kv : g.streams) {
    if (reinterpret_cast<uint64_t>(stream_handle(kv.first)) != handle) continue;
    kv.second.stalled = stalled != 0;
    g_stall_cv.notify_all();
    return 0;
  }
  return -1;
}

// The nth op (from now) that entry point `fn` enqueues stalls its stream, as if that op never finished (a hung
// DMA, a kernel waiting for a dead peer): the stream of a copy engine nobody outside can name.
__attribute__((visibility("default"))) int fakecuda_stall_on_call(const char* fn, int nth) {
  std::lock_guard<std::mutex> lk(g_mu);
  const int i = fn_index(fn);
  if (i < 0 || nth < 1) return -1;
  g.stall_on[i].push_back(nth);
  ++g.stalls_armed;
  return 0;
}

// Releases every stalled stream and disarms fakecuda_stall_on_call; returns how many streams were stalled.
__attribute__((visibility("default"))) int fakecuda_release_stalls(void) {
  std::lock_guard<std::mutex> lk(g_mu);
  int released = 0;
  for (auto& kv : g.streams) {
    released += kv.second.stalled ? 1 : 0;
    kv.second.stalled = false;
  }
  for (auto& armed : g.stall_on) armed.clear();
  g.stalls_armed = 0;
  g_stall_cv.notify_all();
  return released;
}

__attribute__((visibility("default"))) void fakecuda_set_hang_limit_ms(long ms) {
  std::lock_guard<std::mutex> lk(g_mu);
  g_hang_limit_ms = ms;
}

__attribute__((visibility("default"))) int fakecuda_progress(int max_ops) {
  std::lock_guard<std::mutex> lk(g_mu);
  return progress(max_ops);
}

__attribute__((visibility("default"))) int fakecuda_sticky_error(int dev) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (dev < 0 || dev >= kMaxDevices) return -1;
  return int(g_ctx[dev].sticky);
}

__attribute__((visibility("default"))) int fakecuda_primary_ctx_retain_count(int dev) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (dev < 0 || dev >= kMaxDevices) return -1;
  return g_ctx[dev].retain;
}

__attribute__((visibility("default"))) int fakecuda_primary_ctx_harness_retain_count(int dev) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (dev < 0 || dev >= kMaxDevices) return -1;
  return g_ctx[dev].harness_retain;
}

__attribute__((visibility("default"))) int64_t fakecuda_primary_ctx_retain_calls(int dev) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (dev < 0 || dev >= kMaxDevices) return -1;
  return int64_t(g.dev[dev].retain_calls);
}

__attribute__((visibility("default"))) int fakecuda_set_peer_access(int dev, int peer, int on) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (dev < 0 || dev >= g.ndev || peer < 0 || peer >= g.ndev) return -1;
  g.peer[dev][peer] = on != 0;
  return 0;
}

__attribute__((visibility("default"))) int fakecuda_set_rdma_vmm_supported(int dev, int on) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (dev < 0 || dev >= g.ndev) return -1;
  g.dev[dev].rdma_vmm = on != 0;
  return 0;
}

// CU_DEVICE_ATTRIBUTE_HOST_REGISTER_SUPPORTED; 0: cuMemHostRegister on the device's context is NOT_SUPPORTED.
__attribute__((visibility("default"))) int fakecuda_set_host_register_supported(int dev, int on) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (dev < 0 || dev >= g.ndev) return -1;
  g.dev[dev].host_register = on != 0;
  return 0;
}

// node >= 0: the nearest host NUMA node; -1: no NUMA; kHostNumaUnsupported: an
// older driver that does not know the attribute (INVALID_VALUE).
// What the JIT accepts until the next configure: PTX ISA up to max_ptx (major*10 + minor) and targets up to
// sm_<device_sm>. A module beyond them is refused with the driver's code and a JIT log (cuModuleLoadDataEx).
__attribute__((visibility("default"))) int fakecuda_set_jit_limits(int max_ptx, int device_sm) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (max_ptx < 10 || device_sm < 10) return -1;
  g.jit_max_ptx = max_ptx;
  g.jit_device_sm = device_sm;
  return 0;
}

__attribute__((visibility("default"))) int fakecuda_set_host_numa_id(int dev, int node) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (dev < 0 || dev >= g.ndev || (node < -1 && node != kHostNumaUnsupported)) return -1;
  g.dev[dev].host_numa_id = node;
  return 0;
}

// 1 / 0: the physical memory (a handle, or mapped at a device address) was / was
// not created with gpuDirectRDMACapable; -1: neither a live handle nor mapped.
__attribute__((visibility("default"))) int fakecuda_rdma_capable(uint64_t handle_or_address) {
  std::lock_guard<std::mutex> lk(g_mu);
  auto h = g.handles.find(handle_or_address);
  if (h != g.handles.end()) return h->second.rdma ? 1 : 0;
  const Mapping* m = mapping_at(uintptr_t(handle_or_address), nullptr);
  if (!m) return -1;
  h = g.handles.find(m->handle);
  return h == g.handles.end() ? -1 : (h->second.rdma ? 1 : 0);
}

__attribute__((visibility("default"))) void fakecuda_set_honor_address_hints(int on) {
  std::lock_guard<std::mutex> lk(g_mu);
  g.honor_hints = on != 0;
}

__attribute__((visibility("default"))) void fakecuda_set_abort_on_violation(int on) {
  std::lock_guard<std::mutex> lk(g_mu);
  g.abort_on_violation = on != 0;
}

__attribute__((visibility("default"))) void fakecuda_set_race_detection(int on) {
  std::lock_guard<std::mutex> lk(g_mu);
  g.race_detection = on != 0;
}

}  // extern "C"
