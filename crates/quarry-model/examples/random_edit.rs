//! Writes a random low-rank overlay on a model's FFN down projections both ways: as a
//! llama.cpp LoRA adapter and compiled into a copy of the model. A test input for
//! `scripts/check-edits-llamacpp`, which checks that llama.cpp loads both and that base +
//! adapter and the compiled file agree; real edits come from the editor, not from here.
//!
//! ```sh
//! cargo run --release -p quarry-model --example random_edit -- BASE.gguf OUT_DIR \
//!     [--layers 3,6,9] [--rank 4] [--scale 0.05] [--dtype q8_0] [--seed 1]
//! ```
//!
//! Each listed layer gets `ΔW = B·A` with Gaussian factors, scaled so that `‖ΔW‖_F` is
//! `scale · ‖W‖_F` for that layer's stored weight `W`. Writes `OUT_DIR/lora.gguf` and
//! `OUT_DIR/patched.gguf` (neither may exist yet).

use std::path::PathBuf;
use std::process::exit;

use quarry_format::{GgmlType, GgufFile};
use quarry_model::{write_adapter, write_patched_model, FfnOverlay, LowRank, ModelConfig};

struct Args {
    base: PathBuf,
    out: PathBuf,
    layers: Option<Vec<usize>>,
    rank: usize,
    scale: f64,
    dtype: Option<GgmlType>,
    seed: u64,
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "random_edit: {problem}\nusage: random_edit BASE.gguf OUT_DIR [--layers 3,6,9] \
         [--rank 4] [--scale 0.05] [--dtype f32|f16|bf16|q8_0|q6_k|q4_k] [--seed 1]"
    );
    exit(2)
}

fn parse_args() -> Args {
    let mut positional = Vec::new();
    let mut args = Args {
        base: PathBuf::new(),
        out: PathBuf::new(),
        layers: None,
        rank: 4,
        scale: 0.05,
        dtype: None,
        seed: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .unwrap_or_else(|| usage(&format!("{name} needs a value")))
        };
        match a.as_str() {
            "--layers" => {
                let v = value("--layers");
                let layers = v
                    .split(',')
                    .map(|s| s.trim().parse::<usize>())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap_or_else(|_| usage(&format!("--layers '{v}' is not a list of numbers")));
                args.layers = Some(layers);
            }
            "--rank" => {
                let v = value("--rank");
                args.rank =
                    v.parse().ok().filter(|&r| r > 0).unwrap_or_else(|| {
                        usage(&format!("--rank '{v}' is not a positive integer"))
                    });
            }
            "--scale" => {
                let v = value("--scale");
                args.scale = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                    .unwrap_or_else(|| usage(&format!("--scale '{v}' is not a number ≥ 0")));
            }
            "--dtype" => {
                let v = value("--dtype");
                let t = match v.to_ascii_lowercase().as_str() {
                    "f32" => GgmlType::F32,
                    "f16" => GgmlType::F16,
                    "bf16" => GgmlType::BF16,
                    "q8_0" => GgmlType::Q8_0,
                    "q6_k" => GgmlType::Q6_K,
                    "q4_k" => GgmlType::Q4_K,
                    _ => usage(&format!("--dtype '{v}' is not one of the types listed")),
                };
                args.dtype = Some(t);
            }
            "--seed" => {
                let v = value("--seed");
                args.seed = v
                    .parse()
                    .unwrap_or_else(|_| usage(&format!("--seed '{v}' is not an integer")));
            }
            _ if a.starts_with("--") => usage(&format!("unknown option {a}")),
            _ => positional.push(PathBuf::from(a)),
        }
    }
    let [base, out] = <[PathBuf; 2]>::try_from(positional)
        .unwrap_or_else(|_| usage("expected BASE.gguf and OUT_DIR"));
    args.base = base;
    args.out = out;
    args
}

/// Normal deviates (Box–Muller over a 64-bit LCG), reproducible from the seed.
struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let base = GgufFile::open(&args.base)?;
    let cfg = ModelConfig::from_gguf(&base)?;
    let layers = args
        .layers
        .unwrap_or_else(|| (1..4).map(|i| i * cfg.n_layers / 4).collect());
    if let Some(layer) = layers.iter().find(|&&l| l >= cfg.n_layers) {
        return Err(format!(
            "layer {layer} is out of range: the model has {} layers",
            cfg.n_layers
        )
        .into());
    }
    let mut rng = Rng(args.seed);
    let mut deltas = Vec::new();
    for &layer in &layers {
        let name = format!("blk.{layer}.ffn_down.weight");
        let view = base.tensor(&name)?;
        let mut w = vec![0.0f32; cfg.d_model * cfg.ff_dim];
        quarry_kernels::dequantize(view.info.dtype, view.data, &mut w)
            .map_err(|e| format!("{}: {name}: {e}", args.base.display()))?;
        let w_norm = w.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        let a: Vec<f32> = (0..args.rank * cfg.ff_dim)
            .map(|_| rng.normal() as f32)
            .collect();
        let b: Vec<f32> = (0..cfg.d_model * args.rank)
            .map(|_| rng.normal() as f32)
            .collect();
        let mut delta = LowRank::new(cfg.d_model, cfg.ff_dim, args.rank, a, b)
            .expect("factor lengths follow from the shape");
        let d_norm = delta
            .dense()
            .iter()
            .map(|&x| x as f64 * x as f64)
            .sum::<f64>()
            .sqrt();
        let s = (args.scale * w_norm / d_norm) as f32;
        delta.b.iter_mut().for_each(|x| *x *= s);
        deltas.push((layer, delta));
    }
    let overlay = FfnOverlay::new(cfg.n_layers, deltas);
    let (lora, patched) = (args.out.join("lora.gguf"), args.out.join("patched.gguf"));
    write_adapter(&overlay, &cfg, &lora)?;
    write_patched_model(&base, &overlay, args.dtype, &patched)?;
    println!(
        "layers {layers:?}, rank {}, ‖ΔW‖ = {}·‖W‖: wrote {} and {}",
        args.rank,
        args.scale,
        lora.display(),
        patched.display()
    );
    Ok(())
}

fn main() {
    if let Err(e) = run(parse_args()) {
        eprintln!("random_edit: {e}");
        exit(1);
    }
}
