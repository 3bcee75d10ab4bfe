// lavit-runtime's bridge to PyTorch's c10d (the collective library behind
// torch.distributed): a TCPStore for rendezvous, ProcessGroupGloo (CPU) and, with
// the `nccl` cargo feature, ProcessGroupNCCL (CUDA), and the three collectives the
// data-parallel trainer needs: allreduce (sum), broadcast, barrier.
//
// Contract with Rust (runtime/src/dist/ffi.rs):
//  - every function is `extern "C"` and noexcept: a C++ exception is caught here
//    and returned as a malloc'd, NUL-terminated message (free it with
//    lvd_free); NULL means success. Nothing unwinds into Rust.
//  - tensors are passed as `at::Tensor*` (what tch's `Tensor::as_mut_ptr()` gives);
//    collectives work in place on their storage.
//  - handles are heap boxes of c10::intrusive_ptr, freed by the matching *_free.
//
// Only the libtorch symbols are used; no inline gloo code is instantiated here
// (the gloo headers are needed because ProcessGroupGloo.hpp includes them).

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef LAVIT_DIST_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace {

struct Store {
  c10::intrusive_ptr<c10d::Store> ptr;
};

struct Group {
  c10::intrusive_ptr<c10d::Backend> ptr;
};

char* dup_message(const std::string& msg) {
  char* out = static_cast<char*>(std::malloc(msg.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, msg.data(), msg.size());
    out[msg.size()] = '\0';
  }
  return out;
}

// Runs `body`; any exception becomes the returned message.
template <typename F>
char* guarded(const char* what, F&& body) noexcept {
  try {
    body();
    return nullptr;
  } catch (const c10::Error& e) {
    // what_without_backtrace: the message without libtorch's C++ stack dump.
    return dup_message(std::string(what) + ": " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    return dup_message(std::string(what) + ": " + e.what());
  } catch (...) {
    return dup_message(std::string(what) + ": unknown C++ exception");
  }
}

std::chrono::milliseconds ms(int64_t v) {
  return std::chrono::milliseconds(v);
}

// Waits for `work` at most `timeout_ms`; a work that fails rethrows its error.
void wait_for(const c10::intrusive_ptr<c10d::Work>& work, int64_t timeout_ms) {
  if (!work->wait(ms(timeout_ms))) {
    throw std::runtime_error("timed out after " + std::to_string(timeout_ms) + " ms");
  }
}

}  // namespace

extern "C" {

// Frees an error message or a value returned by lvd_store_get.
void lvd_free(void* p) noexcept { std::free(p); }

// A TCPStore at host:port. The server (rank 0, unless the launcher's agent hosts the
// store) listens and, with wait_workers, blocks until world_size clients joined; a
// client retries connecting until the timeout.
char* lvd_store_tcp(const char* host, uint16_t port, int is_server, int64_t world_size,
                    int wait_workers, int64_t timeout_ms, void** out) noexcept {
  *out = nullptr;
  return guarded("TCPStore", [&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server != 0;
    opts.numWorkers = static_cast<std::size_t>(world_size);
    opts.waitWorkers = wait_workers != 0;
    opts.timeout = ms(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    *out = new Store{std::move(store)};
  });
}

// A view of `base` whose keys all start with `prefix/`.
char* lvd_store_prefix(void* base, const char* prefix, void** out) noexcept {
  *out = nullptr;
  return guarded("PrefixStore", [&] {
    auto* b = static_cast<Store*>(base);
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), b->ptr);
    *out = new Store{std::move(store)};
  });
}

char* lvd_store_set(void* store, const char* key, const uint8_t* data, size_t len) noexcept {
  return guarded("store set", [&] {
    std::vector<uint8_t> value(data, data + len);
    static_cast<Store*>(store)->ptr->set(std::string(key), value);
  });
}

// Blocks until `key` exists (at most the store's timeout); the value is malloc'd into
// *data (free with lvd_free) and its length written to *len.
char* lvd_store_get(void* store, const char* key, uint8_t** data, size_t* len) noexcept {
  *data = nullptr;
  *len = 0;
  return guarded("store get", [&] {
    std::vector<uint8_t> value = static_cast<Store*>(store)->ptr->get(std::string(key));
    auto* buf = static_cast<uint8_t*>(std::malloc(value.empty() ? 1 : value.size()));
    if (buf == nullptr) throw std::bad_alloc();
    if (!value.empty()) std::memcpy(buf, value.data(), value.size());
    *data = buf;
    *len = value.size();
  });
}

void lvd_store_free(void* store) noexcept {
  try {
    delete static_cast<Store*>(store);
  } catch (...) {
  }
}

// ProcessGroupGloo over `store`. The transport device binds to the network interface
// `iface` when given (GLOO_SOCKET_IFNAME), else to the address of `hostname` when
// given, else to this machine's hostname address (falling back to loopback), as
// torch.distributed does.
char* lvd_pg_gloo(void* store, int rank, int size, const char* iface, const char* hostname,
                  int64_t timeout_ms, void** out) noexcept {
  *out = nullptr;
  return guarded("ProcessGroupGloo", [&] {
    auto opts = c10d::ProcessGroupGloo::Options::create(ms(timeout_ms));
    if (iface != nullptr && iface[0] != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
    } else if (hostname != nullptr && hostname[0] != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(hostname));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto* s = static_cast<Store*>(store);
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(s->ptr, rank, size, opts);
    *out = new Group{c10::static_intrusive_pointer_cast<c10d::Backend>(pg)};
  });
}

// 1 when this library was built with ProcessGroupNCCL (the `nccl` cargo feature).
int lvd_has_nccl() noexcept {
#ifdef LAVIT_DIST_NCCL
  return 1;
#else
  return 0;
#endif
}

char* lvd_pg_nccl(void* store, int rank, int size, int64_t timeout_ms, void** out) noexcept {
  *out = nullptr;
#ifdef LAVIT_DIST_NCCL
  return guarded("ProcessGroupNCCL", [&] {
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = ms(timeout_ms);
    auto* s = static_cast<Store*>(store);
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(s->ptr, rank, size, opts);
    *out = new Group{c10::static_intrusive_pointer_cast<c10d::Backend>(pg)};
  });
#else
  (void)store;
  (void)rank;
  (void)size;
  (void)timeout_ms;
  return dup_message("ProcessGroupNCCL: lavit-runtime was built without the `nccl` feature");
#endif
}

// In place: tensor = sum (op 0), max (1) or min (2) of `tensor` over all ranks.
char* lvd_pg_allreduce(void* group, void* tensor, int op, int64_t timeout_ms) noexcept {
  return guarded("allreduce", [&] {
    std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
    c10d::AllreduceOptions opts;
    switch (op) {
      case 0: opts.reduceOp = c10d::ReduceOp::SUM; break;
      case 1: opts.reduceOp = c10d::ReduceOp::MAX; break;
      case 2: opts.reduceOp = c10d::ReduceOp::MIN; break;
      default: throw std::invalid_argument("unknown reduce op " + std::to_string(op));
    }
    opts.timeout = ms(timeout_ms);
    wait_for(static_cast<Group*>(group)->ptr->allreduce(tensors, opts), timeout_ms);
  });
}

// In place: every rank's `tensor` gets root's values.
char* lvd_pg_broadcast(void* group, void* tensor, int root, int64_t timeout_ms) noexcept {
  return guarded("broadcast", [&] {
    std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = ms(timeout_ms);
    wait_for(static_cast<Group*>(group)->ptr->broadcast(tensors, opts), timeout_ms);
  });
}

char* lvd_pg_barrier(void* group, int64_t timeout_ms) noexcept {
  return guarded("barrier", [&] {
    c10d::BarrierOptions opts;
    opts.timeout = ms(timeout_ms);
    wait_for(static_cast<Group*>(group)->ptr->barrier(opts), timeout_ms);
  });
}

// tensor.grad = grad (tch has no setter). The DDP helper gives a parameter that this
// rank's loss did not reach a zero gradient when another rank's loss did reach it.
char* lvd_set_grad(void* tensor, void* grad) noexcept {
  return guarded("set grad", [&] {
    static_cast<at::Tensor*>(tensor)->mutable_grad() = *static_cast<at::Tensor*>(grad);
  });
}

void lvd_pg_free(void* group) noexcept {
  try {
    delete static_cast<Group*>(group);
  } catch (...) {
  }
}

}  // extern "C"
