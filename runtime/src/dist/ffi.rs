//! The `extern "C"` surface of `runtime/cpp/dist_shim.cpp`. Every function returning
//! `*mut c_char` returns NULL on success or a malloc'd message (a caught C++ exception),
//! which [`take_error`] turns into a `String` and frees. Handles are opaque boxes owned by
//! the caller until the matching `*_free`.

use std::ffi::{c_char, c_int, c_void, CStr};

extern "C" {
    pub(crate) fn lvd_free(p: *mut c_void);
    pub(crate) fn lvd_store_tcp(
        host: *const c_char,
        port: u16,
        is_server: c_int,
        world_size: i64,
        wait_workers: c_int,
        timeout_ms: i64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    pub(crate) fn lvd_store_prefix(
        base: *mut c_void,
        prefix: *const c_char,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    pub(crate) fn lvd_store_set(
        store: *mut c_void,
        key: *const c_char,
        data: *const u8,
        len: usize,
    ) -> *mut c_char;
    pub(crate) fn lvd_store_get(
        store: *mut c_void,
        key: *const c_char,
        data: *mut *mut u8,
        len: *mut usize,
    ) -> *mut c_char;
    pub(crate) fn lvd_store_free(store: *mut c_void);
    pub(crate) fn lvd_pg_gloo(
        store: *mut c_void,
        rank: c_int,
        size: c_int,
        iface: *const c_char,
        hostname: *const c_char,
        timeout_ms: i64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    pub(crate) fn lvd_has_nccl() -> c_int;
    pub(crate) fn lvd_pg_nccl(
        store: *mut c_void,
        rank: c_int,
        size: c_int,
        timeout_ms: i64,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    /// `tensor` is an `at::Tensor*` (tch's `Tensor::as_mut_ptr()`); `op`: 0 sum, 1 max, 2 min.
    pub(crate) fn lvd_pg_allreduce(
        group: *mut c_void,
        tensor: *mut c_void,
        op: c_int,
        timeout_ms: i64,
    ) -> *mut c_char;
    pub(crate) fn lvd_pg_broadcast(
        group: *mut c_void,
        tensor: *mut c_void,
        root: c_int,
        timeout_ms: i64,
    ) -> *mut c_char;
    pub(crate) fn lvd_pg_barrier(group: *mut c_void, timeout_ms: i64) -> *mut c_char;
    pub(crate) fn lvd_pg_free(group: *mut c_void);
    /// `tensor.mutable_grad() = grad` for two `at::Tensor*`.
    pub(crate) fn lvd_set_grad(tensor: *mut c_void, grad: *mut c_void) -> *mut c_char;
}

/// NULL → `Ok(())`; a message → `Err(message)`, freeing it.
pub(crate) fn take_error(msg: *mut c_char) -> Result<(), String> {
    if msg.is_null() {
        return Ok(());
    }
    // SAFETY: a non-NULL return of the shim is a NUL-terminated string it malloc'd; we own
    // it and free it exactly once, after copying.
    let text = unsafe { CStr::from_ptr(msg) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: as above; `lvd_free` is `free`.
    unsafe { lvd_free(msg.cast()) };
    Err(text)
}
