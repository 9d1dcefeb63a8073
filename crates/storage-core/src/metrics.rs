//! The process's metrics for `/metrics` (docs/metrics.md), through the
//! `prometheus` client crate: every family with its HELP and TYPE, in the
//! Prometheus text format.
//!
//! What is counted where it happens (transactions and their time, the wait
//! for a pooled connection, HTTP requests, persisted batches) goes straight
//! into the client's counters and histograms. Caches keep their own atomics
//! (a hit must cost no more than an increment, and the reads engineer's
//! caches report through [`CacheStats`] only); they are copied into their
//! families when the metrics are rendered. Gauges that higher layers set
//! (queue depth, replication position) are registered on first use.
//!
//! Families whose Synapse counterpart existing dashboards read carry
//! Synapse's name (`synapse_util_caches_*`, `synapse_storage_transaction_time`,
//! `synapse_storage_schedule_time`, `synapse_http_server_response_time_seconds`,
//! `synapse_storage_events_persisted_events_total`); the rest are `hs_*`.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec,
    Opts, TextEncoder,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Hits and misses of one cache, and what it holds.
#[derive(Debug, Default)]
pub struct CacheStats {
    name: String,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    invalidations: AtomicU64,
    /// What the cache holds, in bytes, as its entries count them.
    bytes: AtomicU64,
    /// How many entries it holds.
    entries: AtomicU64,
    /// Its bound, in the units its sizer counts (entries unless it has one).
    max_size: AtomicU64,
}

impl CacheStats {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
    pub fn invalidations(&self) -> u64 {
        self.invalidations.load(Ordering::Relaxed)
    }
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
    pub fn entries(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }
    pub fn max_size(&self) -> u64 {
        self.max_size.load(Ordering::Relaxed)
    }
    pub(crate) fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn evicted(&self, n: u64) {
        self.evictions.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn invalidated(&self) {
        self.invalidations.fetch_add(1, Ordering::Relaxed);
    }
    /// What the cache holds now: `entries` entries of `bytes` bytes in all.
    pub(crate) fn set_size(&self, entries: usize, bytes: usize) {
        self.entries.store(entries as u64, Ordering::Relaxed);
        self.bytes.store(bytes as u64, Ordering::Relaxed);
    }
    pub(crate) fn set_max_size(&self, max_size: usize) {
        self.max_size.store(max_size as u64, Ordering::Relaxed);
    }
}

/// Outcomes and time of the transactions with one description.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct TxnStats {
    pub committed: u64,
    pub failed: u64,
    pub retries: u64,
    pub seconds: f64,
}

/// Buckets of durations, in seconds: sub-millisecond SQLite transactions to
/// the 30 s a request may take.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Buckets of events per persisted batch (the queue's batches hold up to a
/// few thousand).
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
];

/// The families of the caches (filled from [`CacheStats`] when rendered).
struct CacheFamilies {
    hits: IntCounterVec,
    misses: IntCounterVec,
    evictions: IntCounterVec,
    invalidations: IntCounterVec,
    bytes: IntGaugeVec,
    entries: IntGaugeVec,
    synapse_hits: IntGaugeVec,
    synapse_total: IntGaugeVec,
    synapse_size: IntGaugeVec,
    synapse_bytes: IntGaugeVec,
    synapse_evicted: IntGaugeVec,
    synapse_max_size: IntGaugeVec,
}

/// The registry all stores of a process report into.
pub struct Registry {
    prometheus: prometheus::Registry,
    caches: Mutex<Vec<Arc<CacheStats>>>,
    cache_families: CacheFamilies,
    txns: Mutex<BTreeMap<String, TxnStats>>,
    transactions: IntCounterVec,
    retries: IntCounterVec,
    transaction_time: HistogramVec,
    schedule_time: Histogram,
    response_time: HistogramVec,
    batch_size: Histogram,
    persisted_events: IntCounter,
    build_info: IntGaugeVec,
    gauges: Mutex<BTreeMap<String, Gauge>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

/// The process's registry.
pub fn global() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::new)
}

/// Registers `metric` (a name and help this file chose, so never refused).
fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &prometheus::Registry,
    metric: M,
) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("a metric family registered twice");
    metric
}

fn counter_vec(r: &prometheus::Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        r,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn gauge_vec(r: &prometheus::Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        r,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn histogram(r: &prometheus::Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    register(r, Histogram::with_opts(opts).expect("valid metric"))
}

fn histogram_vec(
    r: &prometheus::Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    register(r, HistogramVec::new(opts, labels).expect("valid metric"))
}

impl Registry {
    fn new() -> Self {
        let r = prometheus::Registry::new();
        let cache_families = CacheFamilies {
            hits: counter_vec(&r, "hs_cache_hits_total", "Lookups a cache answered.", &["cache"]),
            misses: counter_vec(&r, "hs_cache_misses_total", "Lookups a cache could not answer.", &["cache"]),
            evictions: counter_vec(&r, "hs_cache_evictions_total", "Entries a cache dropped to stay within its bound.", &["cache"]),
            invalidations: counter_vec(&r, "hs_cache_invalidations_total", "Invalidations of a cache's entries (one key, or all).", &["cache"]),
            bytes: gauge_vec(&r, "hs_cache_bytes", "What a cache holds, in bytes, as its entries count them.", &["cache"]),
            entries: gauge_vec(&r, "hs_cache_entries", "Entries a cache holds.", &["cache"]),
            synapse_hits: gauge_vec(&r, "synapse_util_caches_cache_hits", "Lookups a cache answered (Synapse's name; hs_cache_hits_total).", &["name"]),
            synapse_total: gauge_vec(&r, "synapse_util_caches_cache", "Lookups of a cache, hits and misses (Synapse's name).", &["name"]),
            synapse_size: gauge_vec(&r, "synapse_util_caches_cache_size", "Entries a cache holds (Synapse's name; hs_cache_entries).", &["name"]),
            synapse_bytes: gauge_vec(&r, "synapse_util_caches_cache_size_bytes", "Estimated bytes a cache holds (Synapse's name; hs_cache_bytes).", &["name"]),
            synapse_evicted: gauge_vec(&r, "synapse_util_caches_cache_evicted_size", "Entries a cache dropped, by reason: size (its bound) or invalidation (Synapse's name).", &["name", "reason"]),
            synapse_max_size: gauge_vec(&r, "synapse_util_caches_cache_max_size", "A cache's bound, in the units it counts (Synapse's name).", &["name"]),
        };
        let transactions = counter_vec(
            &r,
            "hs_transactions_total",
            "Database transactions by description and outcome (committed or failed).",
            &["desc", "outcome"],
        );
        let retries = counter_vec(
            &r,
            "hs_transaction_retries_total",
            "Attempts of a transaction rolled back and run again (serialization failures, deadlocks, a busy SQLite).",
            &["desc"],
        );
        let transaction_time = histogram_vec(
            &r,
            "synapse_storage_transaction_time",
            "Seconds a database transaction took, retries included, by description (Synapse's name).",
            &["desc"],
            SECONDS_BUCKETS,
        );
        let schedule_time = histogram(
            &r,
            "synapse_storage_schedule_time",
            "Seconds waited for a pooled database connection before a transaction (Synapse's name).",
            SECONDS_BUCKETS,
        );
        let response_time = histogram_vec(
            &r,
            "synapse_http_server_response_time_seconds",
            "Seconds from a request's arrival to its answer, by method, route (servlet) and status code (Synapse's name).",
            &["method", "servlet", "code"],
            SECONDS_BUCKETS,
        );
        let batch_size = histogram(
            &r,
            "hs_persistence_batch_size",
            "Events in each batch the persistence queue wrote in one transaction.",
            BATCH_BUCKETS,
        );
        let persisted_events = register(
            &r,
            IntCounter::new(
                "synapse_storage_events_persisted_events_total",
                "Events persisted (Synapse's name).",
            )
            .expect("valid metric"),
        );
        let build_info = gauge_vec(
            &r,
            "hs_build_info",
            "Always 1; the labels say which build this process runs.",
            &["version", "revision"],
        );
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("the process collector registered twice");
        Registry {
            prometheus: r,
            caches: Mutex::default(),
            cache_families,
            txns: Mutex::default(),
            transactions,
            retries,
            transaction_time,
            schedule_time,
            response_time,
            batch_size,
            persisted_events,
            build_info,
            gauges: Mutex::default(),
        }
    }

    /// Says which build this process runs (`hs_build_info`): the binaries
    /// know their version and the git revision they were built from (see
    /// http-api's `build.rs`), which this crate, built once for all of them,
    /// does not.
    pub fn set_build_info(&self, version: &str, revision: &str) {
        self.build_info.reset();
        self.build_info
            .with_label_values(&[version, revision])
            .set(1);
    }

    /// Registers a cache's counters under `name`.
    pub fn cache(&self, name: &str) -> Arc<CacheStats> {
        let stats = Arc::new(CacheStats {
            name: name.to_owned(),
            ..Default::default()
        });
        self.caches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(stats.clone());
        stats
    }

    pub(crate) fn record_txn(&self, desc: &str, ok: bool, retries: u64, elapsed: Duration) {
        {
            let mut txns = self.txns.lock().unwrap_or_else(|p| p.into_inner());
            let entry = txns.entry(desc.to_owned()).or_default();
            if ok {
                entry.committed += 1;
            } else {
                entry.failed += 1;
            }
            entry.retries += retries;
            entry.seconds += elapsed.as_secs_f64();
        }
        let outcome = if ok { "committed" } else { "failed" };
        self.transactions.with_label_values(&[desc, outcome]).inc();
        if retries > 0 {
            self.retries.with_label_values(&[desc]).inc_by(retries);
        }
        self.transaction_time
            .with_label_values(&[desc])
            .observe(elapsed.as_secs_f64());
    }

    /// The time a transaction waited for a pooled connection.
    pub(crate) fn record_pool_wait(&self, waited: Duration) {
        self.schedule_time.observe(waited.as_secs_f64());
    }

    /// One answered HTTP request: `route` is the path pattern it matched
    /// (`/_hs/v1/rooms/{room_id}/state`), never the path itself, so that the
    /// families stay few.
    pub fn record_request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        self.response_time
            .with_label_values(&[method, route, &status.to_string()])
            .observe(elapsed.as_secs_f64());
    }

    /// One batch of `events` events written by the persistence queue.
    pub fn record_persisted_batch(&self, events: usize) {
        self.batch_size.observe(events as f64);
        self.persisted_events.inc_by(events as u64);
    }

    /// The counters of transactions described as `desc`.
    pub fn txn_stats(&self, desc: &str) -> TxnStats {
        self.txns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(desc)
            .copied()
            .unwrap_or_default()
    }

    /// Sets a gauge, e.g. `hs_persistence_queue_depth`, registering it (with
    /// `help`) the first time.
    pub fn set_gauge(&self, name: &str, help: &str, value: f64) {
        let mut gauges = self.gauges.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(gauge) = gauges.get(name) {
            gauge.set(value);
            return;
        }
        match Gauge::new(name, help) {
            Ok(gauge) => {
                gauge.set(value);
                if let Err(e) = self.prometheus.register(Box::new(gauge.clone())) {
                    log::warn!("metric {name}: {e}");
                }
                gauges.insert(name.to_owned(), gauge);
            }
            Err(e) => log::warn!("metric {name}: {e}"),
        }
    }

    /// Copies the caches' atomics into their families. Several stores of a
    /// process may register a cache under the same name: they add up.
    fn collect_caches(&self) {
        let caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        let mut by_name: BTreeMap<&str, [u64; 7]> = BTreeMap::new();
        for c in caches.iter() {
            let e = by_name.entry(c.name()).or_default();
            e[0] += c.hits();
            e[1] += c.misses();
            e[2] += c.evictions();
            e[3] += c.invalidations();
            e[4] += c.bytes();
            e[5] += c.entries();
            e[6] += c.max_size();
        }
        let f = &self.cache_families;
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for (name, [hits, misses, evictions, invalidations, bytes, entries, max]) in by_name {
            let labels = &[name];
            for (family, value) in [
                (&f.hits, hits),
                (&f.misses, misses),
                (&f.evictions, evictions),
                (&f.invalidations, invalidations),
            ] {
                let counter = family.with_label_values(labels);
                // Only this function adds to them, under the caches' lock.
                counter.inc_by(value.saturating_sub(counter.get()));
            }
            f.bytes.with_label_values(labels).set(gauge(bytes));
            f.entries.with_label_values(labels).set(gauge(entries));
            f.synapse_hits.with_label_values(labels).set(gauge(hits));
            f.synapse_total
                .with_label_values(labels)
                .set(gauge(hits + misses));
            f.synapse_size.with_label_values(labels).set(gauge(entries));
            f.synapse_bytes.with_label_values(labels).set(gauge(bytes));
            f.synapse_evicted
                .with_label_values(&[name, "size"])
                .set(gauge(evictions));
            f.synapse_evicted
                .with_label_values(&[name, "invalidation"])
                .set(gauge(invalidations));
            f.synapse_max_size.with_label_values(labels).set(gauge(max));
        }
    }

    /// Everything, in the Prometheus text exposition format (version 0.0.4),
    /// values written as [`tidy_value`] says.
    pub fn render_prometheus(&self) -> String {
        self.collect_caches();
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.prometheus.gather(), &mut out) {
            log::warn!("rendering the metrics: {e}");
        }
        let text = String::from_utf8(out).unwrap_or_default();
        let mut tidy = String::with_capacity(text.len());
        for line in text.lines() {
            match line.rsplit_once(' ') {
                // A sample: `name{labels} value` (the encoder writes no timestamps).
                Some((series, value)) if !line.starts_with('#') => {
                    tidy.push_str(series);
                    tidy.push(' ');
                    tidy.push_str(&tidy_value(value));
                }
                _ => tidy.push_str(line),
            }
            tidy.push('\n');
        }
        tidy
    }
}

/// Significant digits a fractional value keeps on `/metrics`: far below any
/// clock's resolution on a sum of seconds, and above the rounding error that
/// adding up many durations leaves in a float.
const SIGNIFICANT_DIGITS: usize = 12;

/// A sample's value as the client wrote it (Rust's shortest form that reads
/// back as the same float, as Go's and Python's Prometheus clients write
/// theirs), except a fractional value rounded to [`SIGNIFICANT_DIGITS`] first:
/// a histogram's `_sum` adds up floats, and the sum of 0.0001 and 0.0002 is
/// written `0.00030000000000000003` otherwise. Integers (counts, bytes) and
/// `+Inf`/`NaN` stay as they are.
fn tidy_value(value: &str) -> std::borrow::Cow<'_, str> {
    match value.parse::<f64>() {
        Ok(v) if v.is_finite() && v.fract() != 0.0 => {
            let rounded: f64 = format!("{:.*e}", SIGNIFICANT_DIGITS - 1, v)
                .parse()
                .unwrap_or(v);
            rounded.to_string().into()
        }
        _ => value.into(),
    }
}

/// The content type of [`Registry::render_prometheus`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractional_values_lose_the_tail_of_float_sums_only() {
        assert_eq!(tidy_value("0.0006090409999999999"), "0.000609041");
        assert_eq!(tidy_value("0.00030000000000000003"), "0.0003");
        assert_eq!(tidy_value("1764241334.27"), "1764241334.27");
        assert_eq!(tidy_value("0.000123456789012"), "0.000123456789012");
        for kept in ["0", "17", "123456789012345678", "+Inf", "NaN", "0.25"] {
            assert_eq!(tidy_value(kept), kept);
        }
    }

    /// A histogram's `_sum` as `/metrics` shows it: the observations' sum
    /// without the float's tail.
    #[test]
    fn a_rendered_histogram_sum_has_no_float_tail() {
        let desc = "metrics_test_sum_without_tail";
        // What Rust writes for the sum itself: the tail the issue saw.
        assert_eq!((0.0001f64 + 0.0002).to_string(), "0.00030000000000000003");
        let registry = global();
        for micros in [100, 200] {
            registry.record_txn(desc, true, 0, Duration::from_micros(micros));
        }
        let text = registry.render_prometheus();
        let sum = text
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "synapse_storage_transaction_time_sum{{desc=\"{desc}\"}}"
                ))
            })
            .unwrap_or_else(|| panic!("no _sum for {desc}:\n{text}"));
        assert!(sum.ends_with(" 0.0003"), "{sum}");
        let count = format!("synapse_storage_transaction_time_count{{desc=\"{desc}\"}} 2");
        assert!(text.lines().any(|l| l == count), "{text}");
    }
}
