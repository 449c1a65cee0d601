//! Latency histograms: HdrHistogram, 1 µs … 60 s, 3 significant digits.

use hdrhistogram::Histogram;
use std::time::Duration;

use crate::protocol::stats::LatencyQuantiles;

/// Largest trackable latency, in microseconds (60 s). Longer samples are
/// clamped to it (`saturating_record`) rather than lost.
pub const MAX_LATENCY_US: u64 = 60_000_000;

/// A new, empty histogram with the design's bounds.
pub fn new_histogram() -> Histogram<u64> {
    // Bounds are constants that `new_with_bounds` accepts (low >= 1,
    // high >= 2 * low, sigfig <= 5), so this cannot fail.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
        .unwrap_or_else(|_| unreachable!("constant histogram bounds are valid"))
}

/// Records one sample, in whole microseconds (at least 1).
#[inline]
pub fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let us = u64::try_from(latency.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    histogram.saturating_record(us);
}

/// The quantiles reported in stats and `/metrics`.
pub fn quantiles(histogram: &Histogram<u64>) -> LatencyQuantiles {
    if histogram.is_empty() {
        return LatencyQuantiles::default();
    }
    LatencyQuantiles {
        count: histogram.len(),
        p50: histogram.value_at_quantile(0.50),
        p90: histogram.value_at_quantile(0.90),
        p99: histogram.value_at_quantile(0.99),
        p999: histogram.value_at_quantile(0.999),
        max: histogram.max(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_known_distribution() {
        let mut h = new_histogram();
        for us in 1..=1000u64 {
            record(&mut h, Duration::from_micros(us));
        }
        record(&mut h, Duration::from_secs(3600)); // clamped, not lost
        let q = quantiles(&h);
        assert_eq!(q.count, 1001);
        assert_eq!(q.p50, 501);
        assert_eq!(q.p90, 901);
        assert!(q.max >= MAX_LATENCY_US && q.max <= MAX_LATENCY_US + MAX_LATENCY_US / 1000);
        assert_eq!(quantiles(&new_histogram()), LatencyQuantiles::default());
    }
}
