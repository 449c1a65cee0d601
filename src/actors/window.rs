//! Latency over the last minute: a ring of HdrHistograms.
//!
//! Why a ring: since-start quantiles hardly move after an hour of traffic,
//! so an alert on them reacts late. HdrHistograms add exactly, so the
//! window is the sum of its slots, and a slot that ages out is replaced by
//! an empty one. With `SLOTS` slots of `window / SLOTS` each, the window
//! always holds the current (partial) slot and the `SLOTS - 1` before it:
//! between 5/6 and all of the last `window`.

use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::latency;
use crate::protocol::stats::LatencyQuantiles;

/// Slots in the ring.
pub const SLOTS: usize = 6;

#[derive(Default)]
struct Slot {
    /// Which slot period (since the window's start) this slot holds.
    epoch: u64,
    services: BTreeMap<String, Histogram<u64>>,
    overall: Option<Histogram<u64>>,
}

/// Per-service and overall latency of the last `window`.
pub struct LatencyWindow {
    started: Instant,
    slot_len: Duration,
    slots: Vec<Slot>,
}

impl LatencyWindow {
    /// A window of `window` (at least `SLOTS` ms), starting now.
    pub fn new(window: Duration) -> Self {
        let slot_len = (window / SLOTS as u32).max(Duration::from_millis(1));
        Self {
            started: Instant::now(),
            slot_len,
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.started);
        u64::try_from(elapsed.as_nanos() / self.slot_len.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Adds what the Router measured since its last batch, as of `now`.
    pub fn add(
        &mut self,
        now: Instant,
        services: &[(String, Histogram<u64>)],
        overall: Option<&Histogram<u64>>,
    ) {
        let epoch = self.epoch(now);
        let slot = &mut self.slots[(epoch % SLOTS as u64) as usize];
        if slot.epoch != epoch {
            // Aged out: dropped whole (fresh histograms are lazily zeroed,
            // cheaper than resetting every bucket).
            *slot = Slot {
                epoch,
                ..Slot::default()
            };
        }
        // Same bounds everywhere, so adding cannot fail.
        for (service, h) in services {
            let _ = slot
                .services
                .entry(service.clone())
                .or_insert_with(latency::new_histogram)
                .add(h);
        }
        if let Some(h) = overall {
            let _ = slot
                .overall
                .get_or_insert_with(latency::new_histogram)
                .add(h);
        }
    }

    /// Quantiles of the window as of `now`: one entry per service in
    /// `services` (count 0 when it had no samples lately) and `overall`.
    pub fn quantiles<'a>(
        &self,
        now: Instant,
        services: impl IntoIterator<Item = &'a String>,
    ) -> BTreeMap<String, LatencyQuantiles> {
        let epoch = self.epoch(now);
        let live: Vec<&Slot> = self
            .slots
            .iter()
            .filter(|s| s.epoch <= epoch && epoch - s.epoch < SLOTS as u64)
            .collect();
        let merged = |pick: &dyn Fn(&Slot) -> Option<&Histogram<u64>>| {
            let mut sum: Option<Histogram<u64>> = None;
            for h in live.iter().filter_map(|s| pick(s)) {
                match &mut sum {
                    Some(sum) => {
                        let _ = sum.add(h);
                    }
                    None => sum = Some(h.clone()),
                }
            }
            sum.map_or_else(LatencyQuantiles::default, |h| latency::quantiles(&h))
        };
        let mut out: BTreeMap<String, LatencyQuantiles> = services
            .into_iter()
            .map(|service| (service.clone(), merged(&|s| s.services.get(service))))
            .collect();
        out.insert("overall".into(), merged(&|s| s.overall.as_ref()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(us: u64, n: u64) -> (Vec<(String, Histogram<u64>)>, Histogram<u64>) {
        let mut h = latency::new_histogram();
        h.record_n(us, n).expect("in range");
        (vec![("echo".to_string(), h.clone())], h)
    }

    #[test]
    fn old_samples_leave_the_window() {
        let mut w = LatencyWindow::new(Duration::from_secs(60));
        let t0 = w.started;
        let names = ["echo".to_string()];
        let (slow, slow_all) = batch(50_000, 100);
        w.add(t0, &slow, Some(&slow_all));
        let q = w.quantiles(t0 + Duration::from_secs(30), &names);
        assert_eq!(q["echo"].count, 100);
        assert!(q["echo"].p99 >= 49_000, "{:?}", q["echo"]);

        let (fast, fast_all) = batch(100, 1000);
        w.add(t0 + Duration::from_secs(40), &fast, Some(&fast_all));
        let q = w.quantiles(t0 + Duration::from_secs(45), &names);
        assert_eq!(q["echo"].count, 1100, "both batches are inside 60 s");

        // 60 s after the slow batch's slot ended, only the fast one is left.
        let q = w.quantiles(t0 + Duration::from_secs(70), &names);
        assert_eq!(q["echo"].count, 1000);
        assert!(q["echo"].p99 <= 101, "{:?}", q["echo"]);
        assert_eq!(q["overall"].count, 1000);

        // And nothing at all a window later; the service is still listed.
        let q = w.quantiles(t0 + Duration::from_secs(200), &names);
        assert_eq!(q["echo"], LatencyQuantiles::default());
    }

    #[test]
    fn a_reused_slot_starts_empty() {
        let mut w = LatencyWindow::new(Duration::from_secs(6));
        let t0 = w.started;
        let (a, a_all) = batch(10, 5);
        w.add(t0, &a, Some(&a_all));
        // Same slot index six periods later: the old samples are gone.
        w.add(t0 + Duration::from_secs(6), &a, Some(&a_all));
        let q = w.quantiles(t0 + Duration::from_secs(6), &["echo".to_string()]);
        assert_eq!(q["echo"].count, 5);
    }
}
