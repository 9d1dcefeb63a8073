//! Process-wide counters for `/metrics`: caches, transactions, and gauges that
//! higher layers set (queue depth, replication position).
//!
//! Kept deliberately small: plain atomics and a mutex-guarded map, rendered in the
//! Prometheus text format on demand.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Hits and misses of one cache.
#[derive(Debug, Default)]
pub struct CacheStats {
    name: String,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    invalidations: AtomicU64,
    /// What the cache holds, in bytes, as its entries count them.
    bytes: AtomicU64,
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
    pub(crate) fn set_bytes(&self, bytes: usize) {
        self.bytes.store(bytes as u64, Ordering::Relaxed);
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

/// The registry all stores of a process report into.
#[derive(Debug, Default)]
pub struct Registry {
    caches: Mutex<Vec<Arc<CacheStats>>>,
    txns: Mutex<BTreeMap<String, TxnStats>>,
    gauges: Mutex<BTreeMap<String, (String, f64)>>,
}

/// The process's registry.
pub fn global() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

impl Registry {
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

    /// The counters of transactions described as `desc`.
    pub fn txn_stats(&self, desc: &str) -> TxnStats {
        self.txns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(desc)
            .copied()
            .unwrap_or_default()
    }

    /// Sets a gauge, e.g. `persistence_queue_depth`.
    pub fn set_gauge(&self, name: &str, help: &str, value: f64) {
        self.gauges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), (help.to_owned(), value));
    }

    /// Everything, in the Prometheus text exposition format.
    pub fn render_prometheus(&self) -> String {
        let mut out = String::new();
        let caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        // Several stores in one process may register a cache under the same name.
        let mut by_name: BTreeMap<&str, [u64; 5]> = BTreeMap::new();
        for c in caches.iter() {
            let e = by_name.entry(c.name()).or_default();
            e[0] += c.hits();
            e[1] += c.misses();
            e[2] += c.evictions();
            e[3] += c.invalidations();
            e[4] += c.bytes();
        }
        for (i, metric) in ["hits", "misses", "evictions", "invalidations"]
            .iter()
            .enumerate()
        {
            let _ = writeln!(out, "# TYPE hs_cache_{metric}_total counter");
            for (name, v) in &by_name {
                let _ = writeln!(out, "hs_cache_{metric}_total{{cache=\"{name}\"}} {}", v[i]);
            }
        }
        let _ = writeln!(
            out,
            "# HELP hs_cache_bytes What a cache holds, in bytes, as its entries count them.\n\
             # TYPE hs_cache_bytes gauge"
        );
        for (name, v) in &by_name {
            let _ = writeln!(out, "hs_cache_bytes{{cache=\"{name}\"}} {}", v[4]);
        }
        let txns = self.txns.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "# TYPE hs_transactions_total counter");
        for (desc, s) in txns.iter() {
            let _ = writeln!(
                out,
                "hs_transactions_total{{desc=\"{desc}\",outcome=\"committed\"}} {}",
                s.committed
            );
            let _ = writeln!(
                out,
                "hs_transactions_total{{desc=\"{desc}\",outcome=\"failed\"}} {}",
                s.failed
            );
        }
        let _ = writeln!(out, "# TYPE hs_transaction_retries_total counter");
        for (desc, s) in txns.iter() {
            let _ = writeln!(
                out,
                "hs_transaction_retries_total{{desc=\"{desc}\"}} {}",
                s.retries
            );
        }
        let _ = writeln!(out, "# TYPE hs_transaction_seconds_total counter");
        for (desc, s) in txns.iter() {
            let _ = writeln!(
                out,
                "hs_transaction_seconds_total{{desc=\"{desc}\"}} {}",
                s.seconds
            );
        }
        let gauges = self.gauges.lock().unwrap_or_else(|p| p.into_inner());
        for (name, (help, value)) in gauges.iter() {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        out
    }
}
