//! What a run's numbers depend on besides the seed: the CPU, the thread counts and the libtorch
//! build. Recorded in `report/metrics.json` and the HTML report so two runs can be compared.
//!
//! libtorch picks its CPU kernels at run time: ATen's vectorised kernels by the widest
//! instruction set the CPU has (AVX-512 or AVX2, unless `ATEN_CPU_CAPABILITY` caps it), MKL's
//! GEMM by its own dispatch (unless `MKL_CBWR` fixes a code path) and oneDNN's by
//! `ONEDNN_MAX_CPU_ISA`. Different paths sum floats in different orders, so the same seed can
//! give slightly different weights on another CPU, and the differences grow over a training
//! run. The intra-op thread count changes how reductions are split the same way.

use serde::{Deserialize, Serialize};

/// The environment variables that pin libtorch's CPU code paths (recorded with their value,
/// or absent when unset).
pub const PINNING_VARS: [&str; 5] = [
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "ONEDNN_MAX_CPU_ISA",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
];

/// The machine and libtorch build a run used.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct MachineInfo {
    /// CPU model (`/proc/cpuinfo` "model name"; empty when unknown).
    pub cpu_model: String,
    /// Logical cores this process may use.
    pub cores: usize,
    /// SIMD extensions the CPU reports that libtorch's kernels dispatch on (avx2, avx512f, …).
    pub simd: Vec<String>,
    /// libtorch intra-op threads of the stages that run alone (stage 0, evaluation).
    pub torch_threads_alone: i32,
    /// libtorch intra-op threads of each stage that runs beside another.
    pub torch_threads_side_by_side: i32,
    /// libtorch inter-op threads.
    pub torch_interop_threads: i32,
    /// The libtorch version lavit was built against (from the torch-sys build).
    pub libtorch_version: String,
    /// The tch crate version.
    pub tch_version: String,
    /// Backends compiled into libtorch.
    pub has_mkl: bool,
    pub has_mkldnn: bool,
    pub has_openmp: bool,
    pub has_cuda: bool,
    /// [`PINNING_VARS`] that are set, with their values.
    pub pinning_env: Vec<(String, String)>,
    /// Target architecture and OS of the build.
    pub arch: String,
    pub os: String,
}

impl MachineInfo {
    /// Reads the machine now; the thread counts are the ones the caller ran with.
    pub fn detect(threads_alone: i32, threads_side_by_side: i32) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.split(':').next().map(str::trim) == Some(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        };
        let flags = field("flags").unwrap_or_default();
        let simd = [
            "sse4_2",
            "avx",
            "avx2",
            "fma",
            "avx512f",
            "avx512_bf16",
            "amx_tile",
        ]
        .iter()
        .filter(|f| flags.split_whitespace().any(|x| x == **f))
        .map(|f| f.to_string())
        .collect();
        Self {
            cpu_model: field("model name").unwrap_or_default(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            simd,
            torch_threads_alone: threads_alone,
            torch_threads_side_by_side: threads_side_by_side,
            torch_interop_threads: tch::get_num_interop_threads(),
            libtorch_version: lavit_plugin_api::TORCH_VERSION.to_string(),
            tch_version: lavit_plugin_api::TCH_VERSION.to_string(),
            has_mkl: tch::utils::has_mkl(),
            has_mkldnn: tch::utils::has_mkldnn(),
            has_openmp: tch::utils::has_openmp(),
            has_cuda: tch::utils::has_cuda(),
            pinning_env: PINNING_VARS
                .iter()
                .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
                .collect(),
            arch: std::env::consts::ARCH.into(),
            os: std::env::consts::OS.into(),
        }
    }

    /// (label, value) rows for the report.
    pub fn rows(&self) -> Vec<(String, String)> {
        let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
        let env = if self.pinning_env.is_empty() {
            "none set".to_string()
        } else {
            self.pinning_env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        vec![
            ("CPU".into(), self.cpu_model.clone()),
            ("logical cores".into(), self.cores.to_string()),
            ("SIMD".into(), self.simd.join(" ")),
            (
                "libtorch threads (alone / side by side / inter-op)".into(),
                format!(
                    "{} / {} / {}",
                    self.torch_threads_alone,
                    self.torch_threads_side_by_side,
                    self.torch_interop_threads
                ),
            ),
            (
                "libtorch / tch".into(),
                format!("{} / {}", self.libtorch_version, self.tch_version),
            ),
            (
                "MKL / oneDNN / OpenMP / CUDA".into(),
                format!(
                    "{} / {} / {} / {}",
                    yes(self.has_mkl),
                    yes(self.has_mkldnn),
                    yes(self.has_openmp),
                    yes(self.has_cuda)
                ),
            ),
            ("code-path variables".into(), env),
            ("target".into(), format!("{}-{}", self.arch, self.os)),
        ]
    }
}
