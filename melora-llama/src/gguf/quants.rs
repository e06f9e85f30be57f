//! GGML's element types and block formats, dequantised to f32 as
//! llama.cpp's reference dequantisers do (`ggml/src/ggml-quants.c`,
//! `dequantize_row_*`; the layouts of `ggml/src/ggml-common.h`), value for
//! value and in the same order of floating-point operations.
//!
//! Tests: `melora-llama/tests/gguf.rs` against the `gguf` Python package's
//! dequantisers on random blocks (`tests/fixtures/ggml-quants/make.py`).

/// The element types melora dequantises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
    /// Blocks of 32: f16 scale `d`, 16 bytes of nibbles; `d (q - 8)`.
    Q4_0,
    /// Blocks of 32: f16 `d` and `m`, 16 bytes of nibbles; `d q + m`.
    Q4_1,
    /// Blocks of 32: f16 `d`, the fifth bits (u32), 16 bytes of nibbles;
    /// `d (q - 16)`.
    Q5_0,
    /// Blocks of 32: f16 `d` and `m`, the fifth bits, the nibbles; `d q + m`.
    Q5_1,
    /// Blocks of 32: f16 `d`, 32 x i8; `d q`.
    Q8_0,
    /// Super-blocks of 256 in 8 sub-blocks of 32, each with a 6-bit scale
    /// and min (12 packed bytes) under f16 `d` and `dmin`; 4-bit quants;
    /// `d sc q - dmin m`.
    Q4K,
    /// As [`GgmlType::Q4K`] with a fifth bit per value (32 bytes).
    Q5K,
    /// Super-blocks of 256 in 16 sub-blocks of 16 with i8 scales under an
    /// f16 `d`; 6-bit quants (4 low bits, 2 high); `d sc (q - 32)`.
    Q6K,
}

/// GGML's type names by id (`ggml_type` in `ggml.h`), for messages.
const NAMES: [&str; 31] = [
    "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
    "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32",
    "I64", "F64", "IQ1_M", "BF16",
];

impl GgmlType {
    /// Every type melora dequantises.
    pub const ALL: [GgmlType; 11] = [
        Self::F32,
        Self::F16,
        Self::Bf16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
    ];

    /// The type for a GGML type id, or `None` if melora does not
    /// dequantise it.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// The GGML type id.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::Bf16 => 30,
        }
    }

    /// GGML's name of the type id `id` (`Q4_K`), or `"unknown"`.
    pub fn name_of(id: u32) -> &'static str {
        NAMES.get(id as usize).copied().unwrap_or("unknown")
    }

    /// GGML's name (`Q4_K`).
    pub fn name(self) -> &'static str {
        Self::name_of(self.id())
    }

    /// The names of every type melora dequantises, for messages.
    pub fn supported() -> String {
        Self::ALL.map(Self::name).join(", ")
    }

    /// (values per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::Bf16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
        }
    }

    /// Appends the values of `data`, whole blocks of this type, to `out`.
    pub fn dequantize(self, data: &[u8], out: &mut Vec<f32>) {
        let (_, size) = self.block();
        let blocks = data.chunks_exact(size);
        match self {
            Self::F32 => out.extend(blocks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
            Self::F16 => out.extend(blocks.map(f16)),
            Self::Bf16 => out.extend(blocks.map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())),
            Self::Q4_0 => blocks.for_each(|b| q4_0(b, out)),
            Self::Q4_1 => blocks.for_each(|b| q4_1(b, out)),
            Self::Q5_0 => blocks.for_each(|b| q5(b, None, out)),
            Self::Q5_1 => blocks.for_each(|b| q5(b, Some(f16(&b[2..4])), out)),
            Self::Q8_0 => blocks.for_each(|b| {
                let d = f16(b);
                out.extend(b[2..].iter().map(|&q| (q as i8) as f32 * d));
            }),
            Self::Q4K => blocks.for_each(|b| q45_k(b, None, out)),
            Self::Q5K => blocks.for_each(|b| q45_k(b, Some(&b[16..48]), out)),
            Self::Q6K => blocks.for_each(|b| q6_k(b, out)),
        }
    }
}

/// The f16 in the first two bytes of `b`.
fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Q4_0: the low nibbles are the first 16 values, the high ones the rest.
fn q4_0(b: &[u8], out: &mut Vec<f32>) {
    let (d, q) = (f16(b), &b[2..18]);
    out.extend(q.iter().map(|v| ((v & 0x0f) as i32 - 8) as f32 * d));
    out.extend(q.iter().map(|v| ((v >> 4) as i32 - 8) as f32 * d));
}

/// Q4_1.
fn q4_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m, q) = (f16(b), f16(&b[2..4]), &b[4..20]);
    out.extend(q.iter().map(|v| (v & 0x0f) as f32 * d + m));
    out.extend(q.iter().map(|v| (v >> 4) as f32 * d + m));
}

/// Q5_0 (`min` none: `d (q - 16)`) and Q5_1 (`d q + m`): bit `j` of the
/// u32 `qh` is value `j`'s fifth bit.
fn q5(b: &[u8], min: Option<f32>, out: &mut Vec<f32>) {
    let d = f16(b);
    let at = if min.is_some() { 4 } else { 2 };
    let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let qs = &b[at + 4..at + 20];
    let value = |q: u32| match min {
        None => (q as i32 - 16) as f32 * d,
        Some(m) => q as f32 * d + m,
    };
    out.extend((0..16).map(|j| value((qs[j] & 0x0f) as u32 | (((qh >> j) << 4) & 0x10))));
    out.extend((0..16).map(|j| value((qs[j] >> 4) as u32 | ((qh >> (j + 12)) & 0x10))));
}

/// Sub-block `j`'s 6-bit scale and min from the 12 packed bytes
/// (`get_scale_min_k4`).
fn scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K, and Q5_K with `qh`, its fifth bits: each 64 values are two
/// sub-blocks of 32, the low and the high nibbles of 32 bytes.
fn q45_k(b: &[u8], qh: Option<&[u8]>, out: &mut Vec<f32>) {
    let (d, dmin, scales) = (f16(b), f16(&b[2..4]), &b[4..16]);
    let qs = if qh.is_some() { &b[48..176] } else { &b[16..144] };
    for (k, ql) in qs.chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min(2 * k, scales);
        let (sc2, m2) = scale_min(2 * k + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * k), 2u8 << (2 * k));
        let high = |l: usize, u: u8| qh.map_or(0, |h| if h[l] & u != 0 { 16 } else { 0 });
        out.extend((0..32).map(|l| d1 * ((ql[l] & 0x0f) + high(l, u1)) as f32 - m1));
        out.extend((0..32).map(|l| d2 * ((ql[l] >> 4) + high(l, u2)) as f32 - m2));
    }
}

/// Q6_K: each 128 values take 64 bytes of low nibbles, 32 of high bit
/// pairs and 8 scales.
fn q6_k(b: &[u8], out: &mut Vec<f32>) {
    let (ql, qh, scales, d) = (&b[0..128], &b[128..192], &b[192..208], f16(&b[208..210]));
    for n in 0..2 {
        let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &scales[8 * n..]);
        let mut y = [0f32; 128];
        for l in 0..32 {
            let is = l / 16;
            let q = |low: u8, shift: u32| ((low | (((qh[l] >> shift) & 3) << 4)) as i8 - 32) as f32;
            let scale = |k: usize| d * (sc[is + k] as i8) as f32;
            y[l] = scale(0) * q(ql[l] & 0x0f, 0);
            y[l + 32] = scale(2) * q(ql[l + 32] & 0x0f, 2);
            y[l + 64] = scale(4) * q(ql[l] >> 4, 4);
            y[l + 96] = scale(6) * q(ql[l + 32] >> 4, 6);
        }
        out.extend(y);
    }
}
