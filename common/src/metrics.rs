//! Prometheus metrics: one recorder per process, rendered at `GET /metrics` by every binary.
//!
//! Names (all prefixed `txpipe_`): `uploads_total{result}`, `upload_bytes_total`,
//! `messages_total{stage,outcome}`, `message_seconds{stage}`, `dead_letters_total{stage,class}`,
//! `rows_validated_total`, `files_rejected_total`, `rows_stored_total`, `broker_connected`,
//! `broker_reconnects_total`. compose/prometheus/alerts.yml alerts on them.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Every metric txpipe records (alert rules may only use these).
pub const NAMES: &[&str] = &[
    "txpipe_uploads_total",
    "txpipe_upload_bytes_total",
    "txpipe_messages_total",
    "txpipe_message_seconds",
    "txpipe_dead_letters_total",
    "txpipe_rows_validated_total",
    "txpipe_files_rejected_total",
    "txpipe_rows_stored_total",
    "txpipe_broker_connected",
    "txpipe_broker_reconnects_total",
];

/// Installs the process's recorder (once; later calls return the same handle).
pub fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("_seconds".into()),
                &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
            )
            .expect("valid buckets")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics shows only txpipe's own");
        }
        handle
    })
}

/// The metrics in Prometheus's text format.
pub fn render() -> String {
    let handle = install();
    handle.run_upkeep();
    handle.render()
}
