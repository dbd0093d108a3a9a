//! Prometheus metrics: the recorder is installed once per process and
//! rendered by `GET /metrics`. Metric names are `csms_*`; each module records
//! its own with the `metrics` macros.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global recorder (idempotent) and returns the handle that
/// renders the exposition text.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                // Latencies get buckets; other histograms (batch sizes) are summaries.
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0,
                    ],
                )
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be set (tests): then this handle
            // renders nothing recorded elsewhere, which only affects /metrics.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
