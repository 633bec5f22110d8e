#![allow(clippy::unwrap_used, clippy::expect_used)]
//! One fuzz target per parser that reads untrusted bytes. Each replays its corpus
//! (`tests/__fuzz__/fuzz__<target>/corpus`, bolero's layout) and then runs generated inputs:
//! 1 s per target in the suite; `BOLERO_RANDOM_ITERATIONS=N` (and a large
//! `BOLERO_RANDOM_TEST_TIME_MS`) for a long run, see docs/fuzzing.md. Every target checks
//! invariants beyond "no panic" where the code has them (bookings freed, errors named).
//!
//! Inputs: mostly a corpus seed (`corpus/<target>/`) with structural edits and byte
//! mutations ([`Mutant`]); one in eight is a free-form document from the grammar ([`Doc`]).

/// A target's input: seed-based or free-form.
type Input = (Mutant, Doc, u8);

fn bytes_of(input: &Input, seeds: &[serde_json::Value], yaml: bool) -> Vec<u8> {
    let (m, d, pick) = input;
    if pick.is_multiple_of(8) {
        d.render()
    } else {
        m.render(seeds, yaml)
    }
}

use bolero::check;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders, HttpTrailers};
use kvgate_core::config::RouterConfig;
use kvgate_core::replica::{ReplicaId, ReplicaView, SyncMessage, SyncState};
use kvgate_core::router::{Router, WorkerInfo, WorkerRole};
use kvgate_core::scheduler::WorkerCapacity;
use kvgate_core::{DpRank, WorkerId, WorkerRank};
use kvgate_fuzz::{Doc, Mutant, Tally, bin_payload, seeds};
use kvgate_runtime::routing::RoutingService;
use kvgate_wire::dynamo::RouterEvent;
use kvgate_wire::openai::{Endpoint, OpenAiRequest};
use kvgate_wire::workers::WorkersFile;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

const WORKERS: &str = "model: qwen3\nblock_size: 16\nworkers:\n  - name: w0\n    id: 1001\n    url: http://127.0.0.1:9\n    dp_size: 2\n  - name: w1\n    id: 1002\n    url: http://127.0.0.1:10\n";

fn router() -> Router {
    let mut r = Router::new(RouterConfig::default(), 16).unwrap();
    for (id, dp) in [(1001u64, 2u32), (1002, 1)] {
        r.upsert_worker(WorkerInfo {
            id: WorkerId(id),
            dp_size: dp,
            role: WorkerRole::Aggregated,
            capacity: WorkerCapacity::default(),
        });
    }
    r
}

fn service() -> &'static Arc<RoutingService> {
    static S: OnceLock<Arc<RoutingService>> = OnceLock::new();
    S.get_or_init(|| {
        RoutingService::new(
            WorkersFile::parse(WORKERS).unwrap(),
            RouterConfig::default(),
            None,
            0,
        )
        .unwrap()
    })
}

/// OpenAI chat and completions bodies: parse, then tokenize and inject the token ids (what
/// the EPP and the kv-mode frontend do), trusting client token ids or not.
#[test]
fn openai_bodies() {
    static T: Tally = Tally::new("openai_bodies");
    let seeds = seeds("openai");
    check!().with_type::<Input>().for_each(|input| {
        T.count();
        let bytes = bytes_of(input, &seeds, false);
        for endpoint in [Endpoint::Chat, Endpoint::Completion] {
            match OpenAiRequest::parse(endpoint, &bytes) {
                Ok(req) => {
                    T.accept();
                    for trust in [false, true] {
                        if let Ok(p) = service().prepare(&req, Some(&bytes), trust) {
                            // The rewritten body is JSON that carries the ids it was routed on.
                            let v: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
                            let ids = v["nvext"]["token_data"].as_array().unwrap();
                            assert_eq!(ids.len(), p.tokens);
                        }
                    }
                }
                // Every refusal names its problem.
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
    });
    T.report();
}

/// Dynamo event-plane messages (JSON, MessagePack, in and out of the envelope) and vLLM ZMQ
/// batches, decoded and applied to a router's index.
#[test]
fn kv_event_payloads() {
    static T: Tally = Tally::new("kv_event_payloads");
    let seeds = seeds("kv_events");
    check!().with_type::<Input>().for_each(|input| {
        T.count();
        let json = bytes_of(input, &seeds, false);
        ROUTER.with_borrow_mut(|r| {
            // A fresh index now and then, so that events meet both empty and filled ones.
            if T.inputs().is_multiple_of(256) {
                *r = router();
            }
            if apply_events(r, &json) {
                T.accept();
            }
        });
    });
    T.report();
}

thread_local! {
    static ROUTER: std::cell::RefCell<Router> = std::cell::RefCell::new(router());
}

/// Whether any event decoded.
fn apply_events(r: &mut Router, json: &[u8]) -> bool {
    let mut any = false;
    let mut inputs = vec![json.to_vec(), bin_payload(json, 1)];
    // The same value in MessagePack: vLLM's encoding, and Dynamo's envelope payload.
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(json) {
        let mut mp = Vec::new();
        if rmpv::encode::write_value(&mut mp, &kvgate_fuzz::to_msgpack(&v)).is_ok() {
            inputs.push(bin_payload(&mp, 2));
            inputs.push(mp);
        }
    }
    for bytes in &inputs {
        if let Ok(events) = RouterEvent::decode_message(bytes) {
            any |= !events.is_empty();
            for e in events {
                r.apply_event(&e.to_kv_event());
            }
        }
        if let Ok(batch) = kvgate_wire::vllm::decode_batch(bytes) {
            let source = WorkerRank {
                worker: WorkerId(1001),
                dp_rank: DpRank(batch.dp_rank.unwrap_or(0)),
            };
            any |= !batch.events.is_empty();
            for (i, e) in batch.events.iter().enumerate() {
                if let Ok(ev) = kvgate_wire::vllm::to_kv_event(e, source, i as u64, 16) {
                    r.apply_event(&ev);
                }
            }
        }
    }
    any
}

/// Replica-sync messages and state answers from a peer, applied to a router; bookings a
/// peer's garbage added must all be its own (and go with it).
#[test]
fn replica_sync_messages() {
    static T: Tally = Tally::new("replica_sync_messages");
    let seeds = seeds("replica_sync");
    check!().with_type::<Input>().for_each(|input| {
        T.count();
        let bytes = bytes_of(input, &seeds, false);
        let mut r = router();
        let mut view = ReplicaView::new(ReplicaId(1));
        let now = Instant::now();
        if let Ok(m) = serde_json::from_slice::<SyncMessage>(&bytes)
            && m.validate().is_ok()
        {
            T.accept();
            view.on_message(&mut r, m, now);
        }
        if let Ok(s) = serde_json::from_slice::<SyncState>(&bytes)
            && s.validate().is_ok()
        {
            T.accept();
            let from = s.from;
            view.on_state(&mut r, s, now);
            view.on_state_failed(&mut r, from);
        }
        assert_eq!(r.load().num_bookings(), view.peer_bookings());
    });
    T.report();
}

/// Workers files (YAML; JSON is YAML too), with YAML's own traps appended: anchors and
/// aliases (a billion laughs), tags, merge keys.
#[test]
fn workers_files() {
    static T: Tally = Tally::new("workers_files");
    const YAML: &[&str] = &[
        "",
        "\na: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
        "\nworkers: !!binary aGVsbG8=\n",
        "\nbase: &base {name: w, id: 1, url: 'http://x:1'}\nworkers: [{<<: *base}]\n",
        "\n---\nmodel: other\n",
        "\nmodel: !!python/object:os.system [ls]\n",
        "\n\t- tab\n",
    ];
    let seeds = seeds("workers");
    check!()
        .with_type::<(Input, u8)>()
        .for_each(|(input, tail)| {
            T.count();
            let mut text = String::from_utf8_lossy(&bytes_of(input, &seeds, true)).into_owned();
            text.push_str(YAML[*tail as usize % YAML.len()]);
            match WorkersFile::parse(&text) {
                Ok(_) => T.accept(),
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        });
    T.report();
}

/// Kubernetes objects as the API hands them to kvgate: pods for discovery, graphs
/// (DynamoGraphDeployment, YAML or JSON) for the operator and `kvgate render`, and the
/// operator's comparisons on objects read back.
#[test]
fn kubernetes_objects() {
    static T: Tally = Tally::new("kubernetes_objects");
    let cfg = kvgate_k8s::discovery::PoolConfig {
        selector: [("app".to_string(), "qwen3".to_string())].into(),
        target_ports: vec![8000, 8001],
        block_size: 16,
        kv_events_port: Some(5557),
    };
    let seeds = seeds("kubernetes");
    check!().with_type::<(Input, Input)>().for_each(|(a, b)| {
        T.count();
        let (ta, tb) = (bytes_of(a, &seeds, true), bytes_of(b, &seeds, false));
        let text = String::from_utf8_lossy(&ta);
        let _ = kvgate_k8s::render::parse_dgd(&text);
        let _ = kvgate_k8s::render::parse_dgds(&text);
        let va: serde_json::Value = serde_json::from_slice(&ta).unwrap_or_default();
        let vb: serde_json::Value = serde_json::from_slice(&tb).unwrap_or_default();
        let pods = [
            kvgate_k8s::discovery::PodFacts::from_json(&va),
            kvgate_k8s::discovery::PodFacts::from_json(&vb),
        ];
        if kvgate_k8s::render::parse_dgd(&text).is_ok() {
            T.accept();
        }
        let (eps, _skipped) = kvgate_k8s::discovery::endpoints(pods.iter(), &cfg);
        // Endpoints kvgate keeps have distinct worker ids.
        let ids: std::collections::HashSet<_> = eps.iter().map(|e| e.instance_id()).collect();
        assert_eq!(ids.len(), eps.len());
        let _ = kvgate_k8s::operator::owned_by(&va, "uid-1");
        let _ = kvgate_k8s::operator::contains(&va, &vb, "", &["spec.ports"]);
    });
    T.report();
}

/// One ext_proc message, built from generated parts.
#[derive(Clone, Debug, bolero::TypeGenerator)]
enum Msg {
    /// Request headers: path, extra headers, end of stream, declared length.
    Headers(u8, Vec<(u8, u8)>, bool, Option<u32>),
    /// A request body chunk of the document, cut at `at`, end of stream.
    Body(u16, bool),
    Trailers,
    ResponseHeaders(u16, bool),
    /// A response body chunk (a usage report, maybe cut).
    ResponseBody(u8, bool),
    ResponseTrailers,
    /// A message with no request set.
    Empty,
}

const PATHS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/chat/completions?x=1",
    "/health",
    "",
];
const HEADER_KEYS: &[&str] = &[
    "content-length",
    "x-dynamo-worker-instance-id",
    "x-gateway-destination-endpoint",
    "x-gateway-destination-endpoint-subset",
    "traceparent",
    "content-type",
    ":status",
];
const HEADER_VALUES: &[&str] = &[
    "12",
    "99999999999999999999",
    "-1",
    "application/json",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "10.0.0.1:8000",
    "",
];
const RESPONSE_BODIES: &[&str] = &[
    "{\"usage\":{\"prompt_tokens\":20,\"prompt_tokens_details\":{\"cached_tokens\":16}}}",
    "data: {\"choices\":[]}\n\ndata: {\"usage\":{\"prompt_tokens_details\":{\"cached_tokens\":-4}}}\n\n",
    "data: [DONE]\n\n",
    "{\"usage\":{\"prompt_tokens_details\":{\"cached_tokens\":1e99}}}",
];

fn header(k: &str, v: &str, raw: bool) -> HeaderValue {
    HeaderValue {
        key: k.to_string(),
        value: if raw { String::new() } else { v.to_string() },
        raw_value: if raw {
            v.as_bytes().to_vec()
        } else {
            Vec::new()
        },
    }
}

fn to_requests(
    body: &[u8],
    msgs: &[Msg],
) -> Vec<envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest> {
    let mut sent = 0usize;
    msgs.iter()
        .take(16)
        .map(|m| {
            let request = match m {
                Msg::Headers(p, extra, eos, len) => {
                    let mut headers = vec![
                        header(":path", PATHS[*p as usize % PATHS.len()], *p % 2 == 0),
                        header(":method", "POST", false),
                    ];
                    if let Some(n) = len {
                        headers.push(header("content-length", &n.to_string(), false));
                    }
                    for (k, v) in extra.iter().take(8) {
                        headers.push(header(
                            HEADER_KEYS[*k as usize % HEADER_KEYS.len()],
                            HEADER_VALUES[*v as usize % HEADER_VALUES.len()],
                            *v % 2 == 1,
                        ));
                    }
                    Some(Request::RequestHeaders(HttpHeaders {
                        headers: Some(HeaderMap { headers }),
                        end_of_stream: *eos,
                        ..Default::default()
                    }))
                }
                Msg::Body(at, eos) => {
                    let end = if *eos {
                        body.len()
                    } else {
                        (sent + *at as usize).min(body.len())
                    };
                    let chunk = body.get(sent.min(end)..end).unwrap_or_default().to_vec();
                    sent = end;
                    Some(Request::RequestBody(HttpBody {
                        body: chunk,
                        end_of_stream: *eos,
                        ..Default::default()
                    }))
                }
                Msg::Trailers => Some(Request::RequestTrailers(HttpTrailers::default())),
                Msg::ResponseHeaders(status, eos) => Some(Request::ResponseHeaders(HttpHeaders {
                    headers: Some(HeaderMap {
                        headers: vec![header(":status", &status.to_string(), false)],
                    }),
                    end_of_stream: *eos,
                    ..Default::default()
                })),
                Msg::ResponseBody(i, eos) => {
                    let text = RESPONSE_BODIES[*i as usize % RESPONSE_BODIES.len()];
                    let cut = (*i as usize * 7) % (text.len() + 1);
                    Some(Request::ResponseBody(HttpBody {
                        body: text.as_bytes()[..cut.max(text.len() / 2)].to_vec(),
                        end_of_stream: *eos,
                        ..Default::default()
                    }))
                }
                Msg::ResponseTrailers => Some(Request::ResponseTrailers(HttpTrailers::default())),
                Msg::Empty => None,
            };
            envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest {
                request,
                ..Default::default()
            }
        })
        .collect()
}

/// ext_proc message sequences in any order and chunking, with trailers, response phases and
/// resets (a sequence that just stops), through the EPP's stream state machine. After every
/// stream, nothing stays booked and no stream stays counted.
#[test]
fn ext_proc_sequences() {
    static T: Tally = Tally::new("ext_proc_sequences");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let h = {
        let _rt = rt.enter();
        kvgate_epp::fuzzing::Harness::new(WORKERS).unwrap()
    };
    // A panic fails the test; nothing observes the harness after one.
    let (rt, h) = (
        std::panic::AssertUnwindSafe(rt),
        std::panic::AssertUnwindSafe(h),
    );
    let seeds = seeds("openai");
    check!()
        .with_type::<(Input, Vec<Msg>, u8)>()
        .for_each(|(input, msgs, shape)| {
            T.count();
            let body = bytes_of(input, &seeds, false);
            // Half the streams open as Envoy opens them (headers for a generation path, then
            // the body, whole or in two chunks) before the generated messages; the rest are the
            // generated messages alone, in any order.
            let mut seq = Vec::new();
            if shape.is_multiple_of(2) {
                let chat = body.windows(10).any(|w| w == b"\"messages\"");
                seq.push(Msg::Headers(u8::from(!chat), Vec::new(), false, None));
                if shape.is_multiple_of(4) {
                    seq.push(Msg::Body((body.len() / 2) as u16, false));
                }
                seq.push(Msg::Body(0, true));
            }
            seq.extend(msgs.iter().cloned());
            let msgs = &seq;
            let out = rt.block_on(h.run(to_requests(&body, msgs)));
            if out.iter().any(|r| {
                matches!(
                    &r.response,
                    Some(envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response::RequestHeaders(_))
                        | Some(envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response::RequestBody(_))
                )
            }) {
                T.accept();
            }
            assert!(out.len() <= 2 * msgs.len() + 64, "{} answers", out.len());
            assert_eq!(h.bookings(), 0, "a booking outlived its stream");
            assert_eq!(h.streams_active(), 0);
        });
    T.report();
}
