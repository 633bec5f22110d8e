//! `kvgate operator`: keeps, for every DynamoGraphDeployment with an EPP component, the EPP
//! Service, the InferencePool and (service mesh on, Istio installed) the DestinationRule in
//! sync by server-side apply, and reports a `kvgate.io/InferencePoolReady` condition on the
//! graph. Serves `/healthz`, `/readyz` and `/metrics` on `--metrics-port`.

use crate::render_args::ObjectArgs;
use axum::http::StatusCode;
use kvgate_k8s::controller::{Operator, OperatorConfig, OperatorMetrics};
use kvgate_k8s::operator::Kind;
use kvgate_runtime::prom::Scrape;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[derive(clap::Args, Debug, Clone)]
pub struct OperatorArgs {
    /// Watch graphs in this namespace only (empty: every namespace the ServiceAccount may read).
    #[arg(long, env = "KVGATE_WATCH_NAMESPACE", default_value = "")]
    pub watch_namespace: String,
    /// Reconcile every graph at least this often, in seconds (changes to the graph or to the
    /// objects it owns are reconciled at once).
    #[arg(long, env = "KVGATE_REQUEUE_SECONDS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub requeue_seconds: u64,
    /// Health (`/healthz`, `/readyz`) and Prometheus (`/metrics`) port.
    #[arg(long, env = "KVGATE_METRICS_PORT", default_value_t = 9090)]
    pub metrics_port: u16,
    /// Address to bind the metrics port on.
    #[arg(long, env = "KVGATE_METRICS_HOST", default_value = "0.0.0.0")]
    pub metrics_host: std::net::IpAddr,
    #[command(flatten)]
    pub objects: ObjectArgs,
}

impl OperatorArgs {
    pub fn config(&self) -> Result<OperatorConfig, String> {
        let ns = self.watch_namespace.trim();
        if !ns.is_empty() && !kvgate_k8s::meta::is_dns1123_label(ns) {
            return Err(format!(
                "--watch-namespace {ns:?} is not a namespace name (a DNS-1123 label)"
            ));
        }
        Ok(OperatorConfig {
            render: self.objects.options(None)?,
            namespace: (!ns.is_empty()).then(|| ns.to_string()),
            requeue: Duration::from_secs(self.requeue_seconds),
            ..OperatorConfig::default()
        })
    }
}

fn render_metrics(m: &OperatorMetrics) -> Scrape {
    let mut p = Scrape::new();
    for (result, v) in [
        ("ok", m.reconciles_ok.load(Ordering::Relaxed)),
        ("error", m.reconciles_failed.load(Ordering::Relaxed)),
    ] {
        p.counter(
            "kvgate_operator_reconciles_total",
            "Graph reconciles, by result.",
            &[("result", result)],
            v as f64,
        );
    }
    for (i, k) in Kind::ALL.into_iter().enumerate() {
        p.counter(
            "kvgate_operator_applies_total",
            "Server-side applies of an object that differed from what kvgate sets.",
            &[("kind", k.as_str())],
            m.applies[i].load(Ordering::Relaxed) as f64,
        );
        p.counter(
            "kvgate_operator_deletes_total",
            "Objects deleted because their graph no longer needs them.",
            &[("kind", k.as_str())],
            m.deletes[i].load(Ordering::Relaxed) as f64,
        );
    }
    p.counter(
        "kvgate_operator_status_writes_total",
        "Writes of the kvgate.io/InferencePoolReady condition.",
        &[],
        m.status_writes.load(Ordering::Relaxed) as f64,
    );
    p.counter(
        "kvgate_operator_watch_errors_total",
        "Failures of the watches that trigger reconciles (a missing CRD, missing RBAC); what they would report waits for the periodic requeue.",
        &[],
        m.watch_errors.load(Ordering::Relaxed) as f64,
    );
    p.gauge(
        "kvgate_operator_istio_available",
        "1 when the cluster serves networking.istio.io DestinationRules, 0 when not, -1 before the first check.",
        &[],
        m.istio_available.load(Ordering::Relaxed) as f64,
    );
    p.gauge(
        "kvgate_operator_ready",
        "1 once the DynamoGraphDeployment API answered.",
        &[],
        f64::from(u8::from(m.ready.load(Ordering::Relaxed))),
    );
    p
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

pub async fn run(a: &OperatorArgs) -> Result<(), String> {
    let cfg = a.config()?;
    let client = kvgate_k8s::controller::default_client().await?;
    let metrics = Arc::new(OperatorMetrics::new());
    let addr = SocketAddr::new(a.metrics_host, a.metrics_port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let m = metrics.clone();
    let m2 = metrics.clone();
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let m = m.clone();
                async move {
                    if m.ready.load(Ordering::Relaxed) {
                        (StatusCode::OK, "ready")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "the DynamoGraphDeployment API has not answered yet",
                        )
                    }
                }
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || {
                let m = m2.clone();
                async move { render_metrics(&m).into_response() }
            }),
        )
        .fallback(kvgate_runtime::http::not_found);
    println!(
        "kvgate operator watching {}; health and metrics on http://{}",
        cfg.namespace
            .as_deref()
            .map_or("every namespace".to_string(), |n| format!("namespace {n}")),
        listener.local_addr().map_err(|e| e.to_string())?
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    let op = Arc::new(Operator::new(client, cfg, metrics));
    kvgate_k8s::controller::run(op, shutdown_signal()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_every_kind() {
        let m = OperatorMetrics::new();
        m.applies[1].fetch_add(2, Ordering::Relaxed);
        let p = render_metrics(&m);
        let text = p.encode();
        assert!(
            text.contains("kvgate_operator_applies_total{kind=\"InferencePool\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("kvgate_operator_istio_available -1"),
            "{text}"
        );
    }
}
