//! Test data: random but valid weight rows for every supported type, and random activations,
//! from a small seeded generator (so tests, benches and the bandwidth example agree without
//! another dependency).

use half::f16;
use quarry_format::GgmlType;

use crate::error::Result;
use crate::gemv::row_bytes;

/// A xorshift64* generator: deterministic, fast, good enough for test data.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Byte offsets of the f16 scale fields in one block of `dtype` (the other bytes of a block
/// are codes or small integer scales, valid whatever their value).
fn f16_fields(dtype: GgmlType) -> &'static [usize] {
    match dtype {
        GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => &[],
    }
}

/// `rows × cols` values of `dtype` as file bytes: random codes with finite, normal f16
/// scales of magnitude ~1/16 (F32/F16: values in [-1, 1)).
pub fn random_weights(dtype: GgmlType, rows: usize, cols: usize, seed: u64) -> Result<Vec<u8>> {
    let rb = row_bytes(dtype, cols)?;
    let mut rng = Rng::new(seed);
    let n = rows * cols;
    Ok(match dtype {
        GgmlType::F32 => (0..n).flat_map(|_| rng.unit().to_le_bytes()).collect(),
        GgmlType::F16 => (0..n)
            .flat_map(|_| f16::from_f32(rng.unit()).to_le_bytes())
            .collect(),
        _ => {
            let mut bytes: Vec<u8> = (0..rows * rb).map(|_| rng.next_u64() as u8).collect();
            let ts = dtype.type_size();
            for block in bytes.chunks_exact_mut(ts) {
                for &off in f16_fields(dtype) {
                    let v = (0.02 + 0.08 * rng.unit().abs())
                        * if rng.unit() < 0.0 { -1.0 } else { 1.0 };
                    block[off..off + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
                }
            }
            bytes
        }
    })
}

/// `n` activations in [-1, 1).
pub fn random_activations(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed ^ 0xA5A5_5A5A);
    (0..n).map(|_| rng.unit()).collect()
}
