//! Random shapes, token counts and kernel variants against the CPU reference.

mod common;

use std::sync::OnceLock;

use common::{max_rel_error, reference, test_gpu};
use proptest::prelude::*;
use quarry_gpu::reference::{random_activations, random_weights};
use quarry_gpu::{GemmUse, GemvConfig, Gpu, GpuMatrix, Reduction, SUPPORTED};

fn gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    GPU.get_or_init(test_gpu).as_ref()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn gemv_matches_the_cpu_reference(
        type_index in 0..SUPPORTED.len(),
        rows in 1usize..70,
        blocks in 1usize..5,
        odd_cols in 1usize..300,
        tokens in 1usize..40,
        tiled in any::<bool>(),
        shared in any::<bool>(),
        gemm in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let Some(gpu) = gpu() else { return Ok(()) };
        let dtype = SUPPORTED[type_index];
        let bs = dtype.block_size();
        let cols = if bs == 1 { odd_cols } else { blocks * bs };
        let bytes = random_weights(dtype, rows, cols, seed).unwrap();
        let x = random_activations(tokens * cols, seed);
        let config = GemvConfig {
            tiled,
            reduction: if shared { Reduction::Shared } else { Reduction::Auto },
            // The GEMM where it runs (whole steps of columns), else the GEMV whatever the tokens.
            gemm: if gemm { GemmUse::Auto } else { GemmUse::Never },
            ..GemvConfig::default()
        };
        let m = GpuMatrix::upload(gpu, dtype, rows, cols, &bytes).unwrap();
        let y = m.gemv_with(&x, tokens, &config).unwrap();
        let (cpu, mag) = reference(dtype, rows, cols, &bytes, &x, tokens);
        let err = max_rel_error(&y, &cpu, &mag);
        prop_assert!(err <= 1e-4, "{dtype:?} {rows}x{cols} T={tokens} {config:?}: {err:e}");
    }
}
