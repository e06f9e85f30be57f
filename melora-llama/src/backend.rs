//! The backend the binaries run on, chosen by cargo feature: `cuda` first,
//! then `wgpu`, then `ndarray` (the default).

#[cfg(feature = "cuda")]
mod chosen {
    /// The inference backend.
    pub type Inner = burn::backend::Cuda<f32, i32>;
    /// Its name, for messages.
    pub const NAME: &str = "cuda";
}

#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
mod chosen {
    pub type Inner = burn::backend::Wgpu<f32, i32>;
    pub const NAME: &str = "wgpu";
}

#[cfg(all(feature = "ndarray", not(any(feature = "cuda", feature = "wgpu"))))]
mod chosen {
    pub type Inner = burn::backend::NdArray<f32>;
    pub const NAME: &str = "ndarray (CPU)";
}

#[cfg(not(any(feature = "ndarray", feature = "cuda", feature = "wgpu")))]
compile_error!("enable one backend feature: ndarray (default), cuda or wgpu");

pub use chosen::{Inner, NAME};

/// The training backend.
#[allow(dead_code)]
pub type Train = burn::backend::Autodiff<Inner>;

/// The default device of the chosen backend.
pub fn device() -> <Inner as burn::tensor::backend::BackendTypes>::Device {
    Default::default()
}
