//! Prometheus metrics: request counts and latencies per route.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A request's labels, without an allocation per request: the method's
/// name and the route template are `'static` ([`method_label`],
/// [`Metrics::route_label`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: &'static str,
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub route: &'static str,
}

/// A method's label: its name for the methods HTTP defines, `OTHER` for
/// an extension method (which could otherwise add a label value per name a
/// client makes up).
pub fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub source: &'static str,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

/// A source's label without an allocation per event (labels are counted
/// for every event): the sources Tally has, or `other`.
pub fn source_label(source: &str) -> &'static str {
    match source {
        "http" => "http",
        "pubsub" => "pubsub",
        "kafka" => "kafka",
        "nats" => "nats",
        "replay" => "replay",
        "webhook" => "webhook",
        _ => "other",
    }
}

pub struct Metrics {
    registry: Mutex<Registry>,
    /// The route templates seen, each kept once for the life of the
    /// process: a route's label is then a `&'static str`. The templates are
    /// the router's (plus `unmatched`), so this holds a few dozen at most.
    routes: std::sync::RwLock<std::collections::HashSet<&'static str>>,
    requests: Family<RouteLabels, Counter>,
    latency: Family<LatencyLabels, Histogram>,
    events: Family<EventLabels, Counter>,
    /// Messages a stream consumer has not processed yet (Kafka lag, NATS pending).
    pub consumer_lag: Family<SourceLabels, prometheus_client::metrics::gauge::Gauge>,
    /// Stream consumers running in this process (1 from start until it has
    /// stopped and left its group; on PostgreSQL only the writer's server).
    pub stream_consumers: Family<SourceLabels, prometheus_client::metrics::gauge::Gauge>,
    /// Errors a stream consumer met (its broker unreachable, a stream
    /// missing, a fetch failed): a consumer that runs but does not consume
    /// shows here, and in the rate of `events`.
    stream_errors: Family<SourceLabels, Counter>,
    webhook_attempts: Family<EventLabels, Counter>,
    /// From an event's arrival (parsed) to its durable result, per source.
    event_latency: Family<SourceLabels, Histogram>,
    /// The writer's failures ([`tally_store::WriteFailures`]), read at
    /// each scrape.
    write_groups_failed: Counter,
    write_commands_failed: Counter,
    tick_quarantined: prometheus_client::metrics::gauge::Gauge,
}

/// Buckets from 0.5 ms to 2.5 s, for request and event latencies.
fn latency_histogram() -> Histogram {
    Histogram::new(
        [
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ]
        .into_iter(),
    )
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tally");
        let requests = Family::<RouteLabels, Counter>::default();
        let latency = Family::<LatencyLabels, Histogram>::new_with_constructor(latency_histogram);
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route",
            latency.clone(),
        );
        let events = Family::<EventLabels, Counter>::default();
        registry.register(
            "events",
            "Usage events by source and result (charged, duplicate, rejected: rejected ones are dead letters)",
            events.clone(),
        );
        let consumer_lag =
            Family::<SourceLabels, prometheus_client::metrics::gauge::Gauge>::default();
        registry.register(
            "consumer_lag",
            "Messages a stream consumer has not processed yet",
            consumer_lag.clone(),
        );
        let stream_consumers =
            Family::<SourceLabels, prometheus_client::metrics::gauge::Gauge>::default();
        registry.register(
            "stream_consumers",
            "Stream consumers running in this process, by source (on PostgreSQL, only on the server that runs the writer)",
            stream_consumers.clone(),
        );
        let stream_errors = Family::<SourceLabels, Counter>::default();
        registry.register(
            "stream_errors",
            "Errors a stream consumer met (broker unreachable, stream missing, fetch failed), by source",
            stream_errors.clone(),
        );
        let event_latency =
            Family::<SourceLabels, Histogram>::new_with_constructor(latency_histogram);
        registry.register(
            "event_charge_duration_seconds",
            "Time from a usage event's arrival to its durable result (charged, duplicate or dead letter), by source",
            event_latency.clone(),
        );
        let webhook_attempts = Family::<EventLabels, Counter>::default();
        registry.register(
            "webhook_attempts",
            "Webhook delivery attempts by result (ok, failed)",
            webhook_attempts.clone(),
        );
        let write_groups_failed = Counter::default();
        registry.register(
            "write_groups_failed",
            "Write groups the database refused as they first ran, since this process started; their commands were applied again in smaller groups",
            write_groups_failed.clone(),
        );
        let write_commands_failed = Counter::default();
        registry.register(
            "write_commands_failed",
            "Commands the database refused even on their own (answered 503 unavailable), since this process started",
            write_commands_failed.clone(),
        );
        let tick_quarantined = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(
            "tick_quarantined_customers",
            "Customers whose expiries and renewals could not be written, left out of ticks for ten minutes",
            tick_quarantined.clone(),
        );
        Metrics {
            write_groups_failed,
            write_commands_failed,
            tick_quarantined,
            routes: Default::default(),
            event_latency,
            webhook_attempts,
            registry: Mutex::new(registry),
            requests,
            latency,
            events,
            consumer_lag,
            stream_consumers,
            stream_errors,
        }
    }
}

impl Metrics {
    /// Count one webhook delivery attempt.
    pub fn webhook_attempt(&self, ok: bool) {
        self.webhook_attempts
            .get_or_create(&EventLabels {
                source: "webhook",
                status: if ok { "ok" } else { "failed" },
            })
            .inc();
    }

    /// Count one usage event from `source` with its result.
    pub fn events(&self, source: &str, status: &'static str) {
        self.events
            .get_or_create(&EventLabels {
                source: source_label(source),
                status,
            })
            .inc();
    }

    /// Record how long one event from `source` took to its durable result.
    /// A stream consumer of `source` met an error (see `stream_errors`).
    pub fn stream_error(&self, source: &'static str) {
        self.stream_errors
            .get_or_create(&SourceLabels { source })
            .inc();
    }

    pub fn event_latency(&self, source: &str, took: std::time::Duration) {
        self.event_latency
            .get_or_create(&SourceLabels {
                source: source_label(source),
            })
            .observe(took.as_secs_f64());
    }

    /// A route template's label: `route` itself the first time it is seen
    /// (kept for the life of the process), the same `&'static str` after.
    /// Only the router's templates come here (`edge::gate`).
    pub fn route_label(&self, route: &str) -> &'static str {
        if let Some(&known) = self.routes.read().expect("routes").get(route) {
            return known;
        }
        let mut routes = self.routes.write().expect("routes");
        if let Some(&known) = routes.get(route) {
            return known;
        }
        let kept: &'static str = Box::leak(route.to_owned().into_boxed_str());
        routes.insert(kept);
        kept
    }

    /// Count and time a request by its route template (`edge::gate`).
    pub fn request(
        &self,
        method: &'static str,
        route: &'static str,
        status: axum::http::StatusCode,
        took: std::time::Duration,
    ) {
        self.requests
            .get_or_create(&RouteLabels {
                method,
                route,
                status: status.as_u16(),
            })
            .inc();
        self.latency
            .get_or_create(&LatencyLabels { route })
            .observe(took.as_secs_f64());
    }

    /// Show the writer's failures (at each scrape).
    pub fn write_failures(&self, failures: tally_store::WriteFailures) {
        // The store counts; each scrape adds what it counted since the last
        // (under the registry's lock, so two scrapes do not both add it).
        let _registry = self.registry.lock().expect("registry");
        for (counter, total) in [
            (&self.write_groups_failed, failures.groups),
            (&self.write_commands_failed, failures.commands),
        ] {
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        self.tick_quarantined
            .set(i64::try_from(failures.quarantined).unwrap_or(i64::MAX));
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(
            &mut text,
            &self.registry.lock().expect("registry"),
        )
        .expect("metrics encode");
        text
    }
}
