//! Links `libtorch.so` eagerly into the `lavit` binary. Nothing in tch references a
//! symbol of it, so `--as-needed` would drop it and CUDA kernels would never
//! register (see shared/GPU.md): `tch::Cuda::is_available()` would stay false.
fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg-bins=-ltorch");
    println!("cargo:rustc-link-arg-bins=-Wl,--as-needed");
    println!("cargo:rerun-if-changed=build.rs");
}
