//! Random test data shared by the integration tests.

use rand::rngs::StdRng;
use rand::Rng;

/// Normally distributed values (Box–Muller) with standard deviation `sigma`.
pub fn gaussian(rng: &mut StdRng, n: usize, sigma: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u: f32 = rng.gen_range(f32::EPSILON..1.0);
            let v: f32 = rng.gen_range(0.0..std::f32::consts::TAU);
            sigma * (-2.0 * u.ln()).sqrt() * v.cos()
        })
        .collect()
}
