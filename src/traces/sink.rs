//! An OTLP/HTTP receiver of traces on loopback, for `warden bench --traces-cost` and the tests:
//! it decodes every export (protobuf, as a collector does) and keeps what it was sent. It
//! answers only `POST /v1/traces`, takes bodies of at most `MAX_BODY` bytes, and keeps at most
//! `keep` spans (it counts the rest).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use prost::Message;

/// Largest export body taken.
const MAX_BODY: usize = 16 << 20;

/// One received span, as decoded.
#[derive(Debug, Clone)]
pub struct Received {
    /// Hex, as in `traceparent`.
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// The exporting process's resource attributes (`warden.node`, `service.name`, ...).
    pub resource: HashMap<String, String>,
    pub attributes: HashMap<String, String>,
    pub start_ns: u64,
    pub end_ns: u64,
}

#[derive(Default)]
struct Shared {
    spans: Mutex<Vec<Received>>,
    received: AtomicU64,
    exports: AtomicU64,
}

/// A running receiver; it stops when dropped.
pub struct Sink {
    /// Its base URL, for `[traces] endpoint`.
    pub endpoint: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sink {
    /// Listens on a free loopback port; keeps at most `keep` spans.
    pub async fn start(keep: usize) -> anyhow::Result<Sink> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(serve(listener, shared.clone(), keep));
        Ok(Sink {
            endpoint,
            shared,
            task,
        })
    }

    /// The spans kept so far.
    pub fn spans(&self) -> Vec<Received> {
        self.shared
            .spans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Spans received so far, kept or not.
    pub fn received(&self) -> u64 {
        self.shared.received.load(Ordering::Relaxed)
    }

    /// Export requests decoded so far.
    pub fn exports(&self) -> u64 {
        self.shared.exports.load(Ordering::Relaxed)
    }
}

async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>, keep: usize) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await; // out of descriptors: wait
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&shared, keep, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(300), conn).await;
        });
    }
}

async fn respond(
    shared: &Shared,
    keep: usize,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let status = |code: StatusCode, why: String| {
        let mut r = Response::new(Full::new(Bytes::from(why)));
        *r.status_mut() = code;
        r
    };
    if req.method() != Method::POST || req.uri().path() != "/v1/traces" {
        return status(StatusCode::NOT_FOUND, "POST /v1/traces only\n".into());
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return status(StatusCode::PAYLOAD_TOO_LARGE, format!("{e}\n")),
    };
    let export = match ExportTraceServiceRequest::decode(body) {
        Ok(e) => e,
        Err(e) => {
            return status(
                StatusCode::BAD_REQUEST,
                format!("not an OTLP export: {e}\n"),
            )
        }
    };
    shared.exports.fetch_add(1, Ordering::Relaxed);
    let mut got = Vec::new();
    for rs in export.resource_spans {
        let resource = rs
            .resource
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                got.push(Received {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    name: s.name,
                    resource: resource.clone(),
                    attributes: attributes(&s.attributes),
                    start_ns: s.start_time_unix_nano,
                    end_ns: s.end_time_unix_nano,
                });
            }
        }
    }
    shared
        .received
        .fetch_add(got.len() as u64, Ordering::Relaxed);
    {
        let mut spans = shared.spans.lock().unwrap_or_else(|p| p.into_inner());
        let room = keep.saturating_sub(spans.len());
        spans.extend(got.into_iter().take(room));
    }
    let mut ok = Response::new(Full::new(Bytes::from(
        ExportTraceServiceResponse::default().encode_to_vec(),
    )));
    ok.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-protobuf"),
    );
    ok
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                Some(any_value::Value::DoubleValue(d)) => d.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
