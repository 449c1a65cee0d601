//! The core's metrics batch: counter deltas, gauges and histograms since
//! the last one, shipped to the MetricsStore every `metrics_flush_interval`
//! (and before every stats reply, so stats are exact).

use hdrhistogram::Histogram;
use std::time::{Instant, SystemTime};

use super::core::Core;
use super::sink::Sink;
use super::table::ProcessEntry;
use crate::actors::latency;
use crate::actors::messages::{Counters, MetricsBatch, NodeSnapshot, ProcessSnapshot};
use bytestring::ByteString;

impl<S: Sink> Core<S> {
    /// The wall-clock time of monotonic instant `at`.
    fn wall(&self, at: Instant) -> SystemTime {
        self.clock.1 + at.saturating_duration_since(self.clock.0)
    }

    /// Process `id` as the batch shows it.
    pub(super) fn snapshot(
        &self,
        id: &ByteString,
        entry: &ProcessEntry<S::Port>,
    ) -> ProcessSnapshot {
        ProcessSnapshot {
            id: id.to_string(),
            service: self.table.service_name(entry).to_string(),
            delta: entry.delta,
            first_seen: entry.first_seen.map(|t| self.wall(t)),
            last_seen: entry.last_seen.map(|t| self.wall(t)),
            queue_depth: self.sink.queue_depth(&entry.port) as u64,
            pending: entry.in_flight as u64,
            ready: entry.ready,
            removed: false,
        }
    }

    /// The counter deltas and the histograms since the last batch, cut at
    /// wall-clock time `at`. Remote nodes (`@node` in the table) go out as
    /// nodes, not processes.
    pub(crate) fn flush(&mut self, at: SystemTime) -> MetricsBatch {
        let mut processes = std::mem::take(&mut self.retired);
        processes.extend(
            self.table
                .iter()
                .map(|(id, entry)| self.snapshot(id, entry)),
        );
        for entry in self.table.values_mut() {
            entry.delta = Counters::default();
            entry.first_seen = None;
        }
        let (remote, processes): (Vec<_>, Vec<_>) =
            processes.into_iter().partition(|p| p.id.starts_with('@'));
        let mut nodes: Vec<NodeSnapshot> = remote
            .into_iter()
            .map(|p| NodeSnapshot {
                node: p.id[1..].to_owned(),
                delta: p.delta,
                latency: None,
            })
            .collect();
        let mut latency = Vec::new();
        let mut overall: Option<Histogram<u64>> = None;
        for service in &mut self.table.services {
            if service.histogram.is_empty() {
                continue;
            }
            // Swap in a fresh histogram (a lazily zeroed allocation) rather
            // than copying 139 KB of buckets and zeroing them again.
            let shipped = std::mem::replace(&mut service.histogram, latency::new_histogram());
            match &mut overall {
                // Same bounds everywhere, so adding cannot fail.
                Some(all) => {
                    let _ = all.add(&shipped);
                }
                None => overall = Some(shipped.clone()),
            }
            match service.name.strip_prefix('@') {
                Some(node) => {
                    if let Some(n) = nodes.iter_mut().find(|n| n.node == node) {
                        n.latency = Some(shipped);
                    }
                }
                None => latency.push((service.name.to_string(), shipped)),
            }
        }
        let caller = std::mem::take(&mut self.caller);
        MetricsBatch {
            at,
            processes,
            caller,
            latency,
            overall,
            broker_errors: std::mem::take(&mut self.broker_errors),
            pending: self.pending.len() as u64,
            nodes,
        }
    }
}
