//! Captures, at build time, the versions a plugin declaration carries:
//! - the rustc that compiles this crate (which is the rustc that compiles the plugin or the
//!   host linking it: one cargo invocation uses one compiler), from `$RUSTC -V`;
//! - the libtorch version, from the headers of the libtorch torch-sys links against.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTC");

    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let rustc_version = Command::new(&rustc)
        .arg("-V")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| panic!("lavit-plugin-api build: `{rustc} -V` failed"));
    println!("cargo:rustc-env=LAVIT_PLUGIN_RUSTC_VERSION={rustc_version}");

    let torch_version = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .ok()
        .and_then(|lib| torch_version_from_headers(&PathBuf::from(lib)))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=LAVIT_PLUGIN_TORCH_VERSION={torch_version}");
}

/// `<libtorch>/lib` → `<libtorch>/include/torch/{headeronly,csrc/api/include/torch}/version.h`
/// → "MAJOR.MINOR.PATCH".
fn torch_version_from_headers(lib_dir: &Path) -> Option<String> {
    let root = lib_dir.parent()?;
    let candidates = [
        root.join("include/torch/headeronly/version.h"),
        root.join("include/torch/csrc/api/include/torch/version.h"),
    ];
    for header in candidates {
        let Ok(text) = std::fs::read_to_string(&header) else {
            continue;
        };
        println!("cargo:rerun-if-changed={}", header.display());
        let field = |name: &str| {
            text.lines().find_map(|l| {
                let rest = l.trim().strip_prefix("#define ")?.strip_prefix(name)?;
                rest.trim().parse::<u32>().ok()
            })
        };
        if let (Some(a), Some(b), Some(c)) = (
            field("TORCH_VERSION_MAJOR"),
            field("TORCH_VERSION_MINOR"),
            field("TORCH_VERSION_PATCH"),
        ) {
            return Some(format!("{a}.{b}.{c}"));
        }
    }
    None
}
