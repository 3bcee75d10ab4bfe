//! Links `libtorch.so` eagerly into the `lavit` binary and the bench binaries (which
//! `scripts/gpu-bench.sh` runs on a GPU). Nothing in tch references a symbol of it, so
//! `--as-needed` would drop it and CUDA kernels would never register (see shared/GPU.md):
//! `tch::Cuda::is_available()` would stay false.
fn main() {
    for target in ["bins", "benches"] {
        println!("cargo:rustc-link-arg-{target}=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg-{target}=-ltorch");
        println!("cargo:rustc-link-arg-{target}=-Wl,--as-needed");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
