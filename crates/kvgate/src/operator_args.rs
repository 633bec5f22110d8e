//! `kvgate operator`: keeps, for every DynamoGraphDeployment with an EPP component, the EPP
//! Service, the InferencePool and (service mesh on, Istio installed) the DestinationRule in
//! sync by server-side apply, and reports a `kvgate.io/InferencePoolReady` condition on the
//! graph. Serves `/healthz`, `/readyz` and `/metrics` on `--metrics-port`. With leader
//! election (on by default) only the copy holding the `coordination.k8s.io/v1` Lease
//! reconciles; the others stand by, so several replicas never write twice.

use crate::render_args::ObjectArgs;
use axum::http::StatusCode;
use kvgate_k8s::controller::{Operator, OperatorConfig, OperatorMetrics};
use kvgate_k8s::election::ElectionConfig;
use kvgate_k8s::lease::Timing;
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
    #[command(flatten)]
    pub election: ElectionArgs,
}

/// Leader election: several copies, one reconciling (client-go's defaults).
#[derive(clap::Args, Debug, Clone)]
pub struct ElectionArgs {
    /// Reconcile only while holding the leader Lease (`--leader-elect=false`: always reconcile,
    /// for exactly one copy).
    #[arg(long, env = "KVGATE_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// The coordination.k8s.io/v1 Lease the copies compete for (one per operator deployment).
    #[arg(
        long,
        env = "KVGATE_LEADER_ELECTION_LEASE_NAME",
        default_value = "kvgate-operator"
    )]
    pub leader_election_lease_name: String,
    /// The Lease's namespace (empty: the operator's own, from its service account or kubeconfig).
    #[arg(long, env = "KVGATE_LEADER_ELECTION_NAMESPACE", default_value = "")]
    pub leader_election_namespace: String,
    /// This copy's holder identity, unique per copy (empty: the pod name or host name and a
    /// random suffix).
    #[arg(long, env = "KVGATE_LEADER_ELECTION_ID", default_value = "")]
    pub leader_election_id: String,
    /// How long others wait for a Lease nobody renews, in whole seconds.
    #[arg(long, env = "KVGATE_LEADER_ELECTION_LEASE_DURATION_SECONDS", default_value_t = 15, value_parser = clap::value_parser!(u32).range(1..=3600))]
    pub leader_election_lease_duration_seconds: u32,
    /// How long the leader keeps reconciling without a successful renewal, in seconds (less
    /// than the lease duration).
    #[arg(
        long,
        env = "KVGATE_LEADER_ELECTION_RENEW_DEADLINE_SECONDS",
        default_value_t = 10.0
    )]
    pub leader_election_renew_deadline_seconds: f64,
    /// How often the Lease is read and, by the leader, renewed, in seconds (less than the renew
    /// deadline).
    #[arg(
        long,
        env = "KVGATE_LEADER_ELECTION_RETRY_PERIOD_SECONDS",
        default_value_t = 2.0
    )]
    pub leader_election_retry_period_seconds: f64,
}

fn seconds(flag: &str, v: f64) -> Result<Duration, String> {
    if !v.is_finite() || v <= 0.0 || v > 3600.0 {
        return Err(format!(
            "--{flag} {v}: give a number of seconds above 0 and at most 3600"
        ));
    }
    Ok(Duration::from_secs_f64(v))
}

impl ElectionArgs {
    /// The election's settings, checked; `None`: leader election is off. `default_namespace`
    /// is used when `--leader-election-namespace` is empty.
    pub fn config(&self, default_namespace: &str) -> Result<Option<ElectionConfig>, String> {
        if !self.leader_elect {
            return Ok(None);
        }
        let timing = Timing {
            lease_duration: Duration::from_secs(u64::from(
                self.leader_election_lease_duration_seconds,
            )),
            renew_deadline: seconds(
                "leader-election-renew-deadline-seconds",
                self.leader_election_renew_deadline_seconds,
            )?,
            retry_period: seconds(
                "leader-election-retry-period-seconds",
                self.leader_election_retry_period_seconds,
            )?,
        };
        timing.validate().map_err(|e| {
            format!(
                "{e} (--leader-election-lease-duration-seconds > --leader-election-renew-deadline-seconds > --leader-election-retry-period-seconds)"
            )
        })?;
        let name = self.leader_election_lease_name.trim();
        if !kvgate_k8s::meta::is_dns1123_subdomain(name) {
            return Err(format!(
                "--leader-election-lease-name {name:?} is not a Lease name (a DNS-1123 subdomain)"
            ));
        }
        let ns = match self.leader_election_namespace.trim() {
            "" => default_namespace.trim(),
            ns => ns,
        };
        if !kvgate_k8s::meta::is_dns1123_label(ns) {
            return Err(format!(
                "--leader-election-namespace {ns:?} is not a namespace name (a DNS-1123 label)"
            ));
        }
        let identity = match self.leader_election_id.trim() {
            "" => kvgate_k8s::election::default_identity(),
            id => id.to_string(),
        };
        Ok(Some(ElectionConfig {
            lease_name: name.to_string(),
            namespace: ns.to_string(),
            identity,
            timing,
        }))
    }
}

impl OperatorArgs {
    pub fn config(&self) -> Result<OperatorConfig, String> {
        // Checked before the cluster is needed; the namespace is only known with a client.
        self.election.config("default")?;
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
        "kvgate_operator_leader",
        "1 while this copy reconciles: it holds the leader Lease (or runs without leader election); 0 on standby.",
        &[],
        f64::from(u8::from(m.leader.load(Ordering::Relaxed))),
    );
    for (change, v) in [
        ("acquired", m.leadership_acquired.load(Ordering::Relaxed)),
        ("lost", m.leadership_lost.load(Ordering::Relaxed)),
    ] {
        p.counter(
            "kvgate_operator_leadership_changes_total",
            "Times this copy became the leader (acquired) or stopped being it (lost).",
            &[("change", change)],
            v as f64,
        );
    }
    p.counter(
        "kvgate_operator_lease_errors_total",
        "Leader Lease reads or writes that failed or timed out.",
        &[],
        m.lease_errors.load(Ordering::Relaxed) as f64,
    );
    p.counter(
        "kvgate_operator_lease_conflicts_total",
        "Leader Lease writes refused with a 409 because another copy wrote first.",
        &[],
        m.lease_conflicts.load(Ordering::Relaxed) as f64,
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
    let election = a.election.config(client.default_namespace())?;
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
                    // A standby is ready too: ready to take over (and a rolling update waits
                    // for the new pods' readiness).
                    if m.ready.load(Ordering::Relaxed) {
                        let role = if m.leader.load(Ordering::Relaxed) {
                            "ready (leader)"
                        } else {
                            "ready (standby)"
                        };
                        (StatusCode::OK, role)
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
        "kvgate operator watching {}; {}; health and metrics on http://{}",
        cfg.namespace
            .as_deref()
            .map_or("every namespace".to_string(), |n| format!("namespace {n}")),
        election.as_ref().map_or(
            "no leader election (this copy always reconciles)".to_string(),
            |e| format!(
                "leader election on Lease {}/{} as {}",
                e.namespace, e.lease_name, e.identity
            )
        ),
        listener.local_addr().map_err(|e| e.to_string())?
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    let op = Arc::new(Operator::new(client, cfg, metrics));
    match election {
        Some(e) => kvgate_k8s::controller::run_elected(op, e, shutdown_signal()).await,
        None => kvgate_k8s::controller::run(op, shutdown_signal()).await,
    }
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
        assert!(text.contains("kvgate_operator_leader 0"), "{text}");
        m.leadership_acquired.fetch_add(1, Ordering::Relaxed);
        let text = render_metrics(&m).encode();
        assert!(
            text.contains("kvgate_operator_leadership_changes_total{change=\"acquired\"} 1"),
            "{text}"
        );
    }

    fn election(args: &[&str]) -> Result<Option<ElectionConfig>, String> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            e: ElectionArgs,
        }
        let mut all = vec!["kvgate"];
        all.extend_from_slice(args);
        let cli = <Cli as clap::Parser>::try_parse_from(all).map_err(|e| e.to_string())?;
        cli.e.config("ops")
    }

    #[test]
    fn leader_election_defaults_to_client_go_timings_in_the_operators_namespace() {
        let e = election(&[]).unwrap().unwrap();
        assert_eq!(e.lease_name, "kvgate-operator");
        assert_eq!(e.namespace, "ops");
        assert_eq!(e.timing, Timing::default());
        assert!(e.identity.contains('_'), "{}", e.identity);
        assert_ne!(e.identity, election(&[]).unwrap().unwrap().identity);
        let e = election(&[
            "--leader-election-namespace",
            "kvgate",
            "--leader-election-id",
            "op-0",
            "--leader-election-lease-duration-seconds",
            "4",
            "--leader-election-renew-deadline-seconds",
            "2.5",
            "--leader-election-retry-period-seconds",
            "0.5",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (e.namespace.as_str(), e.identity.as_str()),
            ("kvgate", "op-0")
        );
        assert_eq!(e.timing.renew_deadline, Duration::from_millis(2500));
        assert_eq!(election(&["--leader-elect=false"]).unwrap(), None);
    }

    #[test]
    fn leader_election_settings_that_could_give_two_leaders_are_refused() {
        for (args, want) in [
            (
                &["--leader-election-renew-deadline-seconds", "15"][..],
                "must be longer than the renew deadline",
            ),
            (
                &["--leader-election-retry-period-seconds", "10"][..],
                "must be longer than the retry period",
            ),
            (
                &["--leader-election-retry-period-seconds", "0"][..],
                "above 0",
            ),
            (
                &["--leader-election-lease-name", "Not A Name"][..],
                "is not a Lease name",
            ),
            (
                &["--leader-election-namespace", "Bad_Ns"][..],
                "is not a namespace name",
            ),
        ] {
            let e = election(args).unwrap_err();
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }
}
