//! The kube side of discovery: reads an `InferencePool`, watches the pods it selects, and hands
//! the endpoints ([`crate::discovery::endpoints`]) to the caller whenever they change. The API
//! client is injected, so tests drive it with a mocked API server.

use crate::discovery::{PodFacts, PoolConfig, Skipped, endpoints};
use crate::pool::{self, InferencePoolSpec};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kvgate_wire::workers::WorkerEntry;
use std::collections::BTreeMap;

/// An InferencePool's pod selector and target ports.
pub type PoolSpec = (BTreeMap<String, String>, Vec<u16>);

fn pool_api(client: kube::Client, namespace: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(pool::GROUP, pool::VERSION, pool::KIND);
    let ar = ApiResource::from_gvk_with_plural(&gvk, "inferencepools");
    Api::namespaced_with(client, namespace, &ar)
}

/// The selector and target ports in an InferencePool object, or why they are unusable.
fn pool_spec(obj: &DynamicObject, namespace: &str, name: &str) -> Result<PoolSpec, String> {
    let spec: InferencePoolSpec = serde_json::from_value(obj.data["spec"].clone())
        .map_err(|e| format!("InferencePool {namespace}/{name} has an unreadable spec: {e}"))?;
    let ports = spec
        .target_ports
        .iter()
        .map(|p| {
            u16::try_from(p.number)
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    format!(
                        "InferencePool {namespace}/{name}: target port {} is out of range",
                        p.number
                    )
                })
        })
        .collect::<Result<Vec<u16>, String>>()?;
    if ports.is_empty() || spec.selector.match_labels.is_empty() {
        return Err(format!(
            "InferencePool {namespace}/{name} needs a selector and at least one target port"
        ));
    }
    Ok((spec.selector.match_labels, ports))
}

/// The selector and target ports of InferencePool `name` in `namespace`.
pub async fn read_pool(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> Result<PoolSpec, String> {
    let obj = pool_api(client, namespace)
        .get(name)
        .await
        .map_err(|e| format!("cannot read InferencePool {namespace}/{name}: {e}"))?;
    pool_spec(&obj, namespace, name)
}

/// Follows InferencePool `name`'s pods, and the pool itself: when its selector or target ports
/// change, the pod watch starts over with the new ones (the first update after that replaces
/// the whole endpoint list). `initial` is the spec read at start-up. A pool deleted or made
/// unusable keeps the last endpoints, with a warning, until it is fixed.
pub async fn watch_pool_pods(
    client: kube::Client,
    namespace: &str,
    name: &str,
    initial: PoolSpec,
    template: PoolConfig,
    mut on_update: impl FnMut(Vec<WorkerEntry>, Vec<Skipped>) -> bool,
) {
    let specs = watcher::watcher(
        pool_api(client.clone(), namespace),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .default_backoff();
    futures::pin_mut!(specs);
    let mut spec = initial;
    loop {
        let cfg = PoolConfig {
            selector: spec.0.clone(),
            target_ports: spec.1.clone(),
            ..template.clone()
        };
        let pods = watch_pods(client.clone(), namespace, cfg, &mut on_update);
        futures::pin_mut!(pods);
        let next = loop {
            tokio::select! {
                _ = &mut pods => return,
                ev = specs.next() => match ev {
                    None => {
                        pods.await;
                        return;
                    }
                    Some(Ok(Event::Apply(o) | Event::InitApply(o))) if o.metadata.name.as_deref() != Some(name) => {}
                    Some(Ok(Event::Apply(o) | Event::InitApply(o))) => match pool_spec(&o, namespace, name) {
                        Ok(s) if s != spec => break s,
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "keeping the last pool spec"),
                    },
                    Some(Ok(Event::Delete(_))) => tracing::warn!(
                        namespace, pool = name,
                        "InferencePool deleted; keeping its last endpoints until it is back"
                    ),
                    Some(Ok(Event::Init | Event::InitDone)) => {}
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, namespace, pool = name, "InferencePool watch failed; retrying");
                    }
                },
            }
        };
        tracing::info!(
            namespace,
            pool = name,
            selector = ?next.0,
            target_ports = ?next.1,
            "InferencePool changed; following its new pods"
        );
        spec = next;
    }
}

/// Watches the pods of `pool` in `namespace`. After the first complete list, and after every
/// event that changes the endpoints, calls `on_update(endpoints, skipped)`; returns when it
/// returns false. A failed or expired watch is logged and resumed with backoff (a re-list
/// replaces the whole view, so pods deleted meanwhile go).
pub async fn watch_pods(
    client: kube::Client,
    namespace: &str,
    pool: PoolConfig,
    mut on_update: impl FnMut(Vec<WorkerEntry>, Vec<Skipped>) -> bool,
) {
    let api: Api<Pod> = Api::namespaced(client, namespace);
    let selector = pool
        .selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let stream =
        watcher::watcher(api, watcher::Config::default().labels(&selector)).default_backoff();
    futures::pin_mut!(stream);
    let mut pods: BTreeMap<String, PodFacts> = BTreeMap::new();
    let mut relist: Option<BTreeMap<String, PodFacts>> = None;
    let mut synced = false;
    let mut last: Option<(Vec<WorkerEntry>, Vec<Skipped>)> = None;
    let facts = |p: &Pod| PodFacts::from_json(&serde_json::to_value(p).unwrap_or_default());
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(Event::Init) => relist = Some(BTreeMap::new()),
            Ok(Event::InitApply(p)) => {
                let f = facts(&p);
                if let Some(m) = relist.as_mut() {
                    m.insert(f.name.clone(), f);
                }
            }
            Ok(Event::InitDone) => {
                if let Some(m) = relist.take() {
                    pods = m;
                }
                synced = true;
            }
            Ok(Event::Apply(p)) => {
                let f = facts(&p);
                pods.insert(f.name.clone(), f);
            }
            Ok(Event::Delete(p)) => {
                pods.remove(&facts(&p).name);
            }
            Err(e) => {
                tracing::warn!(error = %e, namespace, selector, "pod watch failed; retrying");
                continue;
            }
        }
        if !synced || relist.is_some() {
            continue;
        }
        let now = endpoints(pods.values(), &pool);
        if last.as_ref() != Some(&now) {
            for s in now
                .1
                .iter()
                .filter(|s| last.as_ref().is_none_or(|(_, old)| !old.contains(s)))
            {
                tracing::warn!(pod = %s.pod, reason = %s.reason, "pod left out of the pool");
            }
            last = Some(now.clone());
            if !on_update(now.0, now.1) {
                return;
            }
        }
    }
}
