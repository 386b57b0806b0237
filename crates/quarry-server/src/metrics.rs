//! Counters and histograms for `GET /metrics`, in Prometheus' text format (written by hand:
//! a few dozen lines, no registry needed).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use quarry_engine::EngineStats;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (bound, c) in BUCKETS.iter().zip(&mut self.counts) {
            if seconds <= *bound {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, c) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Default)]
struct State {
    requests: BTreeMap<(String, u16), u64>,
    prompt_tokens: u64,
    generated_tokens: u64,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
}

/// What the server counts; shared by every handler.
#[derive(Default)]
pub struct Metrics {
    state: Mutex<State>,
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn request(&self, route: &str, status: u16) {
        self.with(|s| *s.requests.entry((route.to_string(), status)).or_default() += 1);
    }

    pub fn tokens(&self, prompt: usize, generated: usize) {
        self.with(|s| {
            s.prompt_tokens += prompt as u64;
            s.generated_tokens += generated as u64;
        });
    }

    pub fn time_to_first_token(&self, d: Duration) {
        self.with(|s| s.time_to_first_token.observe(d.as_secs_f64()));
    }

    pub fn inter_token_latency(&self, d: Duration) {
        self.with(|s| s.inter_token_latency.observe(d.as_secs_f64()));
    }

    /// The whole page, with the engine's queue and cache gauges.
    pub fn render(&self, engine: &EngineStats) -> String {
        let mut out = String::new();
        self.with(|s| {
            out.push_str("# HELP quarry_requests_total HTTP requests by route and status.\n# TYPE quarry_requests_total counter\n");
            for ((route, status), n) in &s.requests {
                let _ = writeln!(
                    out,
                    "quarry_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
            let _ = writeln!(out, "# HELP quarry_prompt_tokens_total Prompt tokens of finished generations.\n# TYPE quarry_prompt_tokens_total counter\nquarry_prompt_tokens_total {}", s.prompt_tokens);
            let _ = writeln!(out, "# HELP quarry_generated_tokens_total Tokens generated.\n# TYPE quarry_generated_tokens_total counter\nquarry_generated_tokens_total {}", s.generated_tokens);
            s.time_to_first_token.render(
                &mut out,
                "quarry_time_to_first_token_seconds",
                "Submission to first generated token.",
            );
            s.inter_token_latency.render(
                &mut out,
                "quarry_inter_token_latency_seconds",
                "Time between consecutive tokens of a generation.",
            );
        });
        let gauges = [
            (
                "quarry_queue_depth",
                "Requests waiting for admission.",
                engine.waiting,
            ),
            (
                "quarry_running_sequences",
                "Sequences being generated.",
                engine.running,
            ),
            (
                "quarry_kv_blocks_used",
                "KV blocks held by running sequences.",
                engine.kv_blocks_used,
            ),
            (
                "quarry_kv_blocks_cached",
                "KV blocks kept only by the prefix cache (reclaimable).",
                engine.kv_blocks_cached,
            ),
            (
                "quarry_kv_blocks_free",
                "KV blocks free.",
                engine.kv_blocks_free,
            ),
            (
                "quarry_kv_blocks_total",
                "KV blocks the memory bound allows.",
                engine.kv_blocks_total,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> EngineStats {
        EngineStats {
            waiting: 2,
            running: 3,
            kv_blocks_used: 10,
            kv_blocks_cached: 4,
            kv_blocks_free: 50,
            kv_blocks_total: 64,
            ..EngineStats::default()
        }
    }

    #[test]
    fn histograms_are_cumulative_with_inf_sum_and_count() {
        let m = Metrics::default();
        for ms in [3, 40, 40, 2000] {
            m.time_to_first_token(Duration::from_millis(ms));
        }
        let page = m.render(&stats());
        let name = "quarry_time_to_first_token_seconds";
        for (le, n) in [
            ("0.001", 0),
            ("0.005", 1),
            ("0.025", 1),
            ("0.05", 3),
            ("1", 3),
            ("2.5", 4),
            ("30", 4),
            ("+Inf", 4),
        ] {
            let line = format!("{name}_bucket{{le=\"{le}\"}} {n}\n");
            assert!(page.contains(&line), "no {line:?} in\n{page}");
        }
        assert!(page.contains(&format!("{name}_count 4\n")));
        let sum: f64 = page
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_sum ")))
            .unwrap()
            .parse()
            .unwrap();
        assert!((sum - 2.083).abs() < 1e-9, "{sum}");
        assert!(page.contains("quarry_inter_token_latency_seconds_count 0\n"));
    }

    #[test]
    fn the_page_is_well_formed_prometheus_text() {
        let m = Metrics::default();
        m.request("/v1/completions", 200);
        m.request("/v1/completions", 200);
        m.request("/v1/completions", 400);
        m.tokens(12, 7);
        m.inter_token_latency(Duration::from_millis(8));
        let page = m.render(&stats());
        for line in [
            "quarry_requests_total{route=\"/v1/completions\",status=\"200\"} 2",
            "quarry_requests_total{route=\"/v1/completions\",status=\"400\"} 1",
            "quarry_prompt_tokens_total 12",
            "quarry_generated_tokens_total 7",
            "quarry_queue_depth 2",
            "quarry_running_sequences 3",
            "quarry_kv_blocks_used 10",
            "quarry_kv_blocks_cached 4",
            "quarry_kv_blocks_free 50",
            "quarry_kv_blocks_total 64",
        ] {
            assert!(page.lines().any(|l| l == line), "no {line:?} in\n{page}");
        }
        // Every sample line is `name[{labels}] value` under a TYPE line for its family.
        let mut typed = Vec::new();
        for line in page.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                typed.push(name.to_string());
            } else if !line.starts_with("# HELP ") {
                let (series, value) = line.rsplit_once(' ').unwrap();
                value.parse::<f64>().unwrap_or_else(|_| panic!("{line}"));
                let name = series.split('{').next().unwrap();
                let family = typed.last().unwrap_or_else(|| panic!("{line}"));
                assert!(name.starts_with(family.as_str()), "{line} under {family}");
            }
        }
    }
}
