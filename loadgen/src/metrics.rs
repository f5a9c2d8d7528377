//! What a worker records: one HDR histogram per operation and a count per answer.
//!
//! Each worker owns its `Recorder` (no sharing, no locks on the hot path); the driver merges
//! them when the run ends.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency a histogram holds (one hour, in microseconds); longer ones are clamped.
const MAX_TRACKABLE_US: u64 = 3_600_000_000;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_TRACKABLE_US, 3).expect("valid histogram bounds")
}

/// Per-worker measurements, merged at the end of a run.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    /// Latency per operation, microseconds.
    pub latency: BTreeMap<&'static str, Histogram<u64>>,
    /// Answers per operation and outcome (`201`, `400 sold-out`, `timeout`, ...).
    pub outcomes: BTreeMap<(&'static str, String), u64>,
    /// HTTP requests sent and measured (warm-up excluded).
    pub requests: u64,
    /// Requests that got no HTTP answer or a 5xx (warm-up excluded).
    pub errors: u64,
}

impl Recorder {
    pub fn record_latency(&mut self, op: &'static str, latency: Duration) {
        let us = (latency.as_micros() as u64).max(1);
        self.latency
            .entry(op)
            .or_insert_with(new_histogram)
            .saturating_record(us);
    }

    pub fn record_outcome(&mut self, op: &'static str, outcome: String) {
        *self.outcomes.entry((op, outcome)).or_default() += 1;
    }

    pub fn merge(&mut self, other: Recorder) {
        for (op, h) in other.latency {
            match self.latency.get_mut(op) {
                Some(mine) => mine.add(&h).expect("same histogram bounds"),
                None => {
                    self.latency.insert(op, h);
                }
            }
        }
        for (key, n) in other.outcomes {
            *self.outcomes.entry(key).or_default() += n;
        }
        self.requests += other.requests;
        self.errors += other.errors;
    }
}

/// One operation's latency summary, in milliseconds (microsecond resolution).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            mean_ms: (h.mean() / 1000.0 * 1000.0).round() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}
