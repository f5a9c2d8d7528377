//! What a worker records: one HDR histogram per operation and a count per answer.
//!
//! Each worker owns its `Recorder` (no sharing, no locks on the hot path); the driver merges
//! them when the run ends.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

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
    /// When the load started, for the timeline; `None`: no timeline is kept.
    pub origin: Option<Instant>,
    /// Every measured request as (ms since `origin` at its answer, operation, latency µs), for
    /// the per-second timeline; at most [`MAX_SAMPLES`] per worker.
    pub samples: Vec<(u32, &'static str, u32)>,
    /// Ms since `origin` of every ticket or order seen confirmed.
    pub confirmations: Vec<u32>,
    /// Samples not kept because a worker had [`MAX_SAMPLES`] already.
    pub samples_dropped: u64,
}

/// Most timeline samples one worker keeps (24 bytes each).
pub const MAX_SAMPLES: usize = 1_000_000;

impl Recorder {
    pub fn record_latency(&mut self, op: &'static str, latency: Duration) {
        let us = (latency.as_micros() as u64).max(1);
        self.latency
            .entry(op)
            .or_insert_with(new_histogram)
            .saturating_record(us);
    }

    fn since_origin_ms(&self) -> Option<u32> {
        self.origin
            .map(|o| o.elapsed().as_millis().min(u128::from(u32::MAX)) as u32)
    }

    /// A request for the timeline, answered now after `latency`.
    pub fn sample(&mut self, op: &'static str, latency: Duration) {
        let Some(t) = self.since_origin_ms() else {
            return;
        };
        if self.samples.len() >= MAX_SAMPLES {
            self.samples_dropped += 1;
            return;
        }
        let us = latency.as_micros().min(u128::from(u32::MAX)) as u32;
        self.samples.push((t, op, us));
    }

    /// A ticket or order seen confirmed now, for the timeline.
    pub fn confirmed_now(&mut self) {
        if let Some(t) = self.since_origin_ms() {
            self.confirmations.push(t);
        }
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
        self.origin = self.origin.or(other.origin);
        self.samples.extend(other.samples);
        self.confirmations.extend(other.confirmations);
        self.samples_dropped += other.samples_dropped;
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

/// One second of a run: requests answered in it, the p99 of the run's main operation among
/// them, and tickets confirmed so far.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Second {
    /// Seconds since the load started (this bucket covers `[t, t + 1)`).
    pub t: u32,
    pub requests: u64,
    /// `null` when no request of the main operation was answered in this second.
    pub p99_ms: Option<f64>,
    pub confirmed_total: u64,
}

/// The run second by second.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Timeline {
    /// The operation whose p99 is given (the scenario's main one).
    pub op: String,
    pub seconds: Vec<Second>,
    /// Requests left out of the timeline (a worker's sample buffer was full).
    pub samples_dropped: u64,
}

impl Timeline {
    /// Buckets `r`'s samples per second; `op` is the operation whose p99 is given.
    pub fn of(r: &Recorder, op: &str) -> Option<Self> {
        r.origin?;
        let last = r
            .samples
            .iter()
            .map(|s| s.0)
            .chain(r.confirmations.iter().copied())
            .max()?;
        let n = (last / 1000 + 1) as usize;
        let mut requests = vec![0u64; n];
        let mut latencies: Vec<Vec<u32>> = vec![vec![]; n];
        for &(t, o, us) in &r.samples {
            let k = (t / 1000) as usize;
            requests[k] += 1;
            if o == op {
                latencies[k].push(us);
            }
        }
        let mut confirmed = vec![0u64; n];
        for &t in &r.confirmations {
            confirmed[(t / 1000) as usize] += 1;
        }
        let mut total = 0;
        let seconds = (0..n)
            .map(|k| {
                total += confirmed[k];
                let l = &mut latencies[k];
                l.sort_unstable();
                let p99_ms = (!l.is_empty()).then(|| {
                    let i = ((l.len() as f64 * 0.99).ceil() as usize).clamp(1, l.len()) - 1;
                    f64::from(l[i]) / 1000.0
                });
                Second {
                    t: k as u32,
                    requests: requests[k],
                    p99_ms,
                    confirmed_total: total,
                }
            })
            .collect();
        Some(Self {
            op: op.to_owned(),
            seconds,
            samples_dropped: r.samples_dropped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeline_buckets_requests_per_second_with_their_p99_and_the_confirmed_so_far() {
        let mut r = Recorder {
            origin: Some(Instant::now()),
            ..Recorder::default()
        };
        r.samples = vec![
            (10, "purchase", 1_000),
            (900, "purchase", 3_000),
            (950, "get-event", 50_000),
            (2_500, "purchase", 7_000),
        ];
        r.confirmations = vec![20, 2_600, 2_700];
        let t = Timeline::of(&r, "purchase").unwrap();
        let got: Vec<(u32, u64, Option<f64>, u64)> = t
            .seconds
            .iter()
            .map(|s| (s.t, s.requests, s.p99_ms, s.confirmed_total))
            .collect();
        assert_eq!(
            got,
            [(0, 3, Some(3.0), 1), (1, 0, None, 1), (2, 1, Some(7.0), 3)]
        );
    }
}
