//! Prometheus metrics without a metrics framework: counters, gauges and histograms on
//! atomics, the text exposition format (version 0.0.4), and a small HTTP server for
//! `GET /metrics`. votingd and the router each keep their own series and render them
//! on a scrape; the etcd error counter both report is `refvote_cluster::store`'s.
//!
//! Label sets are bounded: a [`Family`] keeps at most `max` series and folds the rest
//! into one series whose labels are all `"other"`, so a client sending made-up method
//! names cannot grow the process's memory.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
    /// Adds one until the guard is dropped (work in flight).
    pub fn track(&self) -> GaugeGuard<'_> {
        self.0.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(self)
    }
}

/// Takes the one [`Gauge::track`] added back off when dropped.
pub struct GaugeGuard<'a>(&'a Gauge);

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        (self.0).0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Upper bounds (seconds) for latencies from a millisecond to a minute: votes wait for
/// the slowest replica's git, which can take long on a big push.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Observations counted into fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last one is `+Inf`.
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    /// The sum in nanoseconds-of-a-unit: keeps it an atomic integer.
    sum_nanos: AtomicU64,
}

/// A histogram of durations in seconds, over [`LATENCY_BUCKETS`].
impl Default for Histogram {
    fn default() -> Histogram {
        Histogram::new(LATENCY_BUCKETS)
    }
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add((v.max(0.0) * 1e9) as u64, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// One metric per label-value set, at most `max` of them.
#[derive(Debug)]
pub struct Family<M> {
    labels: &'static [&'static str],
    max: usize,
    series: Mutex<BTreeMap<Vec<String>, Arc<M>>>,
}

impl<M: Default> Family<M> {
    pub fn new(labels: &'static [&'static str], max: usize) -> Family<M> {
        Family {
            labels,
            max: max.max(1),
            series: Mutex::new(BTreeMap::new()),
        }
    }

    /// The series for `values` (one per label, in order), created on first use.
    pub fn with(&self, values: &[&str]) -> Arc<M> {
        debug_assert_eq!(values.len(), self.labels.len());
        let mut series = self.series.lock().expect("poisoned");
        let key: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        if let Some(m) = series.get(&key) {
            return m.clone();
        }
        let key = if series.len() + 1 >= self.max {
            vec!["other".to_owned(); self.labels.len()]
        } else {
            key
        };
        series.entry(key).or_default().clone()
    }

    fn snapshot(&self) -> Vec<(Vec<String>, Arc<M>)> {
        let series = self.series.lock().expect("poisoned");
        series.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Builds the text exposition format.
#[derive(Debug, Default)]
pub struct Text(String);

impl Text {
    pub fn new() -> Text {
        Text::default()
    }

    fn header(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.header(name, help, "counter");
        let _ = writeln!(self.0, "{name} {value}");
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: i64) {
        self.header(name, help, "gauge");
        let _ = writeln!(self.0, "{name} {value}");
    }

    pub fn counter_family(&mut self, name: &str, help: &str, family: &Family<Counter>) {
        self.header(name, help, "counter");
        for (values, c) in family.snapshot() {
            let labels = labels(family.labels, &values);
            let _ = writeln!(self.0, "{name}{labels} {}", c.get());
        }
    }

    /// A counter with one series per given label value, all present even at zero, so
    /// a dashboard can rely on them.
    pub fn counter_by(&mut self, name: &str, help: &str, label: &str, series: &[(&str, u64)]) {
        self.header(name, help, "counter");
        for (value, n) in series {
            let labels = labels(&[label], &[(*value).to_owned()]);
            let _ = writeln!(self.0, "{name}{labels} {n}");
        }
    }

    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.header(name, help, "histogram");
        let mut cumulative = 0;
        for (i, bucket) in h.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = h
                .bounds
                .get(i)
                .map(|b| b.to_string())
                .unwrap_or_else(|| "+Inf".into());
            let _ = writeln!(self.0, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(self.0, "{name}_sum {sum}");
        // Written from the buckets, so count always equals the +Inf bucket.
        let _ = writeln!(self.0, "{name}_count {cumulative}");
    }

    pub fn finish(self) -> String {
        self.0
    }
}

fn labels(names: &[&str], values: &[String]) -> String {
    let mut out = String::from("{");
    for (i, (n, v)) in names.iter().zip(values).enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{n}=\"{}\"", escape(v));
    }
    out.push('}');
    out
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the whole exposition on each scrape; may read etcd, so it is async.
pub type Render = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// Binds `addr` for [`serve`]; separate so a bad address fails start-up.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `GET /metrics` (HTTP/1.1) on `listener` until the task is aborted.
pub fn serve(listener: TcpListener, render: Render) -> JoinHandle<()> {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Method, Response, StatusCode};

    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let render = render.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let render = render.clone();
                    async move {
                        let resp = if req.uri().path() != "/metrics" {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"try /metrics\n")))
                        } else if req.method() != Method::GET && req.method() != Method::HEAD {
                            Response::builder()
                                .status(StatusCode::METHOD_NOT_ALLOWED)
                                .body(Full::new(Bytes::from_static(b"GET only\n")))
                        } else {
                            Response::builder()
                                .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                                .body(Full::new(Bytes::from(render().await)))
                        };
                        Ok::<_, std::convert::Infallible>(resp.expect("static response parts"))
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let conn = hyper::server::conn::http1::Builder::new()
                    .header_read_timeout(Duration::from_secs(10))
                    .timer(hyper_util::rt::TokioTimer::new())
                    .serve_connection(io, svc);
                let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(0.5);
        h.observe(7.0);
        let mut t = Text::new();
        t.histogram("x_seconds", "help", &h);
        let text = t.finish();
        assert!(text.contains("x_seconds_bucket{le=\"0.1\"} 1\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"1\"} 3\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"+Inf\"} 4\n"), "{text}");
        assert!(text.contains("x_seconds_count 4\n"), "{text}");
        assert!(text.contains("x_seconds_sum 8.05"), "{text}");
    }

    #[test]
    fn families_are_bounded_and_escaped() {
        let f: Family<Counter> = Family::new(&["method", "code"], 3);
        f.with(&["/a", "OK"]).inc();
        f.with(&["/a", "OK"]).inc();
        f.with(&["/b\"", "OK"]).inc();
        f.with(&["/c", "OK"]).inc();
        f.with(&["/d", "OK"]).inc();
        let mut t = Text::new();
        t.counter_family("calls_total", "help", &f);
        let text = t.finish();
        assert!(
            text.contains("calls_total{method=\"/a\",code=\"OK\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("calls_total{method=\"/b\\\"\",code=\"OK\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("calls_total{method=\"other\",code=\"other\"} 2\n"),
            "{text}"
        );
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 3);
    }

    #[test]
    fn gauge_guard_takes_back_what_it_added() {
        let g = Gauge::default();
        {
            let _a = g.track();
            let _b = g.track();
            assert_eq!(g.get(), 2);
        }
        assert_eq!(g.get(), 0);
    }
}
