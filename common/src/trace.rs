//! Trace context carried in message headers (W3C `traceparent`), so one upload's log lines can
//! be followed across the gateway and every worker: the gateway takes the client's
//! `traceparent` or starts a trace, each worker continues the one its message carries, and
//! every message published while handling it carries the same trace id.
//!
//! When spans are exported (see `telemetry.rs`), each scope also has a span of its own, a child
//! of the `traceparent` it continues, and what it publishes carries that span's id (through a
//! publish span), so the exported spans of one file make one tree across the services.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState};
use std::future::Future;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The header (and AMQP header) name.
pub const HEADER: &str = "traceparent";

tokio::task_local! {
    static CURRENT: TraceContext;
    /// The exported span of the scope (disabled when nothing is exported).
    static SPAN: tracing::Span;
}

/// A trace id and the id of the span that is the parent of what comes next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: u128,
    span_id: u64,
    /// Started here, not continued: its span id is no span's, so an exported span starts a trace.
    root: bool,
    /// The W3C `sampled` flag: a caller that does not record this trace is followed.
    sampled: bool,
}

fn random_u128() -> u128 {
    u128::from_be_bytes(*uuid::Uuid::new_v4().as_bytes())
}

impl TraceContext {
    /// A new trace.
    pub fn start() -> Self {
        let r = random_u128();
        Self { trace_id: random_u128().max(1), span_id: (r as u64).max(1), root: true, sampled: true }
    }

    /// Parses `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`; None if malformed or all zero.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex =
            |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if parts.next().is_some()
            || !hex(version, 2)
            || version == "ff"
            || !hex(trace, 32)
            || !hex(span, 16)
            || !hex(flags, 2)
        {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let sampled = u8::from_str_radix(flags, 16).ok()? & 1 == 1;
        (trace_id != 0 && span_id != 0).then_some(Self { trace_id, span_id, root: false, sampled })
    }

    /// The same trace, with a new span (for a message about to be published).
    pub fn child(&self) -> Self {
        Self { trace_id: self.trace_id, span_id: (random_u128() as u64).max(1), root: false, sampled: self.sampled }
    }

    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The `traceparent` value.
    pub fn header(&self) -> String {
        format!("00-{:032x}-{:016x}-{:02x}", self.trace_id, self.span_id, u8::from(self.sampled))
    }

    /// Runs `f` in this trace: its log lines carry the trace id, and what it publishes the context.
    /// Exports a span named `name` (when spans are exported).
    pub async fn scope<F: Future>(self, name: &'static str, f: F) -> F::Output {
        let span = tracing::info_span!(target: crate::telemetry::OTEL_TARGET, "txpipe", otel.name = name);
        self.scope_in(span, name, f).await
    }

    /// [`Self::scope`] with the exported span given: one made with the target
    /// [`crate::telemetry::OTEL_TARGET`], its name, kind and attributes set by the caller.
    pub async fn scope_in<F: Future>(self, span: tracing::Span, name: &'static str, f: F) -> F::Output {
        let trace = self.adopt(&span).unwrap_or(self);
        let logs = tracing::info_span!("trace", trace_id = %trace.trace_id(), op = name);
        CURRENT.scope(trace, SPAN.scope(span.clone(), f.instrument(logs).instrument(span))).await
    }

    /// Makes the exported `span` a child of this context (a root if this trace starts here) and
    /// returns the context it gives what follows: its own ids. None when `span` is not exported.
    pub fn adopt(&self, span: &tracing::Span) -> Option<TraceContext> {
        if !crate::telemetry::exporting() || span.is_disabled() {
            return None;
        }
        let parent = if self.root {
            opentelemetry::Context::new()
        } else {
            let remote = SpanContext::new(
                TraceId::from_bytes(self.trace_id.to_be_bytes()),
                SpanId::from_bytes(self.span_id.to_be_bytes()),
                if self.sampled { TraceFlags::SAMPLED } else { TraceFlags::default() },
                true,
                TraceState::default(),
            );
            opentelemetry::Context::new().with_remote_span_context(remote)
        };
        // fails only if the span has started already: then it keeps the parent it has
        let _ = span.set_parent(parent);
        let context = span.context();
        let own = context.span().span_context().clone();
        own.is_valid().then(|| TraceContext {
            trace_id: u128::from_be_bytes(own.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(own.span_id().to_bytes()),
            root: false,
            sampled: own.is_sampled(),
        })
    }
}

/// The trace of the task running now, if it runs in one.
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(|c| *c).ok()
}

/// Sets an attribute (e.g. `file_id`, once known) on the exported span of the task running now.
pub fn set_attribute(key: &'static str, value: &str) {
    let _ = SPAN.try_with(|span| {
        if !span.is_disabled() {
            span.set_attribute(key, value.to_owned());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_bad_values_are_refused() {
        let t = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(t.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.header(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(t.child().trace_id(), t.trace_id());
        assert_ne!(t.child().header(), t.header());
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad:?}");
        }
        let unsampled = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert_eq!(unsampled.header(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00");
        assert!(unsampled.child().header().ends_with("-00"), "a caller's choice not to sample is kept");
        let fresh = TraceContext::start();
        assert_eq!(TraceContext::parse(&fresh.header()).map(|t| t.header()), Some(fresh.header()));
    }
}
