//! Compiles the c10d shim (`cpp/dist_shim.cpp`, see `src/dist/`) against the libtorch headers
//! the `tch` bindings use, with the same settings as torch-sys: `LIBTORCH` (set by
//! `.cargo/config.toml` to the venv's wheel), optional `LIBTORCH_INCLUDE` / `LIBTORCH_LIB`
//! overrides, and `LIBTORCH_CXX11_ABI` (default 1, as torch-sys; the 2.11 wheel is built
//! with the new ABI). Gloo's headers come from `LAVIT_GLOO_INCLUDE`, else `.gloo/usr/include`
//! (unpacked from Debian's libgloo-dev by `scripts/setup.sh`), else `/usr/include`.
//! With the `nccl` feature, ProcessGroupNCCL is compiled in too (CUDA and NCCL headers from
//! the wheel's `nvidia/` packages, or `CUDA_HOME`/`NCCL_INCLUDE`).
use std::env;
use std::path::{Path, PathBuf};

fn var(name: &str) -> Option<String> {
    println!("cargo:rerun-if-env-changed={name}");
    env::var(name).ok().filter(|v| !v.is_empty())
}

fn fail(msg: String) -> ! {
    // A build script error: cargo prints it under "failed to run custom build command".
    eprintln!("error: {msg}");
    std::process::exit(1);
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=cpp/dist_shim.cpp");
    if env::var("CARGO_FEATURE_DOC_ONLY").is_ok() {
        return;
    }
    let manifest = PathBuf::from(
        env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|e| fail(format!("CARGO_MANIFEST_DIR: {e}"))),
    );
    let root = manifest
        .parent()
        .unwrap_or_else(|| {
            fail(format!(
                "{}: runtime/ has no parent folder (the workspace)",
                manifest.display()
            ))
        })
        .to_path_buf();

    let libtorch = var("LIBTORCH").map(PathBuf::from).unwrap_or_else(|| {
        fail(
            "LIBTORCH is not set (`.cargo/config.toml` points it at .venv; run scripts/setup.sh)"
                .into(),
        )
    });
    let includes = var("LIBTORCH_INCLUDE")
        .map(PathBuf::from)
        .unwrap_or_else(|| libtorch.clone());
    let lib = var("LIBTORCH_LIB")
        .map(PathBuf::from)
        .unwrap_or_else(|| libtorch.clone())
        .join("lib");
    let abi = var("LIBTORCH_CXX11_ABI").unwrap_or_else(|| "1".to_owned());
    let c10d = includes.join("include/torch/csrc/distributed/c10d/ProcessGroupGloo.hpp");
    if !c10d.exists() {
        fail(format!(
            "{} not found: LIBTORCH must be a libtorch with the distributed headers (the PyPI wheel's torch/)",
            c10d.display()
        ));
    }

    let gloo = gloo_include(&root);
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file(manifest.join("cpp/dist_shim.cpp"))
        .include(includes.join("include"))
        .include(includes.join("include/torch/csrc/api/include"))
        .include(&gloo)
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .define("USE_C10D_GLOO", None)
        .define("GLOG_USE_GLOG_EXPORT", None)
        // libtorch's headers are not warning-clean; the shim's own code is small.
        .warnings(false)
        .flag_if_supported("-Wno-unused-parameter");

    let nccl = env::var("CARGO_FEATURE_NCCL").is_ok();
    if nccl {
        build
            .define("LAVIT_DIST_NCCL", None)
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None);
        for dir in cuda_includes(&libtorch) {
            build.include(dir);
        }
    }
    build.compile("lavit_dist_shim");

    // After the static shim, the libtorch libraries defining the c10d symbols (torch-sys
    // links them too; naming them here keeps the order right for the static archive).
    println!("cargo:rustc-link-search=native={}", lib.display());
    if nccl {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=stdc++");
}

/// The folder holding `gloo/` headers.
fn gloo_include(root: &Path) -> PathBuf {
    let candidates: Vec<PathBuf> = var("LAVIT_GLOO_INCLUDE")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            root.join(".gloo/usr/include"),
            PathBuf::from("/usr/include"),
        ])
        .collect();
    for dir in &candidates {
        let probe = dir.join("gloo/rendezvous/store.h");
        println!("cargo:rerun-if-changed={}", probe.display());
        if probe.exists() {
            return dir.clone();
        }
    }
    fail(format!(
        "gloo headers not found (looked for gloo/rendezvous/store.h in {}): run `bash scripts/setup.sh` \
         (it unpacks Debian's libgloo-dev into .gloo/) or set LAVIT_GLOO_INCLUDE",
        candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// CUDA runtime and NCCL header folders for the `nccl` feature: `CUDA_HOME/include` and
/// `NCCL_INCLUDE` when set, else the wheel's `site-packages/nvidia/*/include` folders.
fn cuda_includes(libtorch: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(home) = var("CUDA_HOME") {
        dirs.push(PathBuf::from(home).join("include"));
    }
    if let Some(nccl) = var("NCCL_INCLUDE") {
        dirs.push(PathBuf::from(nccl));
    }
    if let Some(site) = libtorch.parent() {
        if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
            let mut found: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path().join("include"))
                .filter(|p| p.is_dir())
                .collect();
            found.sort();
            dirs.extend(found);
        }
    }
    let has = |file: &str| dirs.iter().any(|d| d.join(file).exists());
    if !has("cuda_runtime_api.h") || !has("nccl.h") {
        fail(format!(
            "feature `nccl`: cuda_runtime_api.h and nccl.h must be in one of [{}] (set CUDA_HOME / NCCL_INCLUDE)",
            dirs.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    dirs
}
