//! OpenTelemetry traces of commands and agent calls, exported over OTLP/HTTP (`[traces]`).
//!
//! Off unless `[traces] endpoint` is set; off, every hook is one test of `None`.
//!
//! **Where a trace starts.** A node starts a trace only for what a client sent it: a command on
//! the shared queue or on the node's own subject, and a call to one of its agents. It follows
//! the client's W3C `traceparent` header when there is one (the client decided: a sampled
//! parent is recorded, an unsampled one is not), and otherwise records `sample_ratio` of them.
//! A command relayed or forwarded by another node continues the trace it carries and never
//! starts one: the node that took the command decided for the whole path.
//!
//! **How it travels.** Only recorded spans travel on: a relayed command and an agent call carry
//! `traceparent` in their NATS headers; a forward batch, which has one header set for many
//! commands, carries it per command (`forward::Request::trace`). An unsampled command carries
//! nothing and costs nothing further.
//!
//! **Where spans go.** Ended spans go to the SDK's batch queue, bounded by `queue`; past the
//! bound a span is dropped, never waited for. The SDK's own thread sends them every
//! `export_interval_ms`; its HTTP requests run on the node's runtime (`OnRuntime`), and a
//! failed export is logged (at most once a minute), never retried past the SDK's own policy.

pub mod sink;

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use bytes::Bytes;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};
use serde::{Deserialize, Serialize};

/// The W3C Trace Context header, on NATS messages as on HTTP.
pub const TRACEPARENT: &str = "traceparent";

/// The node's `[traces]` config section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracesConfig {
    /// Base URL of an OTLP/HTTP receiver (`http://127.0.0.1:4318`, as
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`); spans go to `<endpoint>/v1/traces` as protobuf. Plain
    /// HTTP only: put a collector beside the node for TLS. Unset: no traces.
    pub endpoint: Option<String>,
    /// Share (0 to 1) of the traces this node starts itself that it records. A client's own
    /// `traceparent` decides for its command instead.
    pub sample_ratio: f64,
    /// Most ended spans waiting for export; past it new spans are dropped.
    pub queue: usize,
    /// How often (ms) waiting spans are sent.
    pub export_interval_ms: u64,
}

impl Default for TracesConfig {
    fn default() -> Self {
        TracesConfig {
            endpoint: None,
            sample_ratio: 0.01,
            queue: 2048,
            export_interval_ms: 1000,
        }
    }
}

impl TracesConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(e) = &self.endpoint {
            traces_url(e)?;
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            anyhow::bail!(
                "traces.sample_ratio must be between 0 and 1, not {}",
                self.sample_ratio
            );
        }
        if !(1..=1_000_000).contains(&self.queue) {
            anyhow::bail!(
                "traces.queue must be between 1 and 1000000, not {}",
                self.queue
            );
        }
        if !(10..=60_000).contains(&self.export_interval_ms) {
            anyhow::bail!(
                "traces.export_interval_ms must be between 10 and 60000, not {}",
                self.export_interval_ms
            );
        }
        Ok(())
    }
}

/// `<endpoint>/v1/traces`, for an `http://` endpoint.
fn traces_url(endpoint: &str) -> anyhow::Result<String> {
    let uri: http::Uri = endpoint
        .parse()
        .with_context(|| format!("traces.endpoint {endpoint:?} is not a URL"))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        anyhow::bail!(
            "traces.endpoint {endpoint:?} must be an http:// URL of an OTLP/HTTP receiver (for \
             TLS, run a collector beside the node)"
        );
    }
    Ok(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
}

/// A node's tracer and the provider that exports its spans.
pub struct Traces {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
}

impl Traces {
    /// The tracer of node `node` of `cluster`, if `[traces]` has an endpoint. Must be called
    /// on the node's runtime, which the exports then use.
    pub fn start(cfg: &TracesConfig, cluster: &str, node: u64) -> anyhow::Result<Option<Traces>> {
        let Some(endpoint) = &cfg.endpoint else {
            return Ok(None);
        };
        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(cfg.sample_ratio)));
        let attributes = [
            KeyValue::new("service.instance.id", format!("{cluster}/node-{node}")),
            KeyValue::new("warden.cluster", cluster.to_string()),
            KeyValue::new("warden.node", node as i64),
        ];
        let provider = provider(
            endpoint,
            sampler,
            attributes,
            cfg.queue,
            Duration::from_millis(cfg.export_interval_ms),
        )?;
        Ok(Some(Traces {
            tracer: provider.tracer("warden"),
            provider,
        }))
    }

    /// A span of what a client sent: the child of its `traceparent` if it has one (recorded
    /// as that says), else a new trace recorded at the sampling ratio. `name` is made only
    /// for a span that is recorded.
    pub fn take(&self, name: impl FnOnce() -> String, traceparent: Option<&str>) -> Span {
        let parent = traceparent.map(remote).unwrap_or_default();
        self.open_named(name, &parent)
    }

    /// A span continuing `traceparent` (as another node sent it); nothing without one.
    pub fn continued(&self, name: impl FnOnce() -> String, traceparent: Option<&str>) -> Span {
        let Some(parent) = traceparent.map(remote) else {
            return Span::none();
        };
        if !parent.span().span_context().is_sampled() {
            return Span::none();
        }
        self.open_named(name, &parent)
    }

    /// A server span, named once it is known to be recorded: the sampler decides on the trace
    /// id and the parent, not on the name, so the 99% a ratio drops cost no name.
    fn open_named(&self, name: impl FnOnce() -> String, parent: &Context) -> Span {
        let builder = SpanBuilder::from_name("received").with_kind(SpanKind::Server);
        let mut span = self.tracer.build_with_context(builder, parent);
        if !span.span_context().is_sampled() {
            return Span::none();
        }
        span.update_name(name());
        Span(Some(Box::new(parent.with_span(span))))
    }

    /// A span of `parent`'s trace, if `parent` is recorded.
    pub fn child(&self, parent: &Span, name: impl Into<Cow<'static, str>>, kind: SpanKind) -> Span {
        match &parent.0 {
            Some(cx) => self.open(name, kind, cx),
            None => Span::none(),
        }
    }

    /// A span of `parent`'s trace that began at `start` and ended at `end` (both already past).
    pub fn past(
        &self,
        parent: &Span,
        name: &'static str,
        start: SystemTime,
        end: SystemTime,
        attributes: Vec<KeyValue>,
    ) {
        let Some(cx) = &parent.0 else { return };
        let builder = SpanBuilder::from_name(name)
            .with_kind(SpanKind::Internal)
            .with_start_time(start)
            .with_attributes(attributes);
        let mut span = self.tracer.build_with_context(builder, cx);
        span.end_with_timestamp(end);
    }

    fn open(&self, name: impl Into<Cow<'static, str>>, kind: SpanKind, parent: &Context) -> Span {
        let builder = SpanBuilder::from_name(name).with_kind(kind);
        let span = self.tracer.build_with_context(builder, parent);
        if !span.span_context().is_sampled() {
            return Span::none(); // dropping a span that records nothing exports nothing
        }
        Span(Some(Box::new(parent.with_span(span))))
    }

    /// Sends what is still queued and stops the export thread; waits at most `within`.
    /// Blocking: call it off the async threads.
    pub fn shutdown(&self, within: Duration) {
        if let Err(e) = self.provider.shutdown_with_timeout(within) {
            tracing::debug!(error = %e, "traces did not shut down cleanly");
        }
    }
}

impl Drop for Traces {
    /// Shutting the provider down waits for its export thread, whose export may wait for
    /// this very runtime: never on an async thread, so on a thread of its own (a no-op after
    /// `shutdown`).
    fn drop(&mut self) {
        let provider = self.provider.clone();
        let closing = std::thread::Builder::new()
            .name("warden-traces-close".into())
            .spawn(move || {
                let _ = provider.shutdown_with_timeout(Duration::from_secs(1));
            });
        if let Err(e) = closing {
            // The provider's own drop would wait for its export here: leave it be instead.
            tracing::warn!(error = %e, "could not close the traces on a thread; leaving them");
            std::mem::forget(self.provider.clone());
        }
    }
}

/// A tracer provider exporting to `endpoint` over OTLP/HTTP from a bounded batch queue.
/// Must be called on a Tokio runtime, which the exports use.
pub fn provider(
    endpoint: &str,
    sampler: Sampler,
    attributes: impl IntoIterator<Item = KeyValue>,
    queue: usize,
    interval: Duration,
) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let url = traces_url(endpoint)?;
    let client = OnRuntime {
        client: opentelemetry_http::hyper::HyperClient::with_default_connector(
            EXPORT_TIMEOUT,
            None,
        ),
        handle: tokio::runtime::Handle::try_current()
            .context("traces are exported from a Tokio runtime")?,
        failed_log: Arc::new(AtomicU64::new(0)),
        endpoint: url.clone(),
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        // Whatever OTEL_EXPORTER_OTLP_PROTOCOL says: this exporter speaks protobuf over HTTP.
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(url)
        .with_timeout(EXPORT_TIMEOUT)
        .build()?;
    let batch = BatchConfigBuilder::default()
        .with_max_queue_size(queue)
        .with_max_export_batch_size(queue.min(512))
        .with_scheduled_delay(interval)
        .build();
    let resource = opentelemetry_sdk::Resource::builder_empty()
        .with_service_name("warden")
        .with_attributes(attributes)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_sampler(sampler)
        .with_resource(resource)
        .with_span_processor(
            BatchSpanProcessor::builder(exporter)
                .with_batch_config(batch)
                .build(),
        )
        .build())
}

/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// A span of this node's part of a trace, or nothing: tracing is off, or this trace is not
/// recorded. One pointer wide. Ends when ended or dropped.
#[derive(Default)]
pub struct Span(Option<Box<Context>>);

impl Span {
    pub const fn none() -> Span {
        Span(None)
    }

    pub fn is_recording(&self) -> bool {
        self.0.is_some()
    }

    /// The `traceparent` that continues this span elsewhere.
    pub fn traceparent(&self) -> Option<String> {
        let cx = self.0.as_deref()?;
        let mut into = Traceparent(None);
        TraceContextPropagator::new().inject_context(cx, &mut into);
        into.0
    }

    /// Adds the `traceparent` header that continues this span, if it is recorded.
    pub fn inject(&self, headers: &mut async_nats::HeaderMap) {
        if let Some(tp) = self.traceparent() {
            headers.insert(TRACEPARENT, tp.as_str());
        }
    }

    pub fn set(&self, key: &'static str, value: impl Into<Value>) {
        if let Some(cx) = &self.0 {
            cx.span().set_attribute(KeyValue::new(key, value));
        }
    }

    pub fn event(&self, name: &'static str) {
        if let Some(cx) = &self.0 {
            cx.span().add_event(name, vec![]);
        }
    }

    /// Marks the span failed, with why.
    pub fn fail(&self, code: &'static str, why: impl Into<Cow<'static, str>>) {
        if let Some(cx) = &self.0 {
            let span = cx.span();
            span.set_attribute(KeyValue::new("warden.error", code));
            span.set_status(Status::error(why));
        }
    }

    pub fn end(self) {
        if let Some(cx) = self.0 {
            cx.span().end();
        }
    }

    /// Ends the span at `at` (a moment already past).
    pub fn end_at(self, at: SystemTime) {
        if let Some(cx) = self.0 {
            cx.span().end_with_timestamp(at);
        }
    }
}

/// The longest `traceparent` read: version 00 takes 55 bytes, and a later version may only add
/// to it; a longer value is ignored before it is parsed.
const TRACEPARENT_MAX: usize = 256;

/// The context of a `traceparent` value (an invalid one gives an empty context: a new trace).
fn remote(traceparent: &str) -> Context {
    if traceparent.len() > TRACEPARENT_MAX {
        return Context::new();
    }
    struct One<'a>(&'a str);
    impl Extractor for One<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            (key == TRACEPARENT).then_some(self.0)
        }
        fn keys(&self) -> Vec<&str> {
            vec![TRACEPARENT]
        }
    }
    TraceContextPropagator::new().extract(&One(traceparent))
}

/// Catches the `traceparent` the propagator writes.
struct Traceparent(Option<String>);

impl Injector for Traceparent {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            self.0 = Some(value);
        }
    }
}

/// `traceparent` of the current span of `cx`, for a client's request (nodes read no
/// `tracestate`, so none is sent).
pub fn inject_into(cx: &Context, headers: &mut async_nats::HeaderMap) {
    let mut into = Traceparent(None);
    TraceContextPropagator::new().inject_context(cx, &mut into);
    if let Some(tp) = into.0 {
        headers.insert(TRACEPARENT, tp.as_str());
    }
}

/// The exporter's HTTP client: hyper's, each request run on the runtime the provider was
/// made on (the SDK's export thread has none), and a failure logged at most once a minute.
#[derive(Debug, Clone)]
struct OnRuntime {
    client: opentelemetry_http::hyper::HyperClient,
    handle: tokio::runtime::Handle,
    /// When a failure was last logged (seconds since the epoch).
    failed_log: Arc<AtomicU64>,
    endpoint: String,
}

impl OnRuntime {
    fn failed(&self, why: &str) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.failed_log.load(Ordering::Relaxed);
        if now >= last + 60
            && self
                .failed_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(endpoint = %self.endpoint, why, "could not export traces; spans are dropped meanwhile (logged once a minute)");
        }
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let sent = self
            .handle
            .spawn(async move { client.send_bytes(request).await })
            .await;
        let out = match sent {
            Ok(out) => out,
            Err(e) => Err(format!("the export task ended: {e}").into()),
        };
        match &out {
            Ok(r) if !r.status().is_success() => self.failed(&format!("HTTP {}", r.status())),
            Ok(_) => {}
            Err(e) => self.failed(&e.to_string()),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_takes_http_endpoints_and_bounded_values_only() {
        let ok = TracesConfig {
            endpoint: Some("http://127.0.0.1:4318/".into()),
            ..Default::default()
        };
        ok.validate().unwrap();
        assert_eq!(
            traces_url("http://127.0.0.1:4318/").unwrap(),
            "http://127.0.0.1:4318/v1/traces"
        );
        for bad in [
            TracesConfig {
                endpoint: Some("https://collector:4318".into()),
                ..Default::default()
            },
            TracesConfig {
                endpoint: Some("not a url".into()),
                ..Default::default()
            },
            TracesConfig {
                sample_ratio: 1.5,
                ..Default::default()
            },
            TracesConfig {
                queue: 0,
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_traceparent_round_trips_and_junk_starts_nothing() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let cx = remote(tp);
        assert!(cx.span().span_context().is_sampled());
        let mut into = Traceparent(None);
        TraceContextPropagator::new().inject_context(&cx, &mut into);
        assert_eq!(into.0.as_deref(), Some(tp));
        let long = format!("{tp}{}", "-".repeat(TRACEPARENT_MAX));
        for junk in [
            "",
            "00-zz-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            &long,
        ] {
            assert!(!remote(junk).span().span_context().is_valid(), "{junk:?}");
        }
    }
}
