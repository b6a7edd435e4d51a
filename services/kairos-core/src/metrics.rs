//! Pipeline metrics every service exposes on /metrics.
//!
//! Names follow Prometheus conventions (base units, `_total` counters, `_seconds`
//! histograms) and labels stay bounded: topic, partition, reason, never customer ids.

use std::sync::{Arc, Mutex};

use foldhash::{HashMap, HashMapExt};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Registers a metric, panicking only on a programming error (duplicate name), which
/// the metrics tests catch.
pub fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, m: M) -> M {
    if let Err(e) = registry.register(Box::new(m.clone())) {
        panic!("metric registration failed (duplicate or invalid name): {e}");
    }
    m
}

pub fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter definition"),
    )
}

/// A labelled counter family for paths taken once per record or more: each label set
/// is looked up in the family once and kept. (`with_label_values` hashes every label
/// with SipHash, takes the family's lock and clones the child on each call: a few per
/// cent of a processor's time when done three or four times per record.)
#[derive(Clone)]
pub struct CachedCounterVec {
    family: IntCounterVec,
    children: Arc<Mutex<Children>>,
}

struct Children {
    /// By the label values: the value itself for a family of one label, else each
    /// value after its length in four bytes (so no two label sets share a key).
    by_labels: HashMap<Vec<u8>, IntCounter>,
    /// Where a lookup key is built, so a lookup allocates nothing.
    key: Vec<u8>,
}

impl CachedCounterVec {
    pub fn new(family: IntCounterVec) -> Self {
        CachedCounterVec {
            family,
            children: Arc::new(Mutex::new(Children {
                by_labels: HashMap::new(),
                key: Vec::new(),
            })),
        }
    }

    pub fn inc(&self, labels: &[&str]) {
        self.inc_by(labels, 1);
    }

    pub fn inc_by(&self, labels: &[&str], n: u64) {
        // A poisoned lock only means a panic elsewhere mid-lookup; the map is intact.
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        let Children { by_labels, key } = &mut *children;
        key.clear();
        match labels {
            [one] => key.extend_from_slice(one.as_bytes()),
            _ => {
                // Bytes, not `write!`: counts run several times per record, and the
                // formatting machinery is slow for what it does here.
                for label in labels {
                    key.extend_from_slice(&(label.len() as u32).to_le_bytes());
                    key.extend_from_slice(label.as_bytes());
                }
            }
        }
        match by_labels.get(key.as_slice()) {
            Some(child) => child.inc_by(n),
            None => {
                let child = self.family.with_label_values(labels);
                child.inc_by(n);
                by_labels.insert(key.clone(), child);
            }
        }
    }

    /// Makes the series for `labels` exist (at zero) before anything is counted.
    pub fn touch(&self, labels: &[&str]) {
        self.inc_by(labels, 0);
    }

    /// The underlying family, for reading values.
    pub fn family(&self) -> &IntCounterVec {
        &self.family
    }
}

pub fn cached_counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> CachedCounterVec {
    CachedCounterVec::new(counter_vec(registry, name, help, labels))
}

pub fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(
        registry,
        IntCounter::with_opts(Opts::new(name, help)).expect("valid counter definition"),
    )
}

pub fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(
        registry,
        IntGauge::with_opts(Opts::new(name, help)).expect("valid gauge definition"),
    )
}

/// A gauge of a fractional value (a timestamp in seconds).
pub fn gauge_f64(registry: &Registry, name: &str, help: &str) -> prometheus::Gauge {
    register(
        registry,
        prometheus::Gauge::with_opts(Opts::new(name, help)).expect("valid gauge definition"),
    )
}

pub fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        registry,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge definition"),
    )
}

pub fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    register(
        registry,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
            .expect("valid histogram definition"),
    )
}

pub fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    register(
        registry,
        HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
            .expect("valid histogram definition"),
    )
}

/// Buckets from 1 µs to 36 s, for the time one record takes (a few µs in a healthy
/// service; a delivery worker's provider call with its retries takes seconds).
pub fn per_record_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(1e-6, 2.5, 20).expect("valid buckets")
}

/// Latency buckets from 0.5 ms to 2 minutes.
pub fn latency_buckets() -> Vec<f64> {
    vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0, 120.0,
    ]
}

/// The family counting dead letters by reason. One per process registry: the runtime
/// and a delivery worker's webhooks both dead-letter what they cannot take.
pub fn dead_letters(registry: &Registry) -> IntCounterVec {
    counter_vec(
        registry,
        "kairos_dead_letters_total",
        "Input records sent to the dead-letter topic, by reason (webhook events included).",
        &["reason"],
    )
}

/// Metrics of the stream-processing runtime shared by every processor.
#[derive(Clone)]
pub struct RuntimeMetrics {
    pub input_records: CachedCounterVec,
    pub output_records: CachedCounterVec,
    pub duplicate_records: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub batch_duration: Histogram,
    pub record_processing: Histogram,
    pub timers_pending: IntGauge,
    pub timers_fired: IntCounter,
    pub state_size: IntGauge,
    pub owned_partitions: IntGauge,
    pub outbox_pending: IntGauge,
    pub consumer_lag: IntGaugeVec,
    pub input_offset_resets: IntCounterVec,
    pub produce_errors: IntCounter,
    pub changelog_records: IntCounter,
    pub restored_records: IntCounter,
    pub partition_restores: IntCounterVec,
    pub partitions_fenced: IntCounter,
}

impl RuntimeMetrics {
    /// The runtime's metrics in `registry`, with its own dead-letter family.
    pub fn new(registry: &Registry) -> Self {
        Self::with_dead_letters(registry, dead_letters(registry))
    }

    /// The runtime's metrics, counting dead letters in a family made already (the
    /// process's [`crate::admin::AdminState`] holds it, shared with the webhooks).
    pub fn with_dead_letters(registry: &Registry, dead_letters: IntCounterVec) -> Self {
        RuntimeMetrics {
            input_records: cached_counter_vec(
                registry,
                "kairos_input_records_total",
                "Records consumed, by input topic.",
                &["topic"],
            ),
            output_records: cached_counter_vec(
                registry,
                "kairos_output_records_total",
                "Records published (acknowledged by the broker), by output topic; changelog records aside.",
                &["topic"],
            ),
            duplicate_records: counter_vec(
                registry,
                "kairos_duplicate_records_total",
                "Input records skipped because their effect was already applied (redelivery after a crash or rebalance).",
                &["topic"],
            ),
            dead_letters,
            batch_duration: histogram(
                registry,
                "kairos_batch_duration_seconds",
                "Time to process and commit one batch of input records.",
                latency_buckets(),
            ),
            record_processing: histogram(
                registry,
                "kairos_record_processing_seconds",
                "Processing time per record: each record of a batch observed once at the batch's average (state commit included).",
                per_record_buckets(),
            ),
            timers_pending: gauge(
                registry,
                "kairos_timers_pending",
                "Persistent timers waiting to fire in the owned partitions.",
            ),
            timers_fired: counter(
                registry,
                "kairos_timers_fired_total",
                "Persistent timers that fired.",
            ),
            state_size: gauge(
                registry,
                "kairos_state_size_bytes",
                "Size of the RocksDB state of the owned partitions (SST files and memtables).",
            ),
            owned_partitions: gauge(
                registry,
                "kairos_owned_partitions",
                "State partitions this instance owns (the input partitions, but one for the identity service, whose graph is one whole).",
            ),
            outbox_pending: gauge(
                registry,
                "kairos_outbox_pending_records",
                "Committed records not yet acknowledged by the broker: outputs and, for a service with a changelog, the changelog copies of its state writes and commit markers (a stuck changelog partition shows here too).",
            ),
            consumer_lag: gauge_vec(
                registry,
                "kairos_consumer_lag_records",
                "Records between the committed position and the end of the partition.",
                &["topic", "partition"],
            ),
            input_offset_resets: counter_vec(
                registry,
                "kairos_input_offset_resets_total",
                "Times the next input record to read was no longer on the broker (deleted by \
                 retention before it was read) and reading went on from the earliest one it \
                 holds: the records between were never processed.",
                &["topic"],
            ),
            produce_errors: counter(
                registry,
                "kairos_produce_errors_total",
                "Failed publish attempts of outputs and changelog records (the records stay in the outbox and are retried).",
            ),
            changelog_records: counter(
                registry,
                "kairos_changelog_records_total",
                "Changelog records (state writes and commit markers) the broker acknowledged: with kairos_output_records_total, what publish attempts succeeded.",
            ),
            restored_records: counter(
                registry,
                "kairos_changelog_restored_records_total",
                "State records restored from changelog topics when partitions moved here.",
            ),
            partitions_fenced: counter(
                registry,
                "kairos_partitions_fenced_total",
                "Partitions let go because another instance had claimed them since this one \
                 did (their outputs were not published).",
            ),
            partition_restores: counter_vec(
                registry,
                "kairos_partition_restores_total",
                "Partitions brought in line with their changelog when assigned, by how: current (nothing to read), own_tail (a restart after a crash), since_clean_close (only what others wrote since this instance closed it), rebuilt (the whole changelog).",
                &["from"],
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_counters_count_each_label_set_apart() {
        let registry = Registry::new();
        let c = cached_counter_vec(&registry, "t_total", "test", &["a", "b"]);
        c.inc(&["x", "y"]);
        c.inc(&["x", "y"]);
        c.inc_by(&["x:", "y"], 5);
        // Would share a key if the values were joined with a separator.
        c.inc(&["x\u{1f}y", "z"]);
        c.inc_by(&["x", "y\u{1f}z"], 3);
        c.touch(&["never", "counted"]);
        let family = c.family();
        assert_eq!(family.with_label_values(&["x", "y"]).get(), 2);
        assert_eq!(family.with_label_values(&["x:", "y"]).get(), 5);
        assert_eq!(family.with_label_values(&["x\u{1f}y", "z"]).get(), 1);
        assert_eq!(family.with_label_values(&["x", "y\u{1f}z"]).get(), 3);
        assert_eq!(family.with_label_values(&["never", "counted"]).get(), 0);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap_or_default();
        assert!(
            text.contains(r#"t_total{a="never",b="counted"} 0"#),
            "{text}"
        );
    }
}
