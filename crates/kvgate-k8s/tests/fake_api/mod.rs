//! An in-memory Kubernetes API server behind tower-test's mock service, enough for the
//! operator: get, list (label selectors), watch (held open), server-side apply, JSON merge patch
//! of `/status` with a resourceVersion precondition, delete with a uid precondition, and API
//! discovery for Istio, and create (POST) and replace (PUT) with resourceVersion conflicts, as
//! leader election does with Leases. Every request is logged (with the client that sent it, the
//! time and the status answered) so tests can assert what was written, and the store can be
//! edited by hand between reconciles (someone's `kubectl edit`). Several clients may share one
//! fake ([`Fake::client`]): copies of the operator against one cluster.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use http::{Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug)]
pub struct Logged {
    /// Which client sent it ([`Fake::client`]'s name; empty for the one of [`Fake::new`]).
    pub client: String,
    pub at: std::time::Instant,
    /// The status answered (0: not answered yet, e.g. a held watch).
    pub status: u16,
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
}

impl Logged {
    pub fn is_write(&self) -> bool {
        self.method != "GET"
    }
}

/// (plural, namespace, name) -> object.
pub type Key = (String, String, String);

#[derive(Default)]
pub struct State {
    pub objects: BTreeMap<Key, Value>,
    /// The cluster serves networking.istio.io/v1beta1 DestinationRules.
    pub istio: bool,
    /// The InferencePool CRD is installed.
    pub pools: bool,
    pub rv: u64,
    pub uids: u64,
    pub log: Vec<Logged>,
    held: Vec<Held>,
    /// Every change, for watches that start behind (resourceVersion, key, event type, object).
    history: Vec<(u64, Key, String, Value)>,
    /// Lists of these plurals wait for [`Fake::release`].
    hold_lists: std::collections::BTreeSet<String>,
    held_lists: Vec<Waiting>,
    /// Named GETs of this plural are held until this many wait, then answered together.
    gate: Option<(String, usize, Vec<Waiting>)>,
    /// Stored just before the next create or replace of this plural is handled: a write of
    /// someone else's that lands first.
    races: Vec<(String, Value)>,
    /// Requests of these clients for these plurals are answered 503, as if the API server
    /// were out of reach for them: (client, plural).
    pub cut_off: std::collections::BTreeSet<(String, String)>,
}

/// A request waiting for its answer.
type Waiting = (Logged, tower_test::mock::SendResponse<Response<Body>>);

/// A watch request waiting for a change.
struct Held {
    plural: String,
    ns: Option<String>,
    labels: String,
    fields: String,
    send: tower_test::mock::SendResponse<Response<Body>>,
}

#[derive(Clone)]
pub struct Fake(pub Arc<Mutex<State>>);

fn respond(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string().into_bytes()))
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    respond(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}),
    )
}

/// `/api/v1/...` or `/apis/{g}/{v}/...` -> (group/version, rest segments).
fn split(path: &str) -> (String, Vec<String>) {
    let segs: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(str::to_string)
        .collect();
    if segs.first().map(String::as_str) == Some("api") {
        (segs[1].clone(), segs[2..].to_vec())
    } else {
        (format!("{}/{}", segs[1], segs[2]), segs[3..].to_vec())
    }
}

fn query_param(q: &str, k: &str) -> Option<String> {
    q.split('&').find_map(|kv| {
        let (a, b) = kv.split_once('=')?;
        (a == k).then(|| {
            b.replace("%3D", "=")
                .replace("%2F", "/")
                .replace("%2C", ",")
                .replace('+', " ")
        })
    })
}

fn fields_match(o: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "metadata.name" => o["metadata"]["name"] == v,
            "metadata.namespace" => o["metadata"]["namespace"] == v,
            _ => false,
        }
    })
}

fn labels_match(o: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        o["metadata"]["labels"][k] == v
    })
}

/// Apply-style merge: maps merge, except the atomic ones (`atomic`: paths) which are replaced;
/// lists of objects keyed by `uid`, `type` or `port` merge by key; other lists are replaced.
fn merge_apply(into: &mut Value, from: &Value, path: &str, atomic: &[&str]) {
    if atomic.contains(&path) {
        *into = from.clone();
        return;
    }
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(k) {
                    Some(slot) => merge_apply(slot, v, &format!("{path}/{k}"), atomic),
                    None => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            let key = ["uid", "type", "port"]
                .into_iter()
                .find(|k| b.iter().all(|x| x.get(k).is_some()) && !b.is_empty());
            match key {
                Some(k) => {
                    for x in b {
                        match a.iter_mut().find(|y| y[k] == x[k]) {
                            Some(y) => merge_apply(y, x, path, atomic),
                            None => a.push(x.clone()),
                        }
                    }
                }
                None => *a = b.clone(),
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

/// RFC 7386.
fn merge_patch(into: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !into.is_object() {
                *into = json!({});
            }
            let o = into.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    o.remove(k);
                } else {
                    merge_patch(o.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        v => *into = v.clone(),
    }
}

impl Fake {
    pub fn new(istio: bool) -> (Self, kube::Client) {
        let fake = Fake(Arc::new(Mutex::new(State {
            istio,
            pools: true,
            ..State::default()
        })));
        let client = fake.client("");
        (fake, client)
    }

    /// Another client of the same cluster; its requests are logged as `name`'s.
    pub fn client(&self, name: &str) -> kube::Client {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let f = self.clone();
        let who = name.to_string();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let logged = Logged {
                    client: who.clone(),
                    at: std::time::Instant::now(),
                    status: 0,
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_string(),
                    query: parts.uri.query().unwrap_or_default().to_string(),
                    content_type: parts
                        .headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string(),
                    body,
                };
                let mut st = f.0.lock().unwrap();
                st.log.push(logged.clone());
                let (_, rest) = split(&logged.path);
                let cut = rest
                    .iter()
                    .any(|seg| st.cut_off.contains(&(who.clone(), seg.clone())));
                if cut {
                    if let Some(l) = st.log.last_mut() {
                        l.status = 503;
                    }
                    send.send_response(status(503, "ServiceUnavailable", "cut off by the test"));
                    continue;
                }
                if logged.method == "GET"
                    && query_param(&logged.query, "watch").as_deref() == Some("true")
                {
                    // Held open until an object it selects changes; then answered with that
                    // event, and the watcher comes back for more.
                    let (_, rest) = split(&logged.path);
                    let (ns, plural) = match rest.as_slice() {
                        [p] => (None, p.clone()),
                        [_, ns, p] => (Some(ns.clone()), p.clone()),
                        _ => (None, String::new()),
                    };
                    let h = Held {
                        plural,
                        ns,
                        labels: query_param(&logged.query, "labelSelector").unwrap_or_default(),
                        fields: query_param(&logged.query, "fieldSelector").unwrap_or_default(),
                        send,
                    };
                    // Changes after the version the watch starts from are sent at once, as
                    // the API server does.
                    let since: u64 = query_param(&logged.query, "resourceVersion")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(u64::MAX);
                    let missed: String = st
                        .history
                        .iter()
                        .filter(|(rv, k, _, o)| *rv > since && h.selects(k, o))
                        .map(|(_, _, t, o)| format!("{}\n", json!({"type": t, "object": o})))
                        .collect();
                    if missed.is_empty() {
                        st.held.push(h);
                    } else {
                        h.send.send_response(
                            Response::builder()
                                .status(200)
                                .header("content-type", "application/json")
                                .body(Body::from(missed.into_bytes()))
                                .unwrap(),
                        );
                    }
                    continue;
                }
                if logged.method == "GET" {
                    let (_, rest) = split(&logged.path);
                    let plural = match rest.as_slice() {
                        [p] | [_, _, p] => Some(p.clone()),
                        _ => None,
                    };
                    if plural.is_some_and(|p| st.hold_lists.contains(&p)) {
                        st.held_lists.push((logged, send));
                        continue;
                    }
                    if let [_, _, p, _] = rest.as_slice()
                        && let Some((gated, n, waiting)) = st.gate.as_mut()
                        && gated == p
                    {
                        waiting.push((logged, send));
                        if waiting.len() >= *n {
                            let (_, _, waiting) = st.gate.take().unwrap();
                            for (l, send) in waiting {
                                let resp = st.handle(&l);
                                st.set_status(&l, resp.status().as_u16());
                                send.send_response(resp);
                            }
                        }
                        continue;
                    }
                }
                let resp = st.handle(&logged);
                if let Some(l) = st.log.last_mut() {
                    l.status = resp.status().as_u16();
                }
                send.send_response(resp);
            }
        });
        kube::Client::new(svc, "default")
    }

    /// Answers `client`'s requests for `plural` with 503 (`cut`), or again normally.
    pub fn cut_off(&self, client: &str, plural: &str, cut: bool) {
        let k = (client.to_string(), plural.to_string());
        let mut st = self.state();
        if cut {
            st.cut_off.insert(k);
        } else {
            st.cut_off.remove(&k);
        }
    }

    /// Holds named GETs of `plural` until `n` of them wait, then answers them together: `n`
    /// clients that all read the same thing before any writes.
    pub fn gate_gets(&self, plural: &str, n: usize) {
        self.state().gate = Some((plural.to_string(), n, Vec::new()));
    }

    /// Stores `o` just before the next create or replace of `plural` is handled, as if another
    /// client's write landed first.
    pub fn race_next_write(&self, plural: &str, o: Value) {
        self.state().races.push((plural.to_string(), o));
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    pub fn get(&self, plural: &str, ns: &str, name: &str) -> Option<Value> {
        self.state()
            .objects
            .get(&(plural.into(), ns.into(), name.into()))
            .cloned()
    }

    /// Stores `o` as a client's create/update would (uid and resourceVersion assigned).
    pub fn put(&self, plural: &str, o: Value) {
        self.state().put(plural, o);
    }

    /// Changes an object in place (a hand edit).
    pub fn edit(&self, plural: &str, ns: &str, name: &str, f: impl FnOnce(&mut Value)) {
        let mut o = self.get(plural, ns, name).expect("object to edit");
        f(&mut o);
        self.put(plural, o);
    }

    pub fn remove(&self, plural: &str, ns: &str, name: &str) {
        let mut st = self.state();
        let key = (plural.to_string(), ns.to_string(), name.to_string());
        if let Some(mut o) = st.objects.remove(&key) {
            st.rv += 1;
            o["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            st.notify(&key, "DELETED", &o);
        }
    }

    /// Holds list requests for `plural` until [`release`](Self::release).
    pub fn hold(&self, plural: &str) {
        self.state().hold_lists.insert(plural.to_string());
    }

    /// Answers the held lists of `plural` (with the objects as they are now) and stops holding.
    pub fn release(&self, plural: &str) {
        let mut st = self.state();
        st.hold_lists.remove(plural);
        let (held, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut st.held_lists)
            .into_iter()
            .partition(|(l, _)| l.path.ends_with(&format!("/{plural}")));
        st.held_lists = keep;
        for (logged, send) in held {
            let resp = st.handle(&logged);
            send.send_response(resp);
        }
    }

    /// Takes the log so far.
    pub fn take_log(&self) -> Vec<Logged> {
        std::mem::take(&mut self.state().log)
    }

    /// Takes the writes (non-GET requests) so far, dropping the reads.
    pub fn take_writes(&self) -> Vec<Logged> {
        self.take_log()
            .into_iter()
            .filter(Logged::is_write)
            .collect()
    }
}

impl Held {
    fn selects(&self, key: &Key, o: &Value) -> bool {
        let (plural, ns, _) = key;
        self.plural == *plural
            && self.ns.as_ref().is_none_or(|n| n == ns)
            && labels_match(o, &self.labels)
            && fields_match(o, &self.fields)
    }
}

impl State {
    /// Stores `o` as a client's create/update would (uid and resourceVersion assigned).
    fn put(&mut self, plural: &str, mut o: Value) {
        let ns = o["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = o["metadata"]["name"].as_str().unwrap().to_string();
        let key = (plural.to_string(), ns, name);
        if o["metadata"]["uid"].is_null() {
            let old_uid = self.objects.get(&key).map(|x| x["metadata"]["uid"].clone());
            o["metadata"]["uid"] = match old_uid {
                Some(u) => u,
                None => {
                    self.uids += 1;
                    json!(format!("uid-{}", self.uids))
                }
            };
        }
        self.rv += 1;
        o["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let event = if self.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.objects.insert(key.clone(), o.clone());
        self.notify(&key, event, &o);
    }

    fn set_status(&mut self, l: &Logged, status: u16) {
        if let Some(x) = self
            .log
            .iter_mut()
            .rev()
            .find(|x| x.at == l.at && x.path == l.path && x.client == l.client)
        {
            x.status = status;
        }
    }

    /// Records a change and answers the held watches that select `o`.
    fn notify(&mut self, key: &Key, event: &str, o: &Value) {
        self.history
            .push((self.rv, key.clone(), event.to_string(), o.clone()));
        let (hit, keep): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|h| h.selects(key, o));
        self.held = keep;
        for h in hit {
            let line = format!("{}\n", json!({"type": event, "object": o}));
            h.send.send_response(
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(Body::from(line.into_bytes()))
                    .unwrap(),
            );
        }
    }

    fn handle(&mut self, r: &Logged) -> Response<Body> {
        let (gv, rest) = split(&r.path);
        if gv == "networking.istio.io/v1beta1" && !self.istio {
            return status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            );
        }
        if gv == "inference.networking.k8s.io/v1" && !self.pools {
            return status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            );
        }
        // API discovery.
        if rest.is_empty() {
            return respond(
                200,
                &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                        "resources": [{"name": "destinationrules", "singularName": "destinationrule",
                                       "namespaced": true, "kind": "DestinationRule",
                                       "verbs": ["get", "list", "watch", "patch", "delete"]}]}),
            );
        }
        let (ns, plural, name, sub) = match rest.as_slice() {
            [p] => (None, p.clone(), None, None),
            [n, ns, p] if n == "namespaces" => (Some(ns.clone()), p.clone(), None, None),
            [n, ns, p, name] if n == "namespaces" => {
                (Some(ns.clone()), p.clone(), Some(name.clone()), None)
            }
            [n, ns, p, name, sub] if n == "namespaces" => (
                Some(ns.clone()),
                p.clone(),
                Some(name.clone()),
                Some(sub.clone()),
            ),
            _ => return status(404, "NotFound", "no such path"),
        };
        if matches!(r.method.as_str(), "POST" | "PUT") {
            // Someone else's write that lands first.
            if let Some(i) = self.races.iter().position(|(p, _)| *p == plural) {
                let (_, o) = self.races.remove(i);
                self.put(&plural, o);
            }
        }
        if r.method == "POST" && name.is_none() {
            let ns = ns.unwrap_or_default();
            let Some(name) = r.body["metadata"]["name"].as_str() else {
                return status(422, "Invalid", "metadata.name: Required value");
            };
            let key = (plural.clone(), ns.clone(), name.to_string());
            if self.objects.contains_key(&key) {
                return status(
                    409,
                    "AlreadyExists",
                    &format!("{plural} \"{name}\" already exists"),
                );
            }
            let mut o = r.body.clone();
            o["metadata"]["namespace"] = json!(ns);
            o["metadata"]["uid"] = Value::Null;
            self.put(&plural, o);
            return respond(201, &self.objects[&key]);
        }
        let Some(name) = name else {
            // A list.
            let selector = query_param(&r.query, "labelSelector").unwrap_or_default();
            let fields = query_param(&r.query, "fieldSelector").unwrap_or_default();
            let items: Vec<Value> = self
                .objects
                .iter()
                .filter(|((p, n, _), o)| {
                    *p == plural
                        && ns.as_ref().is_none_or(|ns| ns == n)
                        && labels_match(o, &selector)
                        && fields_match(o, &fields)
                })
                .map(|(_, o)| o.clone())
                .collect();
            return respond(
                200,
                &json!({"apiVersion": "v1", "kind": "List",
                        "metadata": {"resourceVersion": self.rv.to_string()}, "items": items}),
            );
        };
        let ns = ns.unwrap_or_default();
        let key = (plural.clone(), ns.clone(), name.clone());
        match (r.method.as_str(), sub.as_deref()) {
            ("GET", None) => match self.objects.get(&key) {
                Some(o) => respond(200, o),
                None => status(404, "NotFound", &format!("{plural} \"{name}\" not found")),
            },
            ("PUT", None) => {
                let Some(old) = self.objects.get(&key) else {
                    return status(404, "NotFound", &format!("{plural} \"{name}\" not found"));
                };
                if let Some(want) = r.body["metadata"]["resourceVersion"].as_str()
                    && old["metadata"]["resourceVersion"] != want
                {
                    return status(
                        409,
                        "Conflict",
                        &format!(
                            "Operation cannot be fulfilled on {plural} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                        ),
                    );
                }
                let mut o = r.body.clone();
                o["metadata"]["uid"] = old["metadata"]["uid"].clone();
                o["metadata"]["namespace"] = json!(ns);
                self.put(&plural, o);
                respond(200, &self.objects[&key])
            }
            ("PATCH", None) if r.content_type.starts_with("application/apply-patch") => {
                let created = !self.objects.contains_key(&key);
                let mut o = self.objects.get(&key).cloned().unwrap_or(json!({}));
                // A Service's selector is an atomic map: an apply replaces it whole.
                let atomic: &[&str] = if plural == "services" {
                    &["/spec/selector"]
                } else {
                    &[]
                };
                merge_apply(&mut o, &r.body, "", atomic);
                if created {
                    self.uids += 1;
                    o["metadata"]["uid"] = json!(format!("uid-{}", self.uids));
                }
                self.rv += 1;
                o["metadata"]["resourceVersion"] = json!(self.rv.to_string());
                self.objects.insert(key.clone(), o.clone());
                self.notify(&key, if created { "ADDED" } else { "MODIFIED" }, &o);
                respond(if created { 201 } else { 200 }, &o)
            }
            ("PATCH", Some("status")) if r.content_type == "application/merge-patch+json" => {
                let Some(o) = self.objects.get_mut(&key) else {
                    return status(404, "NotFound", &format!("{plural} \"{name}\" not found"));
                };
                if let Some(want) = r.body["metadata"]["resourceVersion"].as_str()
                    && o["metadata"]["resourceVersion"] != want
                {
                    return status(
                        409,
                        "Conflict",
                        "the object has been modified; please apply your changes to the latest version and try again",
                    );
                }
                if let Some(s) = r.body.get("status") {
                    merge_patch(&mut o["status"], s);
                }
                self.rv += 1;
                o["metadata"]["resourceVersion"] = json!(self.rv.to_string());
                let o = o.clone();
                self.notify(&key, "MODIFIED", &o);
                respond(200, &o)
            }
            ("DELETE", None) => {
                let Some(o) = self.objects.get(&key) else {
                    return status(404, "NotFound", &format!("{plural} \"{name}\" not found"));
                };
                if let Some(uid) = r.body["preconditions"]["uid"].as_str()
                    && o["metadata"]["uid"] != uid
                {
                    return status(409, "Conflict", "Precondition failed: UID in precondition");
                }
                let mut o = self.objects.remove(&key).unwrap();
                self.rv += 1;
                o["metadata"]["resourceVersion"] = json!(self.rv.to_string());
                self.notify(&key, "DELETED", &o);
                respond(200, &o)
            }
            _ => status(405, "MethodNotAllowed", "not supported by the fake"),
        }
    }
}
