//! What `kvgate operator` does for one DynamoGraphDeployment, decided without IO: given the
//! graph, whether Istio's `DestinationRule` is served, and the objects that exist now, which
//! objects to server-side apply, which to delete, and the status condition to report.
//! [`crate::controller`] fetches the inputs and carries the plan out.
//!
//! The rules:
//! - the objects are exactly what [`render`] prints, owned by the graph (controller owner
//!   reference), so deleting the graph garbage-collects them;
//! - an object is applied only when a field kvgate sets differs from the live object, so fields
//!   that others add (annotations, extra Service ports, ...) are never touched and an unchanged
//!   graph costs no writes; a hand edit of a field kvgate sets is put back (forced apply);
//! - an object kvgate did not create (no owner reference to the graph and no
//!   `app.kubernetes.io/managed-by: kvgate` label) is never overwritten or deleted: the graph
//!   reports the conflict instead;
//! - objects the graph no longer needs (EPP component removed, service mesh turned off) are
//!   deleted when the graph owns them;
//! - with the service mesh on but no `DestinationRule` API, the rest is applied and the
//!   condition says why the rule is missing.

use crate::dgd::{self, DynamoGraphDeployment};
use crate::render::{MANAGED_BY, RenderError, RenderOptions, render};
use serde_json::{Value, json};

/// The server-side apply field manager.
pub const FIELD_MANAGER: &str = "kvgate";
/// The condition kvgate keeps in the graph's `status.conditions` (a qualified type, so it never
/// collides with Dynamo's own conditions).
pub const CONDITION_TYPE: &str = "kvgate.io/InferencePoolReady";

/// The kinds the operator writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    InferencePool,
    DestinationRule,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::InferencePool, Kind::DestinationRule];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::InferencePool => "InferencePool",
            Kind::DestinationRule => "DestinationRule",
        }
    }

    /// The object's name for graph `graph`.
    pub fn object_name(self, graph: &str) -> String {
        match self {
            Kind::Service | Kind::DestinationRule => format!("{graph}-epp"),
            Kind::InferencePool => format!("{graph}-pool"),
        }
    }
}

/// The live objects of one graph, as read from the API server (`None`: not found, or for the
/// `DestinationRule`: its API is not served).
#[derive(Clone, Debug, Default)]
pub struct Live {
    pub service: Option<Value>,
    pub pool: Option<Value>,
    pub destination_rule: Option<Value>,
}

impl Live {
    pub fn get(&self, k: Kind) -> Option<&Value> {
        match k {
            Kind::Service => self.service.as_ref(),
            Kind::InferencePool => self.pool.as_ref(),
            Kind::DestinationRule => self.destination_rule.as_ref(),
        }
    }

    pub fn set(&mut self, k: Kind, v: Option<Value>) {
        match k {
            Kind::Service => self.service = v,
            Kind::InferencePool => self.pool = v,
            Kind::DestinationRule => self.destination_rule = v,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Server-side apply of this object (field manager [`FIELD_MANAGER`], forced).
    Apply(Kind, Value),
    /// Delete `name` (the graph owns it and no longer needs it).
    Delete(Kind, String),
}

/// One `metav1.Condition`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
    pub observed_generation: Option<i64>,
}

impl Condition {
    /// As JSON; `last_transition` is kept from `previous` unless the status changed.
    pub fn to_json(&self, previous: Option<&Value>, now: &str) -> Value {
        let status = if self.status { "True" } else { "False" };
        let since = previous
            .filter(|p| p["status"] == status)
            .and_then(|p| p["lastTransitionTime"].as_str())
            .unwrap_or(now);
        let mut c = json!({
            "type": CONDITION_TYPE,
            "status": status,
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": since,
        });
        if let Some(g) = self.observed_generation {
            c["observedGeneration"] = json!(g);
        }
        c
    }

    /// Whether `live` (a condition in the graph's status) already says this.
    pub fn matches(&self, live: &Value) -> bool {
        live["status"] == if self.status { "True" } else { "False" }
            && live["reason"] == self.reason
            && live["message"] == self.message.as_str()
            && live["observedGeneration"].as_i64() == self.observed_generation
    }
}

/// Condition reasons.
pub mod reason {
    pub const APPLIED: &str = "Applied";
    pub const ISTIO_CRD_MISSING: &str = "IstioCRDMissing";
    pub const INVALID_GRAPH: &str = "InvalidGraph";
    pub const NOT_OWNED: &str = "NotOwned";
    pub const NO_ENDPOINT_PICKER: &str = "NoEndpointPicker";
    pub const APPLY_FAILED: &str = "ApplyFailed";
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// `None`: leave the graph's status alone (a graph that never had an EPP).
    pub condition: Option<Condition>,
}

/// The graph's current kvgate condition, if any.
pub fn current_condition(graph: &Value) -> Option<&Value> {
    graph["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == CONDITION_TYPE)
}

/// Decides what to do for `graph` (the object as the API server returned it). `istio`: whether
/// the `DestinationRule` API is served; `live`: the objects that exist now.
pub fn plan(graph: &Value, opts: &RenderOptions, istio: bool, live: &Live) -> Plan {
    let generation = graph["metadata"]["generation"].as_i64();
    let nothing = |condition| Plan {
        actions: Vec::new(),
        condition,
    };
    // Being deleted: garbage collection removes what the graph owns.
    if !graph["metadata"]["deletionTimestamp"].is_null() {
        return nothing(None);
    }
    let uid = graph["metadata"]["uid"].as_str().unwrap_or_default();
    let name = graph["metadata"]["name"].as_str().unwrap_or_default();
    let invalid = |message: String| Condition {
        status: false,
        reason: reason::INVALID_GRAPH,
        message,
        observed_generation: generation,
    };
    let d: DynamoGraphDeployment = match serde_json::from_value(graph.clone()) {
        Ok(d) => d,
        Err(e) => return nothing(Some(invalid(format!("cannot read the graph: {e}")))),
    };
    if uid.is_empty() {
        return nothing(Some(invalid(
            "the graph has no metadata.uid to own its objects by".into(),
        )));
    }
    let rendered = match render(&d, opts) {
        Ok(r) => r,
        Err(RenderError::NoEpp(_)) => {
            // Remove what an earlier EPP component left; report only if kvgate reported before.
            let actions: Vec<Action> = Kind::ALL
                .into_iter()
                .filter(|&k| live.get(k).is_some_and(|o| owned_by(o, uid)))
                .map(|k| Action::Delete(k, k.object_name(name)))
                .collect();
            let condition = current_condition(graph).map(|_| Condition {
                status: false,
                reason: reason::NO_ENDPOINT_PICKER,
                message: "the graph has no component with componentType: epp; kvgate removed the objects it had created for one".into(),
                observed_generation: generation,
            });
            return Plan { actions, condition };
        }
        Err(e) => return nothing(Some(invalid(e.to_string()))),
    };
    let mut desired: Vec<(Kind, Value)> = vec![
        (Kind::Service, rendered.service),
        (
            Kind::InferencePool,
            serde_json::to_value(&rendered.pool).unwrap_or(Value::Null),
        ),
    ];
    let mut skipped_rule = false;
    for (_, o) in desired.iter_mut() {
        *o = with_applied_hash(std::mem::take(o));
    }
    match rendered.destination_rule.map(with_applied_hash) {
        Some(r) if istio => desired.push((Kind::DestinationRule, r)),
        Some(_) => skipped_rule = true,
        None => {}
    }

    // Never take over somebody else's object.
    let foreign: Vec<String> = desired
        .iter()
        .filter_map(|(k, _)| {
            let o = live.get(*k)?;
            (!owned_by(o, uid) && !adoptable(o, name)).then(|| {
                format!(
                    "{} {}/{}",
                    k.as_str(),
                    o["metadata"]["namespace"].as_str().unwrap_or_default(),
                    o["metadata"]["name"].as_str().unwrap_or_default()
                )
            })
        })
        .collect();
    if !foreign.is_empty() {
        return nothing(Some(Condition {
            status: false,
            reason: reason::NOT_OWNED,
            message: format!(
                "{} exist{} but kvgate did not create {} for this graph, so it leaves {} alone; delete {}, or label {} {}=kvgate and {}={name} to let kvgate adopt {}",
                foreign.join(", "),
                if foreign.len() == 1 { "s" } else { "" },
                them(&foreign),
                them(&foreign),
                them(&foreign),
                them(&foreign),
                MANAGED_BY.0,
                dgd::labels::GRAPH,
                them(&foreign),
            ),
            observed_generation: generation,
        }));
    }

    let mut actions: Vec<Action> = desired
        .iter()
        .filter(|(k, want)| {
            live.get(*k)
                .is_none_or(|have| !contains(have, want, "", k.atomic_fields()))
        })
        .map(|(k, want)| Action::Apply(*k, want.clone()))
        .collect();
    if !desired.iter().any(|(k, _)| *k == Kind::DestinationRule)
        && live
            .destination_rule
            .as_ref()
            .is_some_and(|o| owned_by(o, uid))
    {
        actions.push(Action::Delete(
            Kind::DestinationRule,
            Kind::DestinationRule.object_name(name),
        ));
    }
    let objects = desired
        .iter()
        .map(|(k, o)| {
            format!(
                "{} {}",
                k.as_str(),
                o["metadata"]["name"].as_str().unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let condition = if skipped_rule {
        Condition {
            status: true,
            reason: reason::ISTIO_CRD_MISSING,
            message: format!(
                "{objects} are in sync; the service mesh is on but the cluster does not serve networking.istio.io DestinationRules, so none was created (install Istio, or turn dynamo.serviceMesh.enabled off)"
            ),
            observed_generation: generation,
        }
    } else {
        Condition {
            status: true,
            reason: reason::APPLIED,
            message: format!("{objects} are in sync"),
            observed_generation: generation,
        }
    };
    Plan {
        actions,
        condition: Some(condition),
    }
}

fn them(v: &[String]) -> &'static str {
    if v.len() == 1 { "it" } else { "them" }
}

/// kvgate made `o` for the graph with this uid: an owner reference to the graph *and* kvgate's
/// `managed-by` label. An owner reference alone is not enough: Dynamo's own operator makes
/// objects of the same names, owned by the same graph, and those are not kvgate's to rewrite
/// or delete.
pub fn owned_by(o: &Value, uid: &str) -> bool {
    o["metadata"]["labels"][MANAGED_BY.0] == MANAGED_BY.1
        && o["metadata"]["ownerReferences"]
            .as_array()
            .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
}

/// Made by kvgate for this graph without an owner (e.g. `kvgate render | kubectl apply`), and
/// controlled by nobody else: the operator takes it over.
fn adoptable(o: &Value, graph: &str) -> bool {
    let labels = &o["metadata"]["labels"];
    let no_controller = o["metadata"]["ownerReferences"]
        .as_array()
        .is_none_or(|refs| !refs.iter().any(|r| r["controller"] == true));
    labels[MANAGED_BY.0] == MANAGED_BY.1 && labels[dgd::labels::GRAPH] == graph && no_controller
}

impl Kind {
    /// Fields an apply replaces whole (`x-kubernetes-list-type: atomic` lists,
    /// `x-kubernetes-map-type: atomic` maps): anything else in them is drift. Elsewhere, lists
    /// are maps (`ports` by port, `ownerReferences` by uid) and maps are granular, so entries
    /// of other managers may sit beside kvgate's.
    pub fn atomic_fields(self) -> &'static [&'static str] {
        match self {
            Kind::Service => &["/spec/selector"],
            Kind::InferencePool => &["/spec/targetPorts"],
            Kind::DestinationRule => &[],
        }
    }
}

/// Whether every field `want` sets has that value in `have` (`atomic`: paths that must be equal
/// as a whole).
pub fn contains(have: &Value, want: &Value, path: &str, atomic: &[&str]) -> bool {
    if atomic.contains(&path) {
        return match (have, want) {
            (Value::Object(h), Value::Object(w)) => {
                h.len() == w.len()
                    && w.iter().all(|(k, wv)| {
                        h.get(k)
                            .is_some_and(|hv| contains(hv, wv, &format!("{path}/{k}"), atomic))
                    })
            }
            (Value::Array(h), Value::Array(w)) => {
                h.len() == w.len()
                    && h.iter()
                        .zip(w)
                        .all(|(hv, wv)| contains(hv, wv, path, atomic))
            }
            (h, w) => h == w,
        };
    }
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w.iter().all(|(k, wv)| {
            h.get(k)
                .is_some_and(|hv| contains(hv, wv, &format!("{path}/{k}"), atomic))
        }),
        (Value::Array(h), Value::Array(w)) => w
            .iter()
            .all(|wv| h.iter().any(|hv| contains(hv, wv, path, atomic))),
        (h, w) => h == w,
    }
}

/// The annotation holding a hash of what kvgate last applied: when what kvgate would apply
/// changes, even by dropping a field (which the live object, still carrying it, cannot show),
/// the hash differs and the object is applied again, and server-side apply removes the field.
pub const APPLIED_HASH: &str = "kvgate.io/applied-hash";

/// `o` with [`APPLIED_HASH`] set to a hash of `o` itself.
fn with_applied_hash(mut o: Value) -> Value {
    let hash = xxhash_rust::xxh3::xxh3_64(o.to_string().as_bytes());
    if !o["metadata"]["annotations"].is_object() {
        o["metadata"]["annotations"] = json!({});
    }
    o["metadata"]["annotations"][APPLIED_HASH] = json!(format!("{hash:016x}"));
    o
}

/// The graph's `status.conditions` with kvgate's condition set to `c`; `None` when it already
/// says that (nothing to write).
pub fn conditions_with(graph: &Value, c: &Condition, now: &str) -> Option<Vec<Value>> {
    let previous = current_condition(graph);
    if previous.is_some_and(|p| c.matches(p)) {
        return None;
    }
    let mut list: Vec<Value> = graph["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let new = c.to_json(previous, now);
    match list.iter_mut().find(|x| x["type"] == CONDITION_TYPE) {
        Some(slot) => *slot = new,
        None => list.push(new),
    }
    Some(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containment_follows_list_semantics() {
        let have = json!({"spec": {"ports": [{"port": 1, "x": 1}, {"port": 2}],
                                   "targetPorts": [{"number": 8000}, {"number": 9000}]},
                          "metadata": {"labels": {"a": "1", "b": "2"}}});
        let atomic = Kind::InferencePool.atomic_fields();
        // Map-like lists: extra entries of other managers are fine, in any order.
        assert!(contains(
            &have,
            &json!({"spec": {"ports": [{"port": 2}, {"port": 1}]}}),
            "",
            atomic
        ));
        assert!(!contains(
            &have,
            &json!({"spec": {"ports": [{"port": 3}]}}),
            "",
            atomic
        ));
        // An atomic list must be exactly kvgate's.
        assert!(!contains(
            &have,
            &json!({"spec": {"targetPorts": [{"number": 8000}]}}),
            "",
            atomic
        ));
        assert!(contains(
            &have,
            &json!({"spec": {"targetPorts": [{"number": 8000}, {"number": 9000}]}}),
            "",
            atomic
        ));
        assert!(contains(
            &have,
            &json!({"metadata": {"labels": {"a": "1"}}}),
            "",
            atomic
        ));
        assert!(!contains(
            &have,
            &json!({"metadata": {"labels": {"a": "2"}}}),
            "",
            atomic
        ));
        assert!(!contains(
            &have,
            &json!({"metadata": {"annotations": {}}}),
            "",
            atomic
        ));
    }

    #[test]
    fn an_atomic_map_must_match_exactly() {
        let atomic = Kind::Service.atomic_fields();
        let have = json!({"spec": {"selector": {"a": "1", "extra": "x"}}, "metadata": {"labels": {"a": "1", "extra": "x"}}});
        assert!(!contains(
            &have,
            &json!({"spec": {"selector": {"a": "1"}}}),
            "",
            atomic
        ));
        assert!(contains(
            &have,
            &json!({"metadata": {"labels": {"a": "1"}}}),
            "",
            atomic
        ));
        assert!(contains(
            &have,
            &json!({"spec": {"selector": {"a": "1", "extra": "x"}}}),
            "",
            atomic
        ));
    }

    #[test]
    fn the_applied_hash_follows_every_field() {
        let a = with_applied_hash(
            json!({"metadata": {"name": "x"}, "spec": {"failureMode": "FailOpen"}}),
        );
        let b = with_applied_hash(json!({"metadata": {"name": "x"}, "spec": {}}));
        assert_ne!(
            a["metadata"]["annotations"][APPLIED_HASH],
            b["metadata"]["annotations"][APPLIED_HASH]
        );
        let again = with_applied_hash(json!({"metadata": {"name": "x"}, "spec": {}}));
        assert_eq!(b, again);
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let c = Condition {
            status: true,
            reason: reason::APPLIED,
            message: "m".into(),
            observed_generation: Some(3),
        };
        let was_true = json!({"status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"});
        let was_false = json!({"status": "False", "lastTransitionTime": "2026-01-01T00:00:00Z"});
        let now = "2026-11-24T00:00:00Z";
        assert_eq!(
            c.to_json(Some(&was_true), now)["lastTransitionTime"],
            "2026-01-01T00:00:00Z"
        );
        assert_eq!(c.to_json(Some(&was_false), now)["lastTransitionTime"], now);
        assert_eq!(c.to_json(None, now)["lastTransitionTime"], now);
        assert_eq!(c.to_json(None, now)["observedGeneration"], 3);
        let graph = json!({"status": {"conditions": [
            {"type": "Ready", "status": "True"},
            c.to_json(None, now),
        ]}});
        assert!(
            conditions_with(&graph, &c, now).is_none(),
            "already says it"
        );
        let newer = Condition {
            observed_generation: Some(4),
            ..c
        };
        let list = conditions_with(&graph, &newer, now).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0]["type"], "Ready");
        assert_eq!(list[1]["observedGeneration"], 4);
    }
}
