//! The backend the binaries (`melora`, `melora-bench`) and examples run on,
//! chosen by this crate's cargo features: `cuda` first, then `wgpu`, then
//! `ndarray` (the default); and [`tune_process`], the process set-up they
//! do first thing in `main`. The library itself is generic over
//! `B: Backend` and uses none of this.

#[cfg(feature = "cuda")]
mod chosen {
    /// The inference backend.
    pub type Inner = burn::backend::Cuda<f32, i32>;
    /// Its name, for messages.
    pub const NAME: &str = "cuda";
    /// The same backend in bf16 (`melora-bench step --dtype`).
    #[allow(dead_code)]
    pub type Bf16 = burn::backend::Cuda<burn::tensor::bf16, i32>;
    /// The same backend in f16.
    #[allow(dead_code)]
    pub type F16 = burn::backend::Cuda<burn::tensor::f16, i32>;
}

#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
mod chosen {
    /// The inference backend.
    pub type Inner = burn::backend::Wgpu<f32, i32>;
    /// Its name, for messages.
    pub const NAME: &str = "wgpu";
    /// The same backend in f16 (WGSL has f16 but no bf16).
    #[allow(dead_code)]
    pub type F16 = burn::backend::Wgpu<burn::tensor::f16, i32>;
}

#[cfg(all(feature = "ndarray", not(any(feature = "cuda", feature = "wgpu"))))]
mod chosen {
    /// The inference backend.
    pub type Inner = burn::backend::NdArray<f32>;
    /// Its name, for messages.
    pub const NAME: &str = "ndarray (CPU)";
}

#[cfg(not(any(feature = "ndarray", feature = "cuda", feature = "wgpu")))]
compile_error!("enable one backend feature: ndarray (default), cuda or wgpu");

#[cfg(feature = "cuda")]
#[allow(unused_imports)]
pub use chosen::Bf16;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
#[allow(unused_imports)]
pub use chosen::F16;
pub use chosen::{Inner, NAME};

/// The training backend.
#[allow(dead_code)]
pub type Train = burn::backend::Autodiff<Inner>;

/// The default device of the chosen backend.
#[allow(dead_code)]
pub fn device() -> <Inner as burn::tensor::backend::BackendTypes>::Device {
    Default::default()
}

/// Process settings for a binary; call it first thing in `main`, before
/// any other thread exists (it sets an environment variable and glibc's
/// allocator parameters, which only a process may decide).
///
/// - On the CPU backend, matrixmultiply (the GEMM under Burn's ndarray
///   backend and under melora-kernels' products) runs single-threaded
///   (`MATMUL_NUM_THREADS=1`, unless that variable is set already: it packs
///   one operand on the calling thread while its other threads wait), and
///   melora-kernels splits each product into one block per rayon thread
///   instead ([`melora_kernels::split_products`]): 8% less time over the
///   SmolLM2 step's GEMM shapes on 2 cores
///   (`experiments/results/compare-cpu.md`).
/// - glibc keeps freed memory for reuse instead of handing it back to the
///   kernel. The CPU backend allocates a fresh buffer for every tensor
///   operation; with glibc's defaults, buffers of a few MiB were unmapped or
///   trimmed after each use and the next allocation paid for page faults and
///   zeroed pages: a SmolLM2 training step took 5.1 s with the defaults and
///   4.0 s with these settings, at the same peak memory. Nothing off glibc.
#[allow(dead_code)]
pub fn tune_process() {
    #[cfg(all(feature = "ndarray", not(any(feature = "cuda", feature = "wgpu"))))]
    {
        if std::env::var_os("MATMUL_NUM_THREADS").is_none() {
            std::env::set_var("MATMUL_NUM_THREADS", "1");
        }
        melora_kernels::split_products(std::env::var("MATMUL_NUM_THREADS").is_ok_and(|v| v.trim() == "1"));
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; called before any
    // other thread exists.
    unsafe {
        // Allocations up to 32 MiB (glibc's maximum) come from the heap, not
        // from fresh mappings; up to 1 GiB of free heap is kept.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
