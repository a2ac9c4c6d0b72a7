//! Prometheus metrics, on a registry owned by the app (no global). Counters
//! are bumped where things happen; gauges about the queue come from the
//! store when `/metrics` is scraped (see `gauges.rs`), so they are right
//! after a restart.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Webhooks by source and outcome (accepted, duplicate, unauthorized,
    /// store_unavailable, ...).
    pub webhooks: IntCounterVec,
    /// Deliveries created or finished in this process, by state reached.
    pub deliveries_total: IntCounterVec,
    /// Deliveries in each state but delivered, from the store (see `gauges.rs`).
    pub deliveries: IntGaugeVec,
    /// Market requests by HTTP status ("none" for no answer) and API error code.
    pub market_requests: IntCounterVec,
    pub send_latency: HistogramVec,
    pub queue_depth: IntGaugeVec,
    pub oldest_pending_age: IntGaugeVec,
    /// How old the reading of the three queue gauges above is (no labels).
    pub queue_gauges_age: GaugeVec,
    pub quota_used: IntGaugeVec,
    pub quota_limit: IntGaugeVec,
    pub config_reloads: IntCounterVec,
    /// 1 while the store takes writes, 0 during an outage (`store::health`).
    pub store_up: IntGauge,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let send_latency = HistogramVec::new(
            HistogramOpts::new(
                "chatbridge_send_latency_seconds",
                "Time of one Market send request",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["business"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(send_latency.clone()))
            .expect("unique metric");
        Self {
            webhooks: counter(
                &registry,
                "chatbridge_webhooks_total",
                "Webhooks received, by source and outcome",
                &["source", "outcome"],
            ),
            deliveries_total: counter(
                &registry,
                "chatbridge_deliveries_total",
                "Deliveries that reached a state in this process",
                &["state"],
            ),
            deliveries: gauge(
                &registry,
                "chatbridge_deliveries",
                "Deliveries now in each open state",
                &["state"],
            ),
            market_requests: counter(
                &registry,
                "chatbridge_market_requests_total",
                "Market API requests by HTTP status and API error code",
                &["status", "code"],
            ),
            send_latency,
            queue_depth: gauge(
                &registry,
                "chatbridge_queue_depth",
                "Deliveries waiting to be sent, per business",
                &["business"],
            ),
            oldest_pending_age: gauge(
                &registry,
                "chatbridge_oldest_pending_age_seconds",
                "Age of the oldest waiting delivery, per business",
                &["business"],
            ),
            queue_gauges_age: {
                let g = GaugeVec::new(
                    Opts::new(
                        "chatbridge_queue_gauges_age_seconds",
                        "How old the reading of chatbridge_deliveries, chatbridge_queue_depth and \
                         chatbridge_oldest_pending_age_seconds is (0: read at this scrape)",
                    ),
                    &[],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            quota_used: gauge(
                &registry,
                "chatbridge_quota_used",
                "Sends counted in the current quota window, per business",
                &["business"],
            ),
            quota_limit: gauge(
                &registry,
                "chatbridge_quota_limit",
                "Sends allowed per quota window, per business",
                &["business"],
            ),
            config_reloads: counter(
                &registry,
                "chatbridge_config_reloads_total",
                "Configuration reloads by outcome (applied, refused)",
                &["outcome"],
            ),
            store_up: {
                let g = IntGauge::new(
                    "chatbridge_store_up",
                    "1 while the database takes writes, 0 while it is unavailable",
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
