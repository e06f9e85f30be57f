//! The backend the binaries run on, chosen by cargo feature: `cuda` first,
//! then `wgpu`, then `ndarray` (the default).

#[cfg(feature = "cuda")]
mod chosen {
    /// The inference backend.
    pub type Inner = burn::backend::Cuda<f32, i32>;
    /// Its name, for messages.
    pub const NAME: &str = "cuda";
    /// The same backend in bf16 and f16 (GPU training is done in half precision).
    #[allow(dead_code)]
    pub type Bf16 = burn::backend::Cuda<burn::tensor::bf16, i32>;
    #[allow(dead_code)]
    pub type F16 = burn::backend::Cuda<burn::tensor::f16, i32>;
}

#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
mod chosen {
    pub type Inner = burn::backend::Wgpu<f32, i32>;
    pub const NAME: &str = "wgpu";
    /// WGSL has f16 but no bf16.
    #[allow(dead_code)]
    pub type F16 = burn::backend::Wgpu<burn::tensor::f16, i32>;
}

#[cfg(all(feature = "ndarray", not(any(feature = "cuda", feature = "wgpu"))))]
mod chosen {
    pub type Inner = burn::backend::NdArray<f32>;
    pub const NAME: &str = "ndarray (CPU)";
}

#[cfg(not(any(feature = "ndarray", feature = "cuda", feature = "wgpu")))]
compile_error!("enable one backend feature: ndarray (default), cuda or wgpu");

pub use chosen::{Inner, NAME};
#[cfg(feature = "cuda")]
#[allow(unused_imports)]
pub use chosen::Bf16;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
#[allow(unused_imports)]
pub use chosen::F16;

/// The training backend.
#[allow(dead_code)]
pub type Train = burn::backend::Autodiff<Inner>;

/// The default device of the chosen backend.
#[allow(dead_code)]
pub fn device() -> <Inner as burn::tensor::backend::BackendTypes>::Device {
    Default::default()
}
