//! `--metrics-addr`: Prometheus's `/metrics` for the caches of this process.
//!
//! A Prometheus recorder is installed as the process's `metrics` recorder, and
//! an HTTP server answers `GET /metrics` with every cache's counters,
//! published at that moment (`cachet::metrics::publish`), and the histograms
//! recorded so far. Caches in the lab's child processes are not included.

use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Bucket bounds of the histograms, in seconds: 50 µs to 10 s.
const BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// The `/metrics` endpoint, served until the process exits.
#[derive(Debug)]
pub(crate) struct MetricsServer {
    addr: SocketAddr,
}

impl MetricsServer {
    /// Installs the recorder and starts serving on `addr` (port 0: any free
    /// port; [`addr`](Self::addr) tells which).
    pub(crate) async fn start(addr: SocketAddr) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        let addr = listener.local_addr().context("the metrics listener")?;
        let handle = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .context("histogram buckets")?
            .install_recorder()
            .context("cannot install the Prometheus recorder")?;
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || render(handle.clone())),
        );
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the metrics server stopped");
            }
        });
        Ok(Self { addr })
    }

    /// Starts serving when `addr` is given, and says where on stderr
    /// (`command` names the command saying it).
    pub(crate) async fn start_if(addr: Option<SocketAddr>, command: &str) -> Result<Option<Self>> {
        let Some(addr) = addr else {
            return Ok(None);
        };
        let server = Self::start(addr).await?;
        eprintln!(
            "cachet {command}: serving metrics at http://{}/metrics",
            server.addr()
        );
        Ok(Some(server))
    }

    /// The address it listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

async fn render(handle: PrometheusHandle) -> String {
    cachet::metrics::publish();
    handle.render()
}
