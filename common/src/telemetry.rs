//! Logging and span export. Logs: JSON lines by default (for log shippers), or human-readable
//! with `TXPIPE_LOG_FORMAT=pretty`. Spans: exported over OTLP/HTTP (protobuf) when the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, off otherwise.
//!
//! Only the spans txpipe makes for that purpose are exported (target [`OTEL_TARGET`]: one per
//! upload, per handled message and per publish, see `trace.rs`), with the warnings and errors
//! logged inside them as span events; the HTTP request spans and the log-only spans stay local,
//! so a health probe does not make a trace. Those export spans never reach the log lines.

use crate::config::LogFormat;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::sync::OnceLock;
use std::time::Duration;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

/// The `tracing` target of the spans that are exported (and kept out of the log lines).
pub const OTEL_TARGET: &str = "txpipe::otel";

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Installs the global subscriber. `RUST_LOG` filters the log lines (default `info`). Safe to
/// call twice. With an OTLP endpoint set, also exports spans with `service.name` = `service`
/// (unless `OTEL_SERVICE_NAME` says otherwise); must then run inside a tokio runtime.
pub fn init(service: &'static str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .add_directive(format!("{OTEL_TARGET}=off").parse().expect("a valid directive"));
    let logs = match format {
        LogFormat::Json => fmt::layer().json().with_current_span(false).with_writer(std::io::stderr).boxed(),
        LogFormat::Pretty => fmt::layer().with_writer(std::io::stderr).boxed(),
    };
    let (export, problem) = match exporter(service) {
        Ok(Some(provider)) => {
            let tracer = provider.tracer("txpipe");
            let _ = PROVIDER.set(provider);
            // the export spans, and what is logged at warn or worse inside them (as span events)
            let only = Targets::new().with_target(OTEL_TARGET, LevelFilter::TRACE).with_default(LevelFilter::WARN);
            (Some(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(only)), None)
        }
        Ok(None) => (None, None),
        Err(e) => (None, Some(e)),
    };
    // Without an exporter the filter is the subscriber's own: a span or event it turns away is
    // never made at all, and no per-layer bookkeeping is paid on every span entered (a few
    // per cent of the CPU at high file rates). With one, it filters the log lines only.
    let result = match export {
        Some(export) => tracing_subscriber::registry().with(logs.with_filter(filter)).with(export).try_init(),
        None => tracing_subscriber::registry().with(logs).with(filter).try_init(),
    };
    if result.is_ok() {
        tracing::info!(
            service,
            version = env!("CARGO_PKG_VERSION"),
            exporting_spans = PROVIDER.get().is_some(),
            "starting"
        );
        if let Some(e) = problem {
            tracing::warn!(error = %e, "not exporting spans: check the OTEL_EXPORTER_OTLP_* settings");
        }
    }
}

/// True if a setting asks for span export.
fn export_asked() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The provider exporting spans, if asked. The exporter reads the other standard settings itself
/// (headers, timeout, `OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf`, the default, or `http/json`).
fn exporter(service: &'static str) -> Result<Option<SdkTracerProvider>, String> {
    // a second init keeps the first subscriber (and its exporter): no second exporter
    if !export_asked() || PROVIDER.get().is_some() {
        return Ok(None);
    }
    // the batch processor runs as a task on the service's runtime: no thread of its own, and
    // exporting never blocks a handler (a full queue drops spans, never waits)
    if tokio::runtime::Handle::try_current().is_err() {
        return Err("span export needs the tokio runtime (a txpipe bug)".into());
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| format!("cannot build the OTLP exporter: {e}"))?;
    let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
        exporter,
        opentelemetry_sdk::runtime::Tokio,
    )
    .build();
    let resource = opentelemetry_sdk::Resource::builder();
    // OTEL_SERVICE_NAME, the standard override, wins over the binary's name
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty());
    let resource = if named { resource } else { resource.with_service_name(service) };
    let resource = resource.with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    Ok(Some(SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource.build()).build()))
}

/// True when spans are being exported.
pub fn exporting() -> bool {
    PROVIDER.get().is_some()
}

/// Sends the spans not yet exported and stops the exporter (at shutdown). Waits at most
/// `within`: an unreachable collector must not hold the process up.
pub async fn shutdown(within: Duration) {
    let Some(provider) = PROVIDER.get().cloned() else { return };
    // the provider's shutdown blocks until its task on this runtime has exported: off the runtime
    let done = tokio::task::spawn_blocking(move || provider.shutdown());
    match tokio::time::timeout(within, done).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "could not export the last spans"),
        Ok(Err(e)) => tracing::warn!(error = %e, "could not export the last spans"),
        Err(_) => tracing::warn!(seconds = within.as_secs(), "gave up exporting the last spans"),
    }
}
