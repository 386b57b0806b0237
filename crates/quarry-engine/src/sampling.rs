//! Next-token selection from raw logits.
//!
//! A [`Sampler`] runs a fixed chain modelled on llama.cpp's default one:
//! penalties → top-k → top-p → min-p → temperature → a weighted draw from the softmax.
//! A temperature of exactly 0 skips everything after the penalties and takes the argmax.
//!
//! Invariants:
//! - Every choice is deterministic given the parameters (seed included) and the sequence of
//!   `(logits, history)` calls: ties between equal logits always go to the lowest token id, and
//!   the only randomness is one [`StdRng`] seeded from [`SamplingParams::seed`].
//! - NaN logits are treated as `-inf` and `+inf` as the largest finite value, so no input
//!   makes the chain panic or draw a token whose probability is NaN. If no token has a finite
//!   logit, the lowest id is returned, as greedy decoding would.
//! - The token with the highest logit (after penalties) always survives truncation, so the
//!   draw always has at least one candidate of non-zero weight.
//! - Work per call is a few O(V) passes; sorting is limited to what truncation can keep.
//!   Top-k is a linear-time selection; min-p and a provably safe bound for top-p discard the
//!   tail by threshold before the one sort top-p needs.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Settings for [`Sampler`]. Each stage has a value that disables it.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax after penalties).
    pub temperature: f32,
    /// Keep only the `top_k` highest logits; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability mass (over what top-k
    /// kept) reaches `top_p`; 1.0 disables.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the most likely token's; 0 disables.
    pub min_p: f32,
    /// llama.cpp-style repetition penalty for tokens in the last `penalty_last_n`: positive
    /// logits are divided by it, negative ones multiplied; 1.0 disables.
    pub repeat_penalty: f32,
    /// OpenAI-style: `logit -= count * frequency_penalty`; 0 disables.
    pub frequency_penalty: f32,
    /// OpenAI-style: `logit -= presence_penalty` for tokens seen at least once; 0 disables.
    pub presence_penalty: f32,
    /// How many of the most recent history tokens the penalties look at; 0 disables them.
    pub penalty_last_n: usize,
    /// Seed of the random draw; equal seeds give equal token sequences.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// llama.cpp's defaults, penalties off.
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: 64,
            seed: 0xC0FFEE,
        }
    }
}

impl SamplingParams {
    /// Deterministic argmax decoding with every other stage disabled.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..Self::default()
        }
    }

    /// Checks every parameter; the error names the first bad one.
    pub fn validate(&self) -> Result<(), SamplingError> {
        fn check(
            name: &'static str,
            value: f32,
            ok: bool,
            reason: &'static str,
        ) -> Result<(), SamplingError> {
            // Every parameter must be finite, including those with no range restriction.
            if ok && value.is_finite() {
                Ok(())
            } else {
                Err(SamplingError::InvalidParameter {
                    name,
                    value: value.to_string(),
                    reason,
                })
            }
        }
        let p = self;
        check(
            "temperature",
            p.temperature,
            p.temperature >= 0.0,
            "must be finite and >= 0 (0 means greedy)",
        )?;
        check(
            "top_p",
            p.top_p,
            p.top_p > 0.0 && p.top_p <= 1.0,
            "must be in (0, 1] (1 disables)",
        )?;
        check(
            "min_p",
            p.min_p,
            (0.0..=1.0).contains(&p.min_p),
            "must be in [0, 1] (0 disables)",
        )?;
        check(
            "repeat_penalty",
            p.repeat_penalty,
            p.repeat_penalty > 0.0,
            "must be finite and > 0 (1 disables)",
        )?;
        check(
            "frequency_penalty",
            p.frequency_penalty,
            true,
            "must be finite",
        )?;
        check(
            "presence_penalty",
            p.presence_penalty,
            true,
            "must be finite",
        )
    }

    fn penalties_enabled(&self) -> bool {
        self.penalty_last_n > 0
            && (self.repeat_penalty != 1.0
                || self.frequency_penalty != 0.0
                || self.presence_penalty != 0.0)
    }
}

/// A rejected [`SamplingParams`] field.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("invalid sampling parameter `{name}` = {value}: {reason}")]
    InvalidParameter {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// A token id and its logit packed so that ascending `u64` order is best first: higher logit,
/// then lower id. Selection and sorting then compare plain integers, several times faster than
/// a float-then-id comparator over a vocabulary-sized slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Candidate(u64);

impl Candidate {
    fn new(id: u32, logit: f32) -> Self {
        let bits = sanitize(logit).to_bits();
        // Unsigned order of `ordered` is float order: negatives reversed, positives above them.
        let ordered = if bits >> 31 == 1 {
            !bits
        } else {
            bits | 1 << 31
        };
        Candidate(u64::from(!ordered) << 32 | u64::from(id))
    }

    fn id(self) -> u32 {
        self.0 as u32
    }

    fn logit(self) -> f32 {
        let ordered = !((self.0 >> 32) as u32);
        let bits = if ordered >> 31 == 1 {
            ordered & !(1 << 31)
        } else {
            !ordered
        };
        f32::from_bits(bits)
    }
}

/// Maps NaN to `-inf` and `+inf` to `f32::MAX`, so later arithmetic (`l - max`) stays defined.
/// Adding `0.0` turns `-0.0` into `+0.0`, so the two zeros tie in [`Candidate`] order as they
/// do under `==`.
fn sanitize(logit: f32) -> f32 {
    if logit.is_nan() {
        f32::NEG_INFINITY
    } else {
        logit.min(f32::MAX) + 0.0
    }
}

/// The id of the highest sanitized logit, lowest id on ties: [`Sampler::best`] without
/// building the candidate list (a tenth of the time on a 49k vocabulary, and a server runs
/// it for every sequence of every step).
fn greedy(logits: &[f32]) -> u32 {
    // Two passes the compiler vectorizes: the largest logit (`max` skips NaN), then the first
    // logit that sanitizes to the same value.
    let lanes = logits
        .chunks(16)
        .fold([f32::NEG_INFINITY; 16], |mut m, chunk| {
            for (m, &l) in m.iter_mut().zip(chunk) {
                *m = m.max(l);
            }
            m
        });
    let best = sanitize(lanes.into_iter().fold(f32::NEG_INFINITY, f32::max));
    logits
        .iter()
        .position(|&l| sanitize(l) == best)
        .map_or(0, |i| i as u32)
}

/// Chooses tokens according to [`SamplingParams`]. Holds the seeded RNG and reusable buffers,
/// so one `Sampler` serves one generation stream.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Working set of the current call; reused to avoid a vocabulary-sized allocation per token.
    candidates: Vec<Candidate>,
    /// Scratch copy of the penalty window, sorted to count repeats.
    window: Vec<u32>,
    /// Scratch draw weights, parallel to `candidates`.
    weights: Vec<f32>,
}

impl Sampler {
    /// Validates `params` and seeds the RNG.
    pub fn new(params: SamplingParams) -> Result<Sampler, SamplingError> {
        params.validate()?;
        Ok(Sampler {
            rng: StdRng::seed_from_u64(params.seed),
            params,
            candidates: Vec::new(),
            window: Vec::new(),
            weights: Vec::new(),
        })
    }

    /// Chooses the next token from raw logits given the tokens so far (prompt + generated) for
    /// the penalties. History tokens outside the vocabulary are ignored.
    ///
    /// # Panics
    /// If `logits` is empty or longer than `u32::MAX + 1` entries.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        assert!(
            !logits.is_empty(),
            "Sampler::sample needs at least one logit"
        );
        assert!(
            u32::try_from(logits.len() - 1).is_ok(),
            "vocabulary too large for u32 token ids"
        );
        if self.params.temperature == 0.0 && !self.params.penalties_enabled() {
            return greedy(logits);
        }
        self.load(logits, history);
        if self.params.temperature == 0.0 {
            return self.best();
        }
        let Some(max) = self.truncate() else {
            return self.best();
        };
        self.draw(max)
    }

    /// Fills `candidates` in id order with sanitized, penalized logits.
    fn load(&mut self, logits: &[f32], history: &[u32]) {
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .zip(0u32..)
                .map(|(&l, id)| Candidate::new(id, l)),
        );
        if !self.params.penalties_enabled() {
            return;
        }
        let start = history.len().saturating_sub(self.params.penalty_last_n);
        self.window.clear();
        self.window.extend_from_slice(&history[start..]);
        self.window.sort_unstable();
        let p = &self.params;
        for run in self.window.chunk_by(|a, b| a == b) {
            let id = run[0];
            let Some(c) = self.candidates.get_mut(id as usize) else {
                continue;
            };
            let mut l = c.logit();
            // Dividing a negative logit would raise it, so negatives are scaled the other way.
            if l > 0.0 {
                l /= p.repeat_penalty;
            } else {
                l *= p.repeat_penalty;
            }
            l -= run.len() as f32 * p.frequency_penalty + p.presence_penalty;
            *c = Candidate::new(id, l);
        }
    }

    /// Highest logit, lowest id on ties.
    fn best(&self) -> u32 {
        self.candidates.iter().min().map_or(0, |c| c.id())
    }

    /// Applies top-k, top-p and min-p to `candidates`. Returns the highest logit, which always
    /// survives, or `None` if every logit is `-inf` (nothing to normalize against).
    fn truncate(&mut self) -> Option<f32> {
        let p = &self.params;
        let cands = &mut self.candidates;
        if p.top_k > 0 && p.top_k < cands.len() {
            cands.select_nth_unstable(p.top_k - 1);
            cands.truncate(p.top_k);
        }
        let max = cands.iter().min().map_or(f32::NEG_INFINITY, |c| c.logit());
        if max == f32::NEG_INFINITY {
            return None;
        }
        // min-p keeps `logit >= max + ln(min_p)`: a best-first prefix that contains the max, as
        // top-p's set is, so the chain's result is the shorter of the two prefixes. Filtering by
        // min-p first (top-p still measuring mass against the pre-min-p distribution) gives the
        // same set while leaving top-p fewer candidates to sort.
        let mut floor = if p.min_p > 0.0 {
            max + p.min_p.ln()
        } else {
            f32::NEG_INFINITY
        };
        let top_p_target = (p.top_p < 1.0).then(|| {
            let z: f64 = cands
                .iter()
                .map(|c| f64::from((c.logit() - max).exp()))
                .sum();
            // Tokens lighter than (1 - top_p) z / 2n hold under half the mass top-p leaves out,
            // so the set without them still reaches `top_p`: top-p never needs them, and they
            // can go before the sort.
            let light = (1.0 - f64::from(p.top_p)) * z / (2.0 * cands.len() as f64);
            floor = floor.max(max + light.ln() as f32);
            f64::from(p.top_p) * z
        });
        if floor > f32::NEG_INFINITY {
            cands.retain(|c| c.logit() >= floor);
        }
        if let Some(target) = top_p_target {
            cands.sort_unstable();
            let mut cumulative = 0.0f64;
            let keep = cands
                .iter()
                .position(|c| {
                    cumulative += f64::from((c.logit() - max).exp());
                    cumulative >= target
                })
                .map_or(cands.len(), |i| i + 1);
            cands.truncate(keep);
        }
        Some(max)
    }

    /// Draws one candidate with probability proportional to `exp((logit - max) / temperature)`.
    fn draw(&mut self, max: f32) -> u32 {
        let t = self.params.temperature;
        self.weights.clear();
        self.weights.extend(
            self.candidates
                .iter()
                .map(|c| ((c.logit() - max) / t).exp()),
        );
        let total: f64 = self.weights.iter().map(|&w| f64::from(w)).sum();
        let target = self.rng.gen::<f64>() * total;
        let mut cumulative = 0.0f64;
        // Rounding can leave `target` just past the final sum; fall back to the last token that
        // had any weight (the max has weight 1, so one exists).
        let mut last = None;
        for (c, &w) in self.candidates.iter().zip(&self.weights) {
            if w > 0.0 {
                cumulative += f64::from(w);
                last = Some(c.id());
                if target < cumulative {
                    return c.id();
                }
            }
        }
        last.unwrap_or_else(|| self.best())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quarry_model::ops::softmax;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplingParams::default()
        }
    }

    fn sampler(p: SamplingParams) -> Sampler {
        Sampler::new(p).expect("valid params")
    }

    /// Ids left after the truncation stages, sorted.
    fn survivors(p: SamplingParams, logits: &[f32]) -> Vec<u32> {
        let mut s = sampler(p);
        s.load(logits, &[]);
        s.truncate();
        let mut ids: Vec<u32> = s.candidates.iter().map(|c| c.id()).collect();
        ids.sort_unstable();
        ids
    }

    fn histogram(p: SamplingParams, logits: &[f32], draws: usize) -> Vec<f64> {
        let mut s = sampler(p);
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..draws {
            counts[s.sample(logits, &[]) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    /// Pseudo-random logits without another dependency.
    fn noisy_logits(n: usize) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(7);
        (0..n).map(|_| rng.gen_range(-5.0f32..5.0)).collect()
    }

    #[test]
    fn candidate_key_orders_by_logit_then_id_and_round_trips() {
        let values = [
            f32::NEG_INFINITY,
            -f32::MAX,
            -3.5,
            -1e-40,
            0.0,
            1e-40,
            2.0,
            f32::MAX,
        ];
        for pair in values.windows(2) {
            assert!(Candidate::new(0, pair[1]) < Candidate::new(0, pair[0]));
        }
        for v in values {
            for id in [0, 7, u32::MAX] {
                let c = Candidate::new(id, v);
                assert_eq!((c.id(), c.logit()), (id, v));
            }
        }
        assert!(Candidate::new(1, 2.0) < Candidate::new(2, 2.0));
        assert_eq!(Candidate::new(3, -0.0), Candidate::new(3, 0.0));
        assert_eq!(Candidate::new(3, f32::NAN).logit(), f32::NEG_INFINITY);
        assert_eq!(Candidate::new(3, f32::INFINITY).logit(), f32::MAX);
    }

    #[test]
    fn defaults_are_valid_and_llama_like() {
        let d = SamplingParams::default();
        assert_eq!(d.validate(), Ok(()));
        assert_eq!((d.top_k, d.top_p, d.min_p), (40, 0.95, 0.05));
        assert_eq!(SamplingParams::greedy().validate(), Ok(()));
    }

    #[test]
    fn greedy_picks_argmax_and_lowest_id_on_ties() {
        let mut s = sampler(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -2.0, 2.9], &[]), 1);
        assert_eq!(s.sample(&[1.0, 5.0, 2.0, 5.0, 5.0], &[]), 1);
        assert_eq!(s.sample(&[7.0, 7.0], &[]), 0);
        assert_eq!(s.sample(&[-0.0, 0.0], &[]), 0);
        assert_eq!(s.sample(&[f32::NAN, -1.0, f32::INFINITY, f32::MAX], &[]), 2);
        assert_eq!(s.sample(&[f32::NAN, f32::NAN], &[]), 0);
    }

    /// The fast greedy scan picks exactly what the candidate list's minimum picks, on random
    /// logits salted with ties, NaN, infinities and both zeros.
    #[test]
    fn greedy_scan_equals_the_candidate_order() {
        let mut rng = StdRng::seed_from_u64(11);
        let specials = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            -0.0,
            0.0,
        ];
        for n in [1, 2, 3, 17, 1000] {
            for _ in 0..50 {
                let logits: Vec<f32> = (0..n)
                    .map(|_| match rng.gen_range(0..10) {
                        0 => specials[rng.gen_range(0..specials.len())],
                        1 => 1.0,
                        _ => rng.gen_range(-3.0f32..3.0),
                    })
                    .collect();
                let mut s = sampler(SamplingParams::greedy());
                s.load(&logits, &[]);
                assert_eq!(greedy(&logits), s.best(), "{logits:?}");
            }
        }
    }

    #[test]
    fn same_seed_same_draws_different_seed_different_draws() {
        let logits = noisy_logits(1000)
            .iter()
            .map(|l| l * 0.3)
            .collect::<Vec<_>>();
        let run = |seed| {
            let mut s = sampler(SamplingParams {
                seed,
                ..params(1.0)
            });
            (0..50).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn top_k_one_equals_greedy_at_any_temperature() {
        let logits = noisy_logits(5000);
        let mut greedy = sampler(SamplingParams::greedy());
        let expected = greedy.sample(&logits, &[]);
        for t in [0.1, 1.0, 5.0, 100.0] {
            let mut s = sampler(SamplingParams {
                top_k: 1,
                ..params(t)
            });
            for _ in 0..20 {
                assert_eq!(s.sample(&logits, &[]), expected);
            }
        }
        // With tied maxima top-k=1 keeps the lowest id, as greedy does.
        let tied = [1.0, 4.0, 4.0, 0.0];
        let mut s = sampler(SamplingParams {
            top_k: 1,
            ..params(2.0)
        });
        assert_eq!(s.sample(&tied, &[]), 1);
    }

    #[test]
    fn top_k_keeps_the_k_best() {
        let logits = [0.5, 3.0, -1.0, 2.0, 2.5, 0.0];
        let p = SamplingParams {
            top_k: 3,
            ..params(1.0)
        };
        assert_eq!(survivors(p, &logits), vec![1, 3, 4]);
    }

    #[test]
    fn tiny_top_p_equals_greedy() {
        let logits = noisy_logits(5000);
        let expected = sampler(SamplingParams::greedy()).sample(&logits, &[]);
        let mut s = sampler(SamplingParams {
            top_p: 1e-6,
            ..params(3.0)
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&logits, &[]), expected);
        }
    }

    #[test]
    fn top_p_keeps_smallest_prefix_reaching_mass() {
        // Probabilities 0.4, 0.3, 0.2, 0.1 (ids shuffled).
        let logits = [0.2f32, 0.4, 0.1, 0.3].map(f32::ln);
        let p = |top_p| SamplingParams {
            top_p,
            ..params(1.0)
        };
        assert_eq!(survivors(p(0.35), &logits), vec![1]);
        assert_eq!(survivors(p(0.65), &logits), vec![1, 3]);
        assert_eq!(survivors(p(0.75), &logits), vec![0, 1, 3]);
        assert_eq!(survivors(p(0.95), &logits), vec![0, 1, 2, 3]);
        // After top-k 2 the mass is renormalized over {0.4, 0.3}: 0.4 alone is 0.57 >= 0.55.
        let p = SamplingParams {
            top_k: 2,
            top_p: 0.55,
            ..params(1.0)
        };
        assert_eq!(survivors(p, &logits), vec![1]);
    }

    #[test]
    fn top_p_over_large_vocab_matches_reference() {
        // Wide enough that the tail bound discards little and many candidates are sorted.
        let logits: Vec<f32> = noisy_logits(20_000).iter().map(|l| l * 0.5).collect();
        let probs = softmax(&logits);
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        for top_p in [0.1f32, 0.5, 0.9] {
            let mut cum = 0.0;
            let mut expected = Vec::new();
            for &i in &order {
                expected.push(i as u32);
                cum += probs[i];
                if cum >= f64::from(top_p) {
                    break;
                }
            }
            expected.sort_unstable();
            let got = survivors(
                SamplingParams {
                    top_p,
                    ..params(1.0)
                },
                &logits,
            );
            // Summation order differs slightly; allow the boundary token to differ.
            assert!(got.len().abs_diff(expected.len()) <= 1, "top_p {top_p}");
            let common = got.len().min(expected.len());
            let by_rank = |v: &[u32]| {
                let mut v = v.to_vec();
                v.sort_by_key(|&i| order.iter().position(|&o| o as u32 == i));
                v.truncate(common);
                v
            };
            assert_eq!(by_rank(&got), by_rank(&expected), "top_p {top_p}");
        }
    }

    #[test]
    fn min_p_keeps_exactly_tokens_above_fraction_of_max() {
        let probs = [0.09f32, 0.5, 0.06, 0.25, 0.1];
        let logits = probs.map(f32::ln);
        let min_p = 0.19; // threshold 0.095: keeps 0.5, 0.25, 0.1
        let sm = softmax(&logits);
        let p_max = sm.iter().copied().fold(0.0, f64::max);
        let expected: Vec<u32> = (0..sm.len() as u32)
            .filter(|&i| sm[i as usize] >= f64::from(min_p) * p_max)
            .collect();
        assert_eq!(expected, vec![1, 3, 4]);
        let p = SamplingParams {
            min_p,
            ..params(1.0)
        };
        assert_eq!(survivors(p.clone(), &logits), expected);
        // And the draws only ever come from that set.
        let h = histogram(p, &logits, 2000);
        assert!(h[0] == 0.0 && h[2] == 0.0);
        assert!(h[1] > 0.0 && h[3] > 0.0 && h[4] > 0.0);
    }

    #[test]
    fn top_p_and_min_p_together_keep_the_tighter_cut() {
        // Probabilities 0.4, 0.3, 0.2, 0.1.
        let logits = [0.4f32, 0.3, 0.2, 0.1].map(f32::ln);
        let p = |top_p, min_p| SamplingParams {
            top_p,
            min_p,
            ..params(1.0)
        };
        // top-p keeps three, min-p (p >= 0.24) two.
        assert_eq!(survivors(p(0.75, 0.6), &logits), vec![0, 1]);
        // top-p keeps one, min-p (p >= 0.18) three.
        assert_eq!(survivors(p(0.35, 0.45), &logits), vec![0]);
    }

    #[test]
    fn top_p_measures_mass_before_min_p() {
        // Probabilities 0.5, 0.2, 0.15, 0.15. min-p 0.3 keeps p >= 0.15 (all); make it drop
        // the two smallest with min-p 0.35 (>= 0.175): {0.5, 0.2}. Top-p 0.6 over the full
        // distribution keeps {0.5, 0.2} (mass 0.7); if top-p used the min-p-renormalized
        // distribution (0.714, 0.286) it would keep only {0.5}.
        let logits = [0.5f32, 0.2, 0.15, 0.15].map(f32::ln);
        let p = SamplingParams {
            top_p: 0.6,
            min_p: 0.35,
            ..params(1.0)
        };
        assert_eq!(survivors(p, &logits), vec![0, 1]);
    }

    #[test]
    fn repeat_penalty_changes_choice_for_positive_and_negative_logits() {
        let greedy = SamplingParams {
            repeat_penalty: 1.2,
            ..SamplingParams::greedy()
        };
        let mut s = sampler(greedy.clone());
        // Positive: 2.0 / 1.2 = 1.67 < 1.8.
        assert_eq!(s.sample(&[2.0, 1.8, -1.0], &[]), 0);
        assert_eq!(s.sample(&[2.0, 1.8, -1.0], &[0]), 1);
        // Negative: -1.0 * 1.2 = -1.2 < -1.1.
        assert_eq!(s.sample(&[-1.0, -1.1, -5.0], &[]), 0);
        assert_eq!(s.sample(&[-1.0, -1.1, -5.0], &[0]), 1);
        // Outside the window the token is not penalized.
        let mut s = sampler(SamplingParams {
            penalty_last_n: 2,
            ..greedy
        });
        assert_eq!(s.sample(&[2.0, 1.8, -1.0], &[0, 2, 2]), 0);
        assert_eq!(s.sample(&[2.0, 1.8, -1.0], &[2, 0, 2]), 1);
    }

    #[test]
    fn frequency_and_presence_penalties_subtract() {
        let mut s = sampler(SamplingParams {
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..params(1.0)
        });
        let logits = [1.0, 1.0, 1.0, 1.0];
        // Token 1 three times, token 2 once, token 3 never; 9 is out of vocabulary.
        s.load(&logits, &[1, 2, 1, 9, 1]);
        let got: Vec<f32> = s.candidates.iter().map(|c| c.logit()).collect();
        assert_eq!(got, vec![1.0, 1.0 - 1.5 - 0.25, 1.0 - 0.5 - 0.25, 1.0]);

        // Combined with the repeat penalty, which applies first.
        let mut s = sampler(SamplingParams {
            repeat_penalty: 2.0,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..params(1.0)
        });
        s.load(&[4.0, -4.0], &[0, 1, 1]);
        let got: Vec<f32> = s.candidates.iter().map(|c| c.logit()).collect();
        assert_eq!(got, vec![4.0 / 2.0 - 0.5 - 0.25, -4.0 * 2.0 - 1.0 - 0.25]);

        // penalty_last_n = 0 disables them all.
        let mut s = sampler(SamplingParams {
            penalty_last_n: 0,
            frequency_penalty: 0.5,
            ..params(1.0)
        });
        s.load(&logits, &[1, 1]);
        assert!(s.candidates.iter().all(|c| c.logit() == 1.0));
    }

    #[test]
    fn empirical_distribution_matches_softmax() {
        let logits = [0.0f32, 1.0, 2.0, 0.5];
        let draws = 20_000;
        for t in [1.0f32, 2.0] {
            let scaled: Vec<f32> = logits.iter().map(|l| l / t).collect();
            let expected = softmax(&scaled);
            let got = histogram(params(t), &logits, draws);
            for (g, e) in got.iter().zip(&expected) {
                // Binomial standard deviation; 5 sigma with a fixed seed cannot flake.
                let sigma = (e * (1.0 - e) / draws as f64).sqrt();
                assert!(
                    (g - e).abs() < 5.0 * sigma,
                    "t {t}: got {got:?} want {expected:?}"
                );
            }
        }
    }

    #[test]
    fn nan_and_infinite_logits_do_not_panic() {
        let nan = f32::NAN;
        let inf = f32::INFINITY;
        let mixed = [nan, 1.0, nan, 0.5];
        let mut g = sampler(SamplingParams::greedy());
        assert_eq!(g.sample(&mixed, &[]), 1);
        assert_eq!(g.sample(&[nan, nan, nan], &[]), 0);
        assert_eq!(g.sample(&[1.0, inf, inf], &[]), 1);
        for p in [
            SamplingParams::default(),
            params(1.0),
            SamplingParams {
                top_p: 0.5,
                ..params(1.0)
            },
            SamplingParams {
                repeat_penalty: 0.5,
                frequency_penalty: -1.0,
                ..params(1.0)
            },
        ] {
            let mut s = sampler(p);
            for _ in 0..100 {
                assert!([1, 3].contains(&s.sample(&mixed, &[0, 1, 2])));
                assert_eq!(s.sample(&[nan, nan, nan], &[]), 0);
                assert_eq!(s.sample(&[-inf, -inf], &[]), 0);
                assert!([1, 2].contains(&s.sample(&[0.0, inf, inf, nan], &[1])));
            }
        }
    }

    #[test]
    fn validate_names_each_bad_parameter() {
        let cases: Vec<(&str, SamplingParams)> = vec![
            (
                "temperature",
                SamplingParams {
                    temperature: -0.1,
                    ..Default::default()
                },
            ),
            (
                "temperature",
                SamplingParams {
                    temperature: f32::INFINITY,
                    ..Default::default()
                },
            ),
            (
                "top_p",
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
            ),
            (
                "top_p",
                SamplingParams {
                    top_p: 1.5,
                    ..Default::default()
                },
            ),
            (
                "top_p",
                SamplingParams {
                    top_p: f32::NAN,
                    ..Default::default()
                },
            ),
            (
                "min_p",
                SamplingParams {
                    min_p: -0.01,
                    ..Default::default()
                },
            ),
            (
                "min_p",
                SamplingParams {
                    min_p: 1.01,
                    ..Default::default()
                },
            ),
            (
                "repeat_penalty",
                SamplingParams {
                    repeat_penalty: 0.0,
                    ..Default::default()
                },
            ),
            (
                "repeat_penalty",
                SamplingParams {
                    repeat_penalty: f32::NAN,
                    ..Default::default()
                },
            ),
            (
                "frequency_penalty",
                SamplingParams {
                    frequency_penalty: f32::INFINITY,
                    ..Default::default()
                },
            ),
            (
                "presence_penalty",
                SamplingParams {
                    presence_penalty: f32::NEG_INFINITY,
                    ..Default::default()
                },
            ),
        ];
        for (name, p) in cases {
            let err = p.validate().expect_err(name);
            let SamplingError::InvalidParameter { name: got, .. } = &err;
            assert_eq!(*got, name);
            assert!(err.to_string().contains(name), "{err}");
            assert_eq!(Sampler::new(p).err(), Some(err));
        }
        // Boundary values that are allowed.
        for p in [
            SamplingParams {
                temperature: 0.0,
                top_p: 1.0,
                min_p: 1.0,
                frequency_penalty: -2.0,
                presence_penalty: -2.0,
                repeat_penalty: 0.5,
                ..Default::default()
            },
            SamplingParams {
                min_p: 0.0,
                top_k: 0,
                penalty_last_n: 0,
                ..Default::default()
            },
        ] {
            assert_eq!(p.validate(), Ok(()));
        }
    }
}
