//! `kvgate operator`'s IO: reads a DynamoGraphDeployment's live objects, asks
//! [`crate::operator::plan`] what to do, and does it with server-side apply (field manager
//! `kvgate`), owner-checked deletes and a status condition written with optimistic concurrency.
//! [`run`] drives it with kube-rs's controller: every graph, again whenever an object it owns
//! changes, and every `requeue` in any case. The API client is injected, so tests run it against
//! a mocked API server.

use crate::election::{Campaign, ElectionConfig};
use crate::lease::{Change, LostReason};
use crate::operator::{self, Action, Condition, Kind, Live, Plan, reason};
use crate::render::{MANAGED_BY, RenderOptions};
use crate::{dgd, pool};
use futures::StreamExt;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
    Preconditions,
};
use kube::runtime::controller::{self, Controller};
use kube::runtime::watcher;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Istio's API group/version kvgate writes `DestinationRule`s in.
pub const ISTIO_GROUP_VERSION: &str = "networking.istio.io/v1beta1";

#[derive(Clone, Debug)]
pub struct OperatorConfig {
    pub render: RenderOptions,
    /// Watch graphs in this namespace only; `None`: all namespaces.
    pub namespace: Option<String>,
    /// Reconcile every graph at least this often (repairs drift that no watch reported).
    pub requeue: Duration,
    /// How long the answer to "is the DestinationRule API served?" is trusted.
    pub istio_recheck: Duration,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            render: RenderOptions::default(),
            namespace: None,
            requeue: Duration::from_secs(300),
            istio_recheck: Duration::from_secs(60),
        }
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct OperatorMetrics {
    pub reconciles_ok: AtomicU64,
    pub reconciles_failed: AtomicU64,
    /// Per [`Kind`], in [`Kind::ALL`] order.
    pub applies: [AtomicU64; 3],
    pub deletes: [AtomicU64; 3],
    pub status_writes: AtomicU64,
    /// Failures of the watches that trigger reconciles (a missing CRD, missing RBAC, ...).
    pub watch_errors: AtomicU64,
    /// 1 served, 0 not, -1 not checked yet.
    pub istio_available: AtomicI64,
    /// The graph API answered a list at least once.
    pub ready: AtomicBool,
    /// This copy reconciles: it holds the leader Lease, or runs without leader election.
    pub leader: AtomicBool,
    /// Times this copy became the leader, and stopped being it.
    pub leadership_acquired: AtomicU64,
    pub leadership_lost: AtomicU64,
    /// Lease reads or writes that failed (or timed out), and writes refused with a 409.
    pub lease_errors: AtomicU64,
    pub lease_conflicts: AtomicU64,
}

impl OperatorMetrics {
    pub fn new() -> Self {
        let m = Self::default();
        m.istio_available.store(-1, Ordering::Relaxed);
        m
    }
}

fn kind_index(k: Kind) -> usize {
    match k {
        Kind::Service => 0,
        Kind::InferencePool => 1,
        Kind::DestinationRule => 2,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("{0}")]
    Api(String),
}

/// What one reconcile did.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub plan: Plan,
    /// Whether the graph's status was written.
    pub status_written: bool,
}

pub struct Operator {
    client: kube::Client,
    cfg: OperatorConfig,
    metrics: Arc<OperatorMetrics>,
    istio: Mutex<Option<(bool, Instant)>>,
}

pub fn graph_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(dgd::GROUP, dgd::VERSION, dgd::KIND),
        "dynamographdeployments",
    )
}

pub fn resource(k: Kind) -> ApiResource {
    match k {
        Kind::Service => ApiResource::erase::<k8s_openapi::api::core::v1::Service>(&()),
        Kind::InferencePool => ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(pool::GROUP, pool::VERSION, pool::KIND),
            "inferencepools",
        ),
        Kind::DestinationRule => ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("networking.istio.io", "v1beta1", "DestinationRule"),
            "destinationrules",
        ),
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

impl Operator {
    pub fn new(client: kube::Client, cfg: OperatorConfig, metrics: Arc<OperatorMetrics>) -> Self {
        Self {
            client,
            cfg,
            metrics,
            istio: Mutex::new(None),
        }
    }

    pub fn metrics(&self) -> &Arc<OperatorMetrics> {
        &self.metrics
    }

    /// Whether the cluster serves Istio's `DestinationRule`s (API discovery, cached for
    /// `istio_recheck`, so installing Istio later is noticed).
    pub async fn istio_available(&self) -> Result<bool, OperatorError> {
        if let Ok(g) = self.istio.lock()
            && let Some((v, at)) = *g
            && at.elapsed() < self.cfg.istio_recheck
        {
            return Ok(v);
        }
        let served = match self
            .client
            .list_api_group_resources(ISTIO_GROUP_VERSION)
            .await
        {
            Ok(list) => list.resources.iter().any(|r| r.name == "destinationrules"),
            Err(e) if is_not_found(&e) => false,
            Err(e) => {
                return Err(OperatorError::Api(format!(
                    "cannot discover {ISTIO_GROUP_VERSION}: {e}"
                )));
            }
        };
        if let Ok(mut g) = self.istio.lock() {
            *g = Some((served, Instant::now()));
        }
        self.metrics
            .istio_available
            .store(i64::from(served), Ordering::Relaxed);
        Ok(served)
    }

    fn api(&self, k: Kind, ns: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), ns, &resource(k))
    }

    /// Brings one graph's objects and condition in line. Returns what it did; an API failure
    /// is also reported in the graph's condition before it is returned.
    pub async fn reconcile(&self, graph: &Value) -> Result<Outcome, OperatorError> {
        let ns = graph["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = graph["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let istio = self.istio_available().await?;
        let mut live = Live::default();
        for k in Kind::ALL {
            if k == Kind::DestinationRule && !istio {
                continue;
            }
            let got = self
                .api(k, &ns)
                .get_opt(&k.object_name(&name))
                .await
                .map_err(|e| api_error(k, &ns, &k.object_name(&name), "read", &e))?;
            live.set(
                k,
                got.and_then(|o| serde_json::to_value(o).ok())
                    .filter(|v| !v.is_null()),
            );
        }
        let mut plan = operator::plan(graph, &self.cfg.render, istio, &live);
        let mut failure = None;
        for a in &plan.actions {
            let r = match a {
                Action::Apply(k, obj) => {
                    let n = obj["metadata"]["name"].as_str().unwrap_or_default();
                    let r = self
                        .api(*k, &ns)
                        .patch(
                            n,
                            &PatchParams::apply(operator::FIELD_MANAGER).force(),
                            &Patch::Apply(obj),
                        )
                        .await
                        .map(|_| ())
                        .map_err(|e| api_error(*k, &ns, n, "apply", &e));
                    if r.is_ok() {
                        self.metrics.applies[kind_index(*k)].fetch_add(1, Ordering::Relaxed);
                        tracing::info!(graph = %name, namespace = %ns, kind = k.as_str(), object = n, "applied");
                    }
                    r
                }
                Action::Delete(k, n) => {
                    let uid = live
                        .get(*k)
                        .and_then(|o| o["metadata"]["uid"].as_str())
                        .map(str::to_string);
                    let dp = DeleteParams {
                        // Only the object that was read: never one recreated meanwhile.
                        preconditions: uid.map(|uid| Preconditions {
                            uid: Some(uid),
                            resource_version: None,
                        }),
                        ..DeleteParams::default()
                    };
                    let r = match self.api(*k, &ns).delete(n, &dp).await {
                        Ok(_) => Ok(()),
                        Err(e) if is_not_found(&e) => Ok(()),
                        Err(e) => Err(api_error(*k, &ns, n, "delete", &e)),
                    };
                    if r.is_ok() {
                        self.metrics.deletes[kind_index(*k)].fetch_add(1, Ordering::Relaxed);
                        tracing::info!(graph = %name, namespace = %ns, kind = k.as_str(), object = %n, "deleted");
                    }
                    r
                }
            };
            if let Err(e) = r {
                failure = Some(e);
                break;
            }
        }
        if let Some(OperatorError::Api(msg)) = &failure {
            plan.condition = Some(Condition {
                status: false,
                reason: reason::APPLY_FAILED,
                message: msg.clone(),
                observed_generation: graph["metadata"]["generation"].as_i64(),
            });
        }
        let status = match &plan.condition {
            Some(c) => self.write_condition(graph, &ns, &name, c).await,
            None => Ok(false),
        };
        match (failure, status) {
            // The apply's failure is the one to report; a failed status write only adds to it.
            (Some(e), Err(s)) => {
                tracing::warn!(graph = %name, namespace = %ns, error = %s, "cannot report the failure in the graph's status");
                Err(e)
            }
            (Some(e), Ok(_)) => Err(e),
            (None, Err(s)) => Err(s),
            (None, Ok(status_written)) => Ok(Outcome {
                plan,
                status_written,
            }),
        }
    }

    /// Sets kvgate's condition in the graph's status, keeping every other condition. The
    /// patch carries the graph's resourceVersion, so it never overwrites a status written
    /// meanwhile (by Dynamo's operator): on a conflict the graph is read again.
    async fn write_condition(
        &self,
        graph: &Value,
        ns: &str,
        name: &str,
        c: &Condition,
    ) -> Result<bool, OperatorError> {
        let now = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ))
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), ns, &graph_resource());
        // The graph as cached may be behind (a status written since, ours included): on a
        // conflict, read it again and retry once.
        let mut fresh: Option<Value> = None;
        for attempt in 0..2 {
            let g = fresh.as_ref().unwrap_or(graph);
            let Some(conditions) = operator::conditions_with(g, c, &now) else {
                return Ok(false);
            };
            let mut patch = json!({"status": {"conditions": conditions}});
            if let Some(rv) = g["metadata"]["resourceVersion"].as_str() {
                patch["metadata"] = json!({"resourceVersion": rv});
            }
            match api
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.metrics.status_writes.fetch_add(1, Ordering::Relaxed);
                    return Ok(true);
                }
                // Deleted meanwhile: nothing to report on.
                Err(e) if is_not_found(&e) => return Ok(false),
                Err(kube::Error::Api(s)) if s.code == 409 && attempt == 0 => {
                    match api.get_opt(name).await {
                        Ok(Some(o)) => fresh = serde_json::to_value(o).ok(),
                        Ok(None) => return Ok(false),
                        Err(e) => {
                            return Err(OperatorError::Api(format!(
                                "cannot read DynamoGraphDeployment {ns}/{name}: {e}"
                            )));
                        }
                    }
                }
                Err(e) => {
                    return Err(OperatorError::Api(format!(
                        "cannot write the status of DynamoGraphDeployment {ns}/{name}: {e}"
                    )));
                }
            }
        }
        Err(OperatorError::Api(format!(
            "cannot write the status of DynamoGraphDeployment {ns}/{name}: it keeps changing"
        )))
    }
}

fn api_error(k: Kind, ns: &str, name: &str, verb: &str, e: &kube::Error) -> OperatorError {
    let hint = match (k, e) {
        (Kind::InferencePool, kube::Error::Api(s)) if s.code == 404 => {
            " (is the InferencePool CRD, inference.networking.k8s.io/v1, installed?)"
        }
        (_, kube::Error::Api(s)) if s.code == 403 => {
            " (the operator's ServiceAccount lacks RBAC for it; see deploy/helm/kvgate)"
        }
        _ => "",
    };
    OperatorError::Api(format!(
        "cannot {verb} {} {ns}/{name}: {e}{hint}",
        k.as_str()
    ))
}

fn graphs_api(op: &Operator) -> Api<DynamicObject> {
    match &op.cfg.namespace {
        Some(ns) => Api::namespaced_with(op.client.clone(), ns, &graph_resource()),
        None => Api::all_with(op.client.clone(), &graph_resource()),
    }
}

/// Readiness: the graph API answers (the DynamoGraphDeployment CRD is installed and RBAC allows
/// listing). Checked by every copy, leader or not: a standby is ready to take over.
fn spawn_readiness(op: &Arc<Operator>) {
    let op = op.clone();
    let graphs = graphs_api(&op);
    tokio::spawn(async move {
        loop {
            match graphs
                .list_metadata(&kube::api::ListParams::default().limit(1))
                .await
            {
                Ok(_) => {
                    op.metrics.ready.store(true, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list DynamoGraphDeployments (is Dynamo's CRD installed, and may the operator list them?); retrying")
                }
            }
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    });
}

/// Runs the controller until `shutdown` resolves, without leader election: every graph is
/// reconciled when it changes, when an object it owns changes, and every `requeue`; failures
/// are retried after 10 s.
pub async fn run(op: Arc<Operator>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    spawn_readiness(&op);
    op.metrics.leader.store(true, Ordering::Relaxed);
    reconcile_loop(op, shutdown).await;
}

/// Runs the controller only while this copy holds the leader Lease, until `shutdown` resolves.
/// A standby keeps reading the Lease and takes over when it expires or is released. On losing
/// the Lease the controller is dropped at once, in-flight reconciles included. On shutdown the
/// leader stops reconciling, then releases the Lease so a standby need not wait for it to
/// expire.
pub async fn run_elected(
    op: Arc<Operator>,
    election: ElectionConfig,
    shutdown: impl Future<Output = ()> + Send,
) {
    spawn_readiness(&op);
    let m = op.metrics.clone();
    let mut campaign = Campaign::new(op.client.clone(), election);
    let lease = format!(
        "{}/{}",
        campaign.config().namespace,
        campaign.config().lease_name
    );
    let identity = campaign.config().identity.clone();
    tracing::info!(%lease, %identity, "leader election: standby until this copy holds the lease");
    type Running = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;
    let mut ctl: Option<Running> = None;
    let mut last_holder: Option<String> = None;
    let mut shutdown = std::pin::pin!(shutdown);
    // Polled only while leading; never finishes unless the controller itself stops.
    async fn running(ctl: &mut Option<Running>) {
        match ctl {
            Some(f) => f.await,
            None => std::future::pending().await,
        }
    }
    loop {
        let report = tokio::select! {
            _ = &mut shutdown => break,
            _ = running(&mut ctl) => {
                tracing::error!("the controller stopped by itself; starting it again while leading");
                ctl = None;
                continue;
            }
            r = campaign.round() => r,
        };
        if report.conflict {
            m.lease_conflicts.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%lease, "another copy wrote the lease first; backing off");
        }
        if let Some(e) = &report.error {
            m.lease_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%lease, error = %e, "leader election");
        }
        for c in report.changes {
            match c {
                Change::Acquired { transitions } => {
                    tracing::info!(%lease, %identity, transitions, "became the leader; reconciling");
                    m.leadership_acquired.fetch_add(1, Ordering::Relaxed);
                }
                Change::Lost(why) => {
                    let why = match why {
                        LostReason::RenewDeadline => {
                            "no renewal within the renew deadline".to_string()
                        }
                        LostReason::TakenBy(h) => format!("the lease is held by {h}"),
                        LostReason::DuplicateIdentity => format!(
                            "another copy writes the lease as {identity}: give every copy its own --leader-election-id"
                        ),
                        LostReason::Released => "the lease was released or deleted".to_string(),
                    };
                    tracing::warn!(%lease, reason = %why, "lost the lease; stopped reconciling");
                    m.leadership_lost.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let leading = campaign.is_leader();
        match (leading, ctl.is_some()) {
            (true, false) => {
                m.leader.store(true, Ordering::Relaxed);
                ctl = Some(Box::pin(reconcile_loop(op.clone(), std::future::pending())));
            }
            (false, true) => {
                // Dropping the controller stops its watches and in-flight reconciles now.
                ctl = None;
                m.leader.store(false, Ordering::Relaxed);
            }
            _ => {}
        }
        if !leading {
            let holder = campaign.holder().map(str::to_string);
            if holder != last_holder {
                match &holder {
                    Some(h) => {
                        tracing::info!(%lease, holder = %h, "standby: the lease is held by another copy")
                    }
                    None => tracing::info!(%lease, "standby: the lease is free"),
                }
                last_holder = holder;
            }
        } else {
            last_holder = None;
        }
        let next = tokio::time::Instant::from_std(campaign.next_round());
        tokio::select! {
            _ = &mut shutdown => break,
            _ = running(&mut ctl) => {
                tracing::error!("the controller stopped by itself; starting it again while leading");
                ctl = None;
            }
            _ = tokio::time::sleep_until(next) => {}
        }
        // A lead that ran out while waiting ends before the next round.
        if let Some(c) = campaign.check() {
            debug_assert!(matches!(c, Change::Lost(_)));
            tracing::warn!(%lease, reason = "no renewal within the renew deadline", "lost the lease; stopped reconciling");
            m.leadership_lost.fetch_add(1, Ordering::Relaxed);
            ctl = None;
            m.leader.store(false, Ordering::Relaxed);
        }
    }
    ctl = None;
    drop(ctl);
    m.leader.store(false, Ordering::Relaxed);
    if campaign.release().await.is_some() {
        m.leadership_lost.fetch_add(1, Ordering::Relaxed);
    }
}

/// The kube-rs controller itself, until `shutdown`.
async fn reconcile_loop(
    op: Arc<Operator>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = op.client.clone();
    let graphs = graphs_api(&op);
    let children = |k: Kind| -> Api<DynamicObject> {
        match &op.cfg.namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource(k)),
            None => Api::all_with(client.clone(), &resource(k)),
        }
    };
    let owned = watcher::Config::default().labels(&format!("{}={}", MANAGED_BY.0, MANAGED_BY.1));
    let mut ctl = Controller::new_with(graphs, watcher::Config::default(), graph_resource())
        .owns_with(
            children(Kind::Service),
            resource(Kind::Service),
            owned.clone(),
        )
        .owns_with(
            children(Kind::InferencePool),
            resource(Kind::InferencePool),
            owned.clone(),
        );
    // Whether to watch DestinationRules is decided here: ask a few times before giving up (a
    // rule of a cluster that gets Istio later is still kept in sync by the periodic requeue).
    let mut istio = false;
    for attempt in 0..3 {
        match op.istio_available().await {
            Ok(v) => {
                istio = v;
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, attempt, "cannot tell whether Istio is installed");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
    if istio {
        ctl = ctl.owns_with(
            children(Kind::DestinationRule),
            resource(Kind::DestinationRule),
            owned,
        );
    }
    let requeue = op.cfg.requeue;
    ctl.graceful_shutdown_on(shutdown)
        .run(
            move |graph: Arc<DynamicObject>, op: Arc<Operator>| async move {
                let v = serde_json::to_value(&*graph).unwrap_or(Value::Null);
                match op.reconcile(&v).await {
                    Ok(_) => {
                        op.metrics.reconciles_ok.fetch_add(1, Ordering::Relaxed);
                        Ok(controller::Action::requeue(requeue))
                    }
                    Err(e) => {
                        op.metrics.reconciles_failed.fetch_add(1, Ordering::Relaxed);
                        Err(e)
                    }
                }
            },
            |graph, e: &OperatorError, _| {
                tracing::warn!(graph = ?graph.metadata.name, namespace = ?graph.metadata.namespace, error = %e, "reconcile failed; retrying in 10 s");
                controller::Action::requeue(Duration::from_secs(10))
            },
            op.clone(),
        )
        .for_each(|r| {
            let op = op.clone();
            async move {
                match r {
                    Ok(_) => {}
                    // Already logged by the error policy.
                    Err(controller::Error::ReconcilerFailed(..)) => {}
                    Err(controller::Error::QueueError(e)) => {
                        op.metrics.watch_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(error = %e, "a watch failed (missing CRD or RBAC?); changes it would report wait for the periodic requeue");
                    }
                    Err(e) => tracing::debug!(error = %e, "controller event"),
                }
            }
        })
        .await;
}

/// The API client from the in-cluster service account or the local kubeconfig.
pub async fn default_client() -> Result<kube::Client, String> {
    kube::Client::try_default().await.map_err(|e| {
        format!("the operator needs the Kubernetes API (in-cluster config or a kubeconfig): {e}")
    })
}
