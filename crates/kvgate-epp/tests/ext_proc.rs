//! The EPP as Envoy sees it, driven in-process over real gRPC: message sequences Envoy sends
//! (headers, body chunks, trailers, response path, cancellation), checked against what comes
//! back and against the EPP's metrics. The full path through a real Envoy is in
//! `crates/kvgate/tests/gateway.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest, ProcessingResponse, body_mutation,
    processing_request::Request, processing_response::Response,
};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
use kvgate_core::config::RouterConfig;
use kvgate_epp::{Bound, EppConfig};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const WORKERS: &str = "model: qwen3\nblock_size: 16\nworkers:\n  - {name: a, id: 11, url: 'http://10.0.0.1:8000', total_kv_blocks: 100}\n  - {name: b, id: 22, url: 'http://10.0.0.2:8000', total_kv_blocks: 100}\n";

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(tag: &str) -> Dir {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let d = std::env::temp_dir().join(format!("kvgate-epp-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

fn config(workers: PathBuf) -> EppConfig {
    EppConfig {
        host: "127.0.0.1".into(),
        grpc_port: 0,
        health_port: 0,
        metrics_port: 0,
        secure_serving: false,
        cert_path: None,
        client_ca: None,
        workers: kvgate_epp::WorkerSource::File(workers),
        router: RouterConfig {
            // No KV events here: approximate mode remembers where prompts went.
            use_kv_events: false,
            ..RouterConfig::default()
        },
        tokenizer: None,
        max_request_body_bytes: 1 << 20,
        max_endpoints: 1,
        tokenize_timeout: Duration::from_secs(10),
        accept_token_data: true,
        decision_log: 64,
        pool_name: "test".into(),
        event_plane: kvgate_runtime::routing::EventPlane::Zmq,
        replica_sync: None,
    }
}

async fn start_with(workers: &str, tweak: impl FnOnce(&mut EppConfig)) -> (Bound, Dir) {
    let dir = temp_dir("w");
    let path = dir.0.join("workers.yaml");
    std::fs::write(&path, workers).unwrap();
    let mut c = config(path);
    tweak(&mut c);
    (serve(c).await, dir)
}

/// Starts an EPP with `c`; returns once it is bound.
async fn serve(c: EppConfig) -> Bound {
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Err(e) = kvgate_epp::serve(c, move |b| {
            let _ = tx.send(b);
        })
        .await
        {
            panic!("epp failed: {e}");
        }
    });
    rx.await.unwrap()
}

async fn start() -> (Bound, Dir) {
    start_with(WORKERS, |_| {}).await
}

/// One ext_proc stream, as Envoy drives it.
struct Stream {
    tx: Option<mpsc::Sender<ProcessingRequest>>,
    rx: tonic::Streaming<ProcessingResponse>,
}

impl Stream {
    async fn open(b: &Bound) -> Stream {
        let mut client = ExternalProcessorClient::connect(format!("http://{}", b.grpc))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(16);
        let resp = client.process(ReceiverStream::new(rx)).await.unwrap();
        Stream {
            tx: Some(tx),
            rx: resp.into_inner(),
        }
    }

    async fn send(&self, r: Request) {
        self.send_msg(ProcessingRequest {
            request: Some(r),
            ..Default::default()
        })
        .await;
    }

    async fn try_send(&self, r: Request) {
        let _ = self
            .tx
            .as_ref()
            .unwrap()
            .send(ProcessingRequest {
                request: Some(r),
                ..Default::default()
            })
            .await;
    }

    async fn send_msg(&self, m: ProcessingRequest) {
        self.tx.as_ref().unwrap().send(m).await.unwrap();
    }

    async fn recv(&mut self) -> ProcessingResponse {
        tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("EPP answered in time")
            .expect("stream ok")
            .expect("a message")
    }
}

fn headers(pairs: &[(&str, &str)], eos: bool) -> Request {
    Request::RequestHeaders(HttpHeaders {
        headers: Some(HeaderMap {
            headers: pairs
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: (*k).into(),
                    value: String::new(),
                    raw_value: v.as_bytes().to_vec(),
                })
                .collect(),
        }),
        end_of_stream: eos,
        ..Default::default()
    })
}

fn post(path: &str, extra: &[(&str, &str)]) -> Request {
    let mut h = vec![(":method", "POST"), (":path", path)];
    h.extend_from_slice(extra);
    headers(&h, false)
}

fn body(b: &[u8], eos: bool) -> Request {
    Request::RequestBody(HttpBody {
        body: b.to_vec(),
        end_of_stream: eos,
        ..Default::default()
    })
}

fn chat(content: &str) -> Vec<u8> {
    serde_json::json!({"model": "qwen3", "messages": [{"role": "user", "content": content}], "max_tokens": 4})
        .to_string()
        .into_bytes()
}

/// What the request-headers answer says.
#[derive(Debug)]
struct Routed {
    set: Vec<(String, String)>,
    remove: Vec<String>,
    metadata_destination: Option<String>,
    clear_route_cache: bool,
}

impl Routed {
    fn get(&self, k: &str) -> Option<&str> {
        self.set
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }
}

fn routed(r: &ProcessingResponse) -> Routed {
    let Some(Response::RequestHeaders(h)) = &r.response else {
        panic!("expected a request-headers answer, got {r:?}")
    };
    let c = h.response.as_ref().unwrap();
    let m = c.header_mutation.as_ref().unwrap();
    let md = r
        .dynamic_metadata
        .as_ref()
        .and_then(|md| match &md.fields.get("envoy.lb")?.kind {
            Some(Kind::StructValue(s)) => {
                match &s.fields.get("x-gateway-destination-endpoint")?.kind {
                    Some(Kind::StringValue(v)) => Some(v.clone()),
                    _ => None,
                }
            }
            _ => None,
        });
    Routed {
        set: m
            .set_headers
            .iter()
            .map(|h| {
                let h = h.header.as_ref().unwrap();
                (
                    h.key.clone(),
                    String::from_utf8(h.raw_value.clone()).unwrap(),
                )
            })
            .collect(),
        remove: m.remove_headers.clone(),
        metadata_destination: md,
        clear_route_cache: c.clear_route_cache,
    }
}

/// Request-body chunks until end_of_stream: the bytes and the chunk count.
async fn read_body(s: &mut Stream) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut n = 0;
    loop {
        let r = s.recv().await;
        let Some(Response::RequestBody(b)) = r.response else {
            panic!("expected a request body chunk, got {r:?}")
        };
        let Some(body_mutation::Mutation::StreamedResponse(sb)) =
            b.response.unwrap().body_mutation.unwrap().mutation
        else {
            panic!("expected a streamed body")
        };
        n += 1;
        assert!(sb.body.len() <= 62_000, "chunk of {} bytes", sb.body.len());
        out.extend_from_slice(&sb.body);
        if sb.end_of_stream {
            return (out, n);
        }
    }
}

fn immediate(r: &ProcessingResponse) -> (i32, serde_json::Value, Vec<(String, String)>) {
    let Some(Response::ImmediateResponse(i)) = &r.response else {
        panic!("expected an immediate response, got {r:?}")
    };
    let headers = i
        .headers
        .as_ref()
        .map(|h| {
            h.set_headers
                .iter()
                .map(|o| {
                    let h = o.header.as_ref().unwrap();
                    (
                        h.key.clone(),
                        String::from_utf8(h.raw_value.clone()).unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    (
        i.status.as_ref().unwrap().code,
        serde_json::from_slice(&i.body).unwrap(),
        headers,
    )
}

/// The EPP's `/debug/decisions?n=N` document.
async fn decisions(b: &Bound, n: usize) -> serde_json::Value {
    reqwest::get(format!("http://{}/debug/decisions?n={n}", b.metrics))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn metrics(b: &Bound) -> String {
    reqwest::get(format!("http://{}/metrics", b.metrics))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until `name` reaches `want` (events and frees are applied asynchronously).
async fn wait_metric(b: &Bound, name: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = metric(&metrics(b).await, name);
        if v == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} stayed {v}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Routes one chat request to completion of the request phase; returns the answer and the
/// rewritten body.
async fn route(s: &mut Stream, content: &str, extra: &[(&str, &str)]) -> (Routed, Vec<u8>) {
    s.send(post("/v1/chat/completions", extra)).await;
    let b = chat(content);
    let (first, second) = b.split_at(b.len() / 2);
    s.send(body(first, false)).await;
    s.send(body(second, false)).await;
    s.send(body(b"", true)).await;
    let r = routed(&s.recv().await);
    let (out, _) = read_body(s).await;
    (r, out)
}

async fn finish_response(s: &mut Stream, served: Option<&str>, body_bytes: &[u8]) {
    let mut m = ProcessingRequest {
        request: Some(Request::ResponseHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: vec![HeaderValue {
                    key: ":status".into(),
                    value: String::new(),
                    raw_value: b"200".to_vec(),
                }],
            }),
            end_of_stream: false,
            ..Default::default()
        })),
        ..Default::default()
    };
    if let Some(addr) = served {
        m.attributes.insert(
            "envoy.filters.http.ext_proc".into(),
            Struct {
                fields: [(
                    "upstream.address".to_string(),
                    Value {
                        kind: Some(Kind::StringValue(addr.into())),
                    },
                )]
                .into_iter()
                .collect(),
            },
        );
    }
    s.send_msg(m).await;
    let r = s.recv().await;
    assert!(
        matches!(r.response, Some(Response::ResponseHeaders(_))),
        "{r:?}"
    );
    s.send(Request::ResponseBody(HttpBody {
        body: body_bytes.to_vec(),
        end_of_stream: true,
        ..Default::default()
    }))
    .await;
    let r = s.recv().await;
    let Some(Response::ResponseBody(b)) = r.response else {
        panic!("expected a response body chunk, got {r:?}")
    };
    let Some(body_mutation::Mutation::StreamedResponse(sb)) =
        b.response.unwrap().body_mutation.unwrap().mutation
    else {
        panic!()
    };
    assert_eq!(
        sb.body, body_bytes,
        "the response body passes through intact"
    );
    assert!(sb.end_of_stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_rewrites_the_body_and_strips_client_routing_headers() {
    let (b, _d) = start().await;
    let mut s = Stream::open(&b).await;
    let (r, out) = route(
        &mut s,
        "hello there, a prompt",
        &[
            ("x-dynamo-worker-instance-id", "999"),
            ("x-gateway-destination-endpoint", "6.6.6.6:1"),
            ("x-dynamo-something-new", "x"),
            ("content-length", "1"),
        ],
    )
    .await;
    let dest = r.get("x-gateway-destination-endpoint").unwrap();
    assert!(dest == "10.0.0.1:8000" || dest == "10.0.0.2:8000", "{dest}");
    assert_eq!(r.metadata_destination.as_deref(), Some(dest));
    assert!(r.clear_route_cache);
    let id = r.get("x-dynamo-worker-instance-id").unwrap();
    assert_eq!(id, if dest == "10.0.0.1:8000" { "11" } else { "22" });
    assert_eq!(r.get("x-dynamo-dp-rank"), Some("0"));
    assert_eq!(r.get("x-dynamo-routing-mode"), Some("aggregated"));
    // Client routing headers are removed or overwritten, never passed on.
    assert!(r.remove.contains(&"x-dynamo-something-new".to_string()));
    assert!(
        r.remove
            .contains(&"x-gateway-destination-endpoint-subset".to_string())
    );
    assert!(!r.set.iter().any(|(_, v)| v == "999" || v == "6.6.6.6:1"));
    // The body carries the token ids, and content-length is its new length.
    assert_eq!(
        r.get("content-length"),
        Some(out.len().to_string().as_str())
    );
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let ids = v["nvext"]["token_data"].as_array().unwrap();
    assert!(ids.len() > 5);
    assert_eq!(v["messages"][0]["content"], "hello there, a prompt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_prefix_returns_to_its_worker_and_accuracy_is_measured() {
    let (b, _d) = start().await;
    let prefix = "a long shared system prompt ".repeat(40);
    let mut s = Stream::open(&b).await;
    let (r1, _) = route(&mut s, &format!("{prefix} question one"), &[]).await;
    let first = r1
        .get("x-gateway-destination-endpoint")
        .unwrap()
        .to_string();
    // The worker reports 0 cached tokens for the first request.
    finish_response(
        &mut s,
        Some(&first),
        br#"{"usage":{"prompt_tokens":300,"prompt_tokens_details":{"cached_tokens":0}}}"#,
    )
    .await;
    for i in 0..3 {
        let mut s = Stream::open(&b).await;
        let (r, _) = route(&mut s, &format!("{prefix} question {i}"), &[]).await;
        assert_eq!(
            r.get("x-gateway-destination-endpoint"),
            Some(first.as_str())
        );
        // Streamed (SSE) usage split across chunks is found too.
        finish_response(
            &mut s,
            Some(&first),
            b"data: {\"choices\":[]}\n\ndata: {\"usage\":{\"prompt_tokens_details\":{\"cached_tokens\":160}}}\n\ndata: [DONE]\n\n",
        )
        .await;
    }
    let m = metrics(&b).await;
    assert_eq!(metric(&m, "kvgate_router_decisions_total"), 4.0);
    assert_eq!(metric(&m, "kvgate_router_responses_with_usage_total"), 4.0);
    assert_eq!(
        metric(&m, "kvgate_router_actual_cached_tokens_total"),
        480.0
    );
    assert!(metric(&m, "kvgate_router_predicted_cached_tokens_total") > 0.0);
    wait_metric(&b, "kvgate_router_bookings", 0.0).await;
    // The debug endpoint explains the decisions, newest first, with the actual cached tokens.
    let d = decisions(&b, 2).await;
    let d = d["decisions"].as_array().unwrap();
    assert_eq!(d.len(), 2);
    assert_eq!(d[0]["actual_cached_tokens"], 160);
    assert_eq!(
        d[0]["explanation"]["candidates"].as_array().unwrap().len(),
        2
    );
    assert!(d[0]["predicted_cached_tokens"].as_u64().unwrap() > 0);
    // The default (kvgate) policy explains each candidate's predicted components.
    let e = &d[0]["explanation"];
    assert_eq!(e["policy"], "kvgate");
    assert!(e["estimates"]["prefill_tokens_per_sec"].as_f64().unwrap() > 0.0);
    for c in e["candidates"].as_array().unwrap() {
        let p = &c["predicted"];
        for k in ["prefill_ms", "batch_ms", "memory_wait_ms"] {
            assert!(p[k].as_f64().is_some(), "{k} missing: {c}");
        }
        let total = p["prefill_ms"].as_f64().unwrap()
            + p["batch_ms"].as_f64().unwrap()
            + p["memory_wait_ms"].as_f64().unwrap();
        assert!((c["cost"].as_f64().unwrap() - total).abs() <= 0.05, "{c}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_is_booked_moved_to_the_served_endpoint_and_freed_at_the_end() {
    let (b, _d) = start().await;
    let mut s = Stream::open(&b).await;
    let (r, _) = route(&mut s, "some prompt", &[]).await;
    wait_metric(&b, "kvgate_router_bookings", 1.0).await;
    let other = if r.get("x-gateway-destination-endpoint") == Some("10.0.0.1:8000") {
        "10.0.0.2:8000"
    } else {
        "10.0.0.1:8000"
    };
    finish_response(&mut s, Some(other), b"{}").await;
    wait_metric(&b, "kvgate_router_bookings", 0.0).await;
    assert_eq!(
        metric(&metrics(&b).await, "kvgate_router_rebooked_total"),
        1.0
    );
    let d = decisions(&b, 1).await;
    let served_id = if other == "10.0.0.1:8000" { 11 } else { 22 };
    assert_eq!(d["decisions"][0]["served_by"], served_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_streams_free_their_booking() {
    let (b, _d) = start().await;
    let mut s = Stream::open(&b).await;
    route(&mut s, "some prompt", &[]).await;
    wait_metric(&b, "kvgate_router_bookings", 1.0).await;
    // The client went away: Envoy resets the stream mid-response.
    drop(s);
    wait_metric(&b, "kvgate_router_bookings", 0.0).await;
    wait_metric(&b, "kvgate_epp_streams_aborted_total", 1.0).await;
    wait_metric(&b, "kvgate_epp_streams_active", 0.0).await;
}

fn subset(list: Value) -> ProcessingRequest {
    let mut md = Metadata::default();
    md.filter_metadata.insert(
        "envoy.lb.subset_hint".into(),
        Struct {
            fields: [("x-gateway-destination-endpoint-subset".to_string(), list)]
                .into_iter()
                .collect(),
        },
    );
    ProcessingRequest {
        request: Some(post("/v1/chat/completions", &[])),
        metadata_context: Some(md),
        ..Default::default()
    }
}

fn strings(v: &[&str]) -> Value {
    Value {
        kind: Some(Kind::ListValue(ListValue {
            values: v
                .iter()
                .map(|s| Value {
                    kind: Some(Kind::StringValue((*s).into())),
                })
                .collect(),
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subset_hint_is_honoured_and_an_empty_subset_is_503() {
    let (b, _d) = start().await;
    for _ in 0..6 {
        let mut s = Stream::open(&b).await;
        s.send_msg(subset(strings(&["10.0.0.2:8000"]))).await;
        s.send(body(&chat("hi"), true)).await;
        let r = routed(&s.recv().await);
        assert_eq!(
            r.get("x-gateway-destination-endpoint"),
            Some("10.0.0.2:8000")
        );
    }
    for list in [strings(&[]), strings(&["192.168.0.9:8000"])] {
        let mut s = Stream::open(&b).await;
        s.send_msg(subset(list)).await;
        s.send(body(&chat("hi"), true)).await;
        let (code, body, headers) = immediate(&s.recv().await);
        assert_eq!(code, 503);
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("subset")
        );
        assert!(headers.contains(&("retry-after".into(), "1".into())));
        assert!(headers.contains(&("content-type".into(), "application/json".into())));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors() {
    let (b, _d) = start_with(WORKERS, |c| c.max_request_body_bytes = 2000).await;
    let cases: Vec<(Vec<u8>, i32, &str)> = vec![
        (b"{not json".to_vec(), 400, "JSON"),
        (
            br#"{"messages":[{"role":"user","content":"x"}]}"#.to_vec(),
            400,
            "model",
        ),
        (
            br#"{"model":"other","messages":[{"role":"user","content":"x"}]}"#.to_vec(),
            404,
            "other",
        ),
        (vec![b' '; 3000], 413, "limit"),
    ];
    for (payload, want, needle) in cases {
        let mut s = Stream::open(&b).await;
        s.send(post("/v1/chat/completions", &[])).await;
        // The EPP may answer 413 and end the stream before the last chunks: a refused send is
        // expected then.
        for c in payload.chunks(700) {
            s.try_send(body(c, false)).await;
        }
        s.try_send(body(b"", true)).await;
        let (code, body, _) = immediate(&s.recv().await);
        assert_eq!(code, want, "{body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{msg}");
    }
    // A declared length over the limit is refused before the body is read.
    let mut s = Stream::open(&b).await;
    s.send(post(
        "/v1/chat/completions",
        &[("content-length", "999999")],
    ))
    .await;
    let (code, _, _) = immediate(&s.recv().await);
    assert_eq!(code, 413);
    let m = metrics(&b).await;
    assert!(m.contains("inference_objective_request_error_total{model_name=\"\",target_model_name=\"\",error_code=\"413\"} 2"), "{m}");
    // A client's model name never becomes a label.
    assert!(
        m.contains("model_name=\"unknown\",target_model_name=\"unknown\",error_code=\"404\"} 1"),
        "{m}"
    );
    assert!(!m.contains("\"other\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_requests_and_trailer_terminated_bodies_are_routed() {
    let (b, _d) = start().await;
    let mut s = Stream::open(&b).await;
    s.send(headers(
        &[(":method", "GET"), (":path", "/v1/models")],
        true,
    ))
    .await;
    let r = routed(&s.recv().await);
    assert!(r.get("x-gateway-destination-endpoint").is_some());
    assert!(r.get("content-length").is_none());
    // HTTP/2 bodies may end with trailers instead of an end_of_stream chunk.
    let mut s = Stream::open(&b).await;
    s.send(post("/v1/chat/completions", &[])).await;
    s.send(body(&chat("trailers"), false)).await;
    s.send(Request::RequestTrailers(HttpTrailers::default()))
        .await;
    let r = routed(&s.recv().await);
    assert!(r.get("x-gateway-destination-endpoint").is_some());
    // The body is re-emitted without end_of_stream (the trailers end the request), then the
    // trailers are answered.
    let c = s.recv().await;
    let Some(Response::RequestBody(rb)) = c.response else {
        panic!("expected the body, got {c:?}")
    };
    let Some(body_mutation::Mutation::StreamedResponse(sb)) =
        rb.response.unwrap().body_mutation.unwrap().mutation
    else {
        panic!()
    };
    assert!(!sb.end_of_stream);
    assert!(serde_json::from_slice::<serde_json::Value>(&sb.body).is_ok());
    let t = s.recv().await;
    assert!(
        matches!(t.response, Some(Response::RequestTrailers(_))),
        "{t:?}"
    );

    // Headers then trailers with no body message at all: no body answer may be sent (Envoy
    // treats one as a spurious message and fails the request).
    let mut s = Stream::open(&b).await;
    s.send(post("/other", &[])).await;
    s.send(Request::RequestTrailers(HttpTrailers::default()))
        .await;
    let r = routed(&s.recv().await);
    assert!(r.get("x-gateway-destination-endpoint").is_some());
    let t = s.recv().await;
    assert!(
        matches!(t.response, Some(Response::RequestTrailers(_))),
        "{t:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_data_is_routed_on_and_forwarded_byte_for_byte() {
    let (b, _d) = start().await;
    // 300 ids that no tokenization of "hello world" would give: routing must use them.
    let ids: Vec<u32> = (0..300).map(|i| 1000 + i * 7).collect();
    let sent = serde_json::json!({"model": "qwen3",
        "messages": [{"role": "user", "content": "hello world"}],
        "nvext": {"token_data": ids, "keep": true}})
    .to_string();
    let mut s = Stream::open(&b).await;
    s.send(post("/v1/chat/completions", &[])).await;
    s.send(body(sent.as_bytes(), true)).await;
    let first = routed(&s.recv().await);
    let (out, _) = read_body(&mut s).await;
    assert_eq!(
        out,
        sent.as_bytes(),
        "a tokens-in body is forwarded unchanged"
    );
    let d = decisions(&b, 1).await["decisions"][0].clone();
    assert_eq!(d["isl_tokens"], 300, "{d}");
    // The same ids again, with other messages: the router remembers them (approximate mode)
    // and sends the request where they went, with their blocks counted as cached.
    let again = serde_json::json!({"model": "qwen3",
        "messages": [{"role": "user", "content": "something else entirely"}],
        "nvext": {"token_data": ids}})
    .to_string();
    let mut s = Stream::open(&b).await;
    s.send(post("/v1/chat/completions", &[])).await;
    s.send(body(again.as_bytes(), true)).await;
    let second = routed(&s.recv().await);
    let _ = read_body(&mut s).await;
    assert_eq!(
        first.get("x-gateway-destination-endpoint"),
        second.get("x-gateway-destination-endpoint")
    );
    let d = decisions(&b, 1).await["decisions"][0].clone();
    assert_eq!(d["overlap_blocks"], 300 / 16, "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_token_ids_get_400_naming_the_position() {
    let (b, _d) = start().await;
    // o200k_base ends at 200,018, and 199,998 is a gap among its special tokens.
    for (doc, field) in [
        (
            serde_json::json!({"model": "qwen3", "messages": [{"role": "user", "content": "x"}],
                "nvext": {"token_data": [1, 2, 4000000000u32]}}),
            "nvext.token_data[2]",
        ),
        (
            serde_json::json!({"model": "qwen3", "messages": [{"role": "user", "content": "x"}],
                "nvext": {"token_data": [199998]}}),
            "nvext.token_data[0]",
        ),
    ] {
        let mut s = Stream::open(&b).await;
        s.send(post("/v1/chat/completions", &[])).await;
        s.send(body(doc.to_string().as_bytes(), true)).await;
        let (code, err, _) = immediate(&s.recv().await);
        assert_eq!(code, 400, "{err}");
        assert_eq!(err["error"]["param"], field, "{err}");
        let msg = err["error"]["message"].as_str().unwrap();
        assert!(msg.contains("not in the vocabulary"), "{msg}");
    }
    // A completions prompt given as ids is checked the same way.
    let mut s = Stream::open(&b).await;
    s.send(post("/v1/completions", &[])).await;
    let doc = serde_json::json!({"model": "qwen3", "prompt": [5, 6, 300000]});
    s.send(body(doc.to_string().as_bytes(), true)).await;
    let (code, err, _) = immediate(&s.recv().await);
    assert_eq!(code, 400, "{err}");
    assert_eq!(err["error"]["param"], "prompt[2]", "{err}");
    // Valid ids in a completions prompt are routed on and injected for the worker.
    let mut s = Stream::open(&b).await;
    s.send(post("/v1/completions", &[])).await;
    let doc = serde_json::json!({"model": "qwen3", "prompt": [5, 6, 200018]});
    s.send(body(doc.to_string().as_bytes(), true)).await;
    let _ = routed(&s.recv().await);
    let (out, _) = read_body(&mut s).await;
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["nvext"]["token_data"], serde_json::json!([5, 6, 200018]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_accept_token_data_off_client_ids_are_overwritten() {
    let (b, _d) = start_with(WORKERS, |c| c.accept_token_data = false).await;
    let mut s = Stream::open(&b).await;
    s.send(post("/v1/chat/completions", &[])).await;
    let body_json = serde_json::json!({"model": "qwen3",
        "messages": [{"role": "user", "content": "hello world"}],
        "nvext": {"token_data": [4000000000u32, 1], "keep": true}});
    s.send(body(body_json.to_string().as_bytes(), true)).await;
    let _ = routed(&s.recv().await);
    let (out, _) = read_body(&mut s).await;
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let ids = v["nvext"]["token_data"].as_array().unwrap();
    assert!(!ids.contains(&serde_json::json!(4000000000u32)), "{ids:?}");
    assert!(ids.len() > 2);
    assert_eq!(v["nvext"]["keep"], true, "other nvext fields are kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_are_rechunked_under_62000_bytes() {
    let (b, _d) = start_with(WORKERS, |c| c.max_request_body_bytes = 4 << 20).await;
    let text = "lorem ipsum dolor sit amet ".repeat(10_000);
    let mut s = Stream::open(&b).await;
    s.send(post("/v1/chat/completions", &[])).await;
    let payload = chat(&text);
    for c in payload.chunks(16 * 1024) {
        s.send(body(c, false)).await;
    }
    s.send(body(b"", true)).await;
    let r = routed(&s.recv().await);
    let (out, n) = read_body(&mut s).await;
    assert_eq!(
        n,
        out.len().div_ceil(62_000),
        "{n} chunks for {} bytes",
        out.len()
    );
    assert_eq!(
        r.get("content-length"),
        Some(out.len().to_string().as_str())
    );
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["messages"][0]["content"], text.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_disagg_without_prefill_workers_is_503_and_admission_is_429() {
    let (b, _d) = start_with(WORKERS, |c| c.router.enforce_disagg = true).await;
    let mut s = Stream::open(&b).await;
    s.send(post("/v1/chat/completions", &[])).await;
    s.send(body(&chat("x"), true)).await;
    let (code, body_json, _) = immediate(&s.recv().await);
    assert_eq!(code, 503);
    assert!(
        body_json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("prefill")
    );
    // With a prefill pool, enforcing disaggregation must not silently route aggregated.
    let with_prefill =
        format!("{WORKERS}  - {{name: p, id: 33, url: 'http://10.0.0.3:8000', role: prefill}}\n");
    let (b, _d) = start_with(&with_prefill, |c| c.router.enforce_disagg = true).await;
    let mut s = Stream::open(&b).await;
    s.send(post("/v1/chat/completions", &[])).await;
    s.send(body(&chat("x"), true)).await;
    let (code, body_json, _) = immediate(&s.recv().await);
    assert_eq!(code, 503, "{body_json}");
    assert!(
        body_json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("decode")
    );

    // Admission: a worker is busy above 10% of its 100 blocks; a 200-token prompt books 13.
    let (b, _d) = start_with(WORKERS, |c| {
        c.router.admission.active_decode_blocks_threshold = Some(0.1);
    })
    .await;
    let prompt = "word ".repeat(200);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = Stream::open(&b).await;
        route(&mut s, &prompt, &[]).await;
        held.push(s);
    }
    let mut s = Stream::open(&b).await;
    s.send(post("/v1/chat/completions", &[])).await;
    s.send(body(&chat(&prompt), true)).await;
    let (code, body_json, headers) = immediate(&s.recv().await);
    assert_eq!(code, 429, "{body_json}");
    assert!(headers.contains(&("retry-after".into(), "1".into())));
    drop(held);
    wait_metric(&b, "kvgate_router_bookings", 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_is_served_on_both_ports() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let (b, _d) = start().await;
    for (addr, service) in [
        (b.health, "readiness"),
        (b.grpc, "envoy.service.ext_proc.v3.ExternalProcessor"),
        (b.grpc, ""),
    ] {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = HealthClient::new(ch);
        let r = c
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, 1, "{service} on {addr} is SERVING");
    }
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn any_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (any::<bool>(), "[ -~]{0,12}").prop_map(|(eos, p)| headers(
                &[(":method", "POST"), (":path", &format!("/v1/{p}"))],
                eos
            )),
            Just(post("/v1/chat/completions", &[])),
            (
                proptest::collection::vec(any::<u8>(), 0..300),
                any::<bool>()
            )
                .prop_map(|(b, eos)| body(&b, eos)),
            Just(body(&chat("fuzz"), true)),
            Just(Request::RequestTrailers(HttpTrailers::default())),
            proptest::collection::vec(any::<u8>(), 0..100).prop_map(|b| Request::ResponseBody(
                HttpBody {
                    body: b,
                    end_of_stream: false,
                    ..Default::default()
                }
            )),
            Just(Request::ResponseHeaders(HttpHeaders::default())),
            Just(Request::ResponseTrailers(HttpTrailers::default())),
        ]
    }

    #[test]
    fn arbitrary_message_sequences_never_break_the_server() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (b, _d) = rt.block_on(start());
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: 64,
            ..ProptestConfig::default()
        });
        runner
            .run(&proptest::collection::vec(any_request(), 1..8), |seq| {
                rt.block_on(async {
                    let s = Stream::open(&b).await;
                    for r in seq {
                        if s.tx
                            .as_ref()
                            .unwrap()
                            .send(ProcessingRequest {
                                request: Some(r),
                                ..Default::default()
                            })
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    drop(s);
                });
                Ok(())
            })
            .unwrap();
        // The server still routes, and every booking was freed.
        rt.block_on(async {
            let mut s = Stream::open(&b).await;
            route(&mut s, "after the storm", &[]).await;
            drop(s);
            wait_metric(&b, "kvgate_router_bookings", 0.0).await;
            wait_metric(&b, "kvgate_epp_streams_active", 0.0).await;
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_tokenization_is_504() {
    // The timer has millisecond granularity and a timeout polls its future first: the prompt
    // must take well over a millisecond to tokenize (about 900 KB of distinct words), or a
    // fast tokenization could beat a late timer.
    let (b, _d) = start_with(WORKERS, |c| c.tokenize_timeout = Duration::from_micros(1)).await;
    let mut s = Stream::open(&b).await;
    s.send(post("/v1/chat/completions", &[])).await;
    let prompt: String = (0..90_000).map(|i| format!("w{i} ")).collect();
    s.send(body(&chat(&prompt), true)).await;
    let (code, body_json, _) = immediate(&s.recv().await);
    assert_eq!(code, 504, "{body_json}");
    assert!(
        body_json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tokeniz")
    );
    wait_metric(&b, "kvgate_router_bookings", 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_requests_name_both_workers_and_book_both_legs() {
    let pd = "model: qwen3\nblock_size: 16\nworkers:\n  - {name: p, id: 33, url: 'http://10.0.0.3:8000', role: prefill, total_kv_blocks: 100}\n  - {name: d1, id: 44, url: 'http://10.0.0.4:8000', role: decode, total_kv_blocks: 100}\n  - {name: d2, id: 55, url: 'http://10.0.0.5:8000', role: decode, total_kv_blocks: 100, dp_size: 2}\n";
    let (b, _d) = start_with(pd, |c| c.router.enforce_disagg = true).await;
    let mut decode_targets = std::collections::BTreeSet::new();
    let mut open = Vec::new();
    for i in 0..3 {
        let mut s = Stream::open(&b).await;
        let (r, _) = route(&mut s, &format!("prompt number {i} with some words"), &[]).await;
        assert_eq!(r.get("x-dynamo-routing-mode"), Some("disaggregated"));
        assert_eq!(r.get("x-dynamo-prefill-instance-id"), Some("33"));
        assert_eq!(r.get("x-dynamo-prefill-dp-rank"), Some("0"));
        let dest = r.get("x-gateway-destination-endpoint").unwrap().to_string();
        let id = r.get("x-dynamo-worker-instance-id").unwrap().to_string();
        assert!(
            (dest == "10.0.0.4:8000" && id == "44") || (dest == "10.0.0.5:8000" && id == "55"),
            "{dest} {id}"
        );
        decode_targets.insert((id, r.get("x-dynamo-dp-rank").unwrap().to_string()));
        // Both legs are booked.
        wait_metric(&b, "kvgate_router_bookings", 2.0 * (i as f64 + 1.0)).await;
        open.push(s);
    }
    // In-flight decode load spreads the three requests over the three decode ranks (the
    // overlap credit is off for the decode leg).
    assert_eq!(decode_targets.len(), 3, "{decode_targets:?}");
    // The prefill leg ends with the decode worker's first byte; the rest at the end.
    for (i, mut s) in open.into_iter().enumerate() {
        finish_response(&mut s, None, b"{}").await;
        wait_metric(&b, "kvgate_router_bookings", 2.0 * (2 - i) as f64).await;
    }
}

// ---------- pod discovery (Kubernetes API mocked with tower-test) ----------

// kvgate-k8s's in-memory API server (tower-test), shared by path.
#[path = "../../kvgate-k8s/tests/fake_api/mod.rs"]
mod fake_api;

mod discovery {
    use super::*;
    use crate::fake_api;
    use serde_json::json;

    fn pod(name: &str, ip: &str, ready: bool, rv: u32) -> serde_json::Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv.to_string(), "labels": {"app": "vllm"}},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        })
    }

    async fn readiness(b: &Bound) -> i32 {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_client::HealthClient;
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", b.health))
            .unwrap()
            .connect()
            .await
            .unwrap();
        HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: "readiness".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
    }

    #[tokio::test]
    async fn pods_of_the_inference_pool_are_the_workers_and_readiness_waits_for_them() {
        let (fake, client) = fake_api::Fake::new(false);
        fake.put(
            "inferencepools",
            json!({
                "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
                "metadata": {"name": "llama-pool", "namespace": "ns"},
                "spec": {"selector": {"matchLabels": {"app": "vllm"}}, "targetPorts": [{"number": 8000}],
                         "endpointPickerRef": {"name": "llama-epp", "port": {"number": 9002}}},
            }),
        );
        fake.put("pods", pod("w-0", "10.9.0.1", true, 5));
        fake.put("pods", pod("w-1", "10.9.0.2", false, 6));
        // The pod list waits: the EPP must not be ready before it.
        fake.hold("pods");
        let mut c = config(PathBuf::from("/unused"));
        c.workers = kvgate_epp::WorkerSource::Kubernetes(kvgate_epp::KubernetesWorkers {
            client: Some(client),
            namespace: Some("ns".into()),
            pool: kvgate_epp::PoolRef::InferencePool("llama-pool".into()),
            model: "qwen3".into(),
            block_size: 16,
            kv_events_port: None,
            unready_grace: Duration::ZERO,
        });
        let b = serve(c).await;
        // Bound, but the pods are not listed yet: not ready (2 = NOT_SERVING).
        assert_eq!(readiness(&b).await, 2);
        fake.release("pods");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while readiness(&b).await != 1 {
            assert!(tokio::time::Instant::now() < deadline, "never ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Only the Ready pod is an endpoint.
        for i in 0..3 {
            let mut s = Stream::open(&b).await;
            let (r, _) = route(&mut s, &format!("question {i}"), &[]).await;
            assert_eq!(r.metadata_destination.as_deref(), Some("10.9.0.1:8000"));
        }
        // w-1 becomes Ready and w-0 stops being Ready: the EPP follows.
        fake.put("pods", pod("w-1", "10.9.0.2", true, 11));
        fake.put("pods", pod("w-0", "10.9.0.1", false, 12));
        routes_to(&b, "10.9.0.2:8000").await;
        // The operator moves the pool to another port: the EPP follows the pool too.
        fake.edit("inferencepools", "ns", "llama-pool", |p| {
            p["spec"]["targetPorts"] = json!([{"number": 8001}]);
        });
        routes_to(&b, "10.9.0.2:8001").await;
    }

    async fn index(b: &Bound) -> serde_json::Value {
        reqwest::get(format!("http://{}/debug/index", b.metrics))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn metric(b: &Bound, name: &str) -> f64 {
        let text = reqwest::get(format!("http://{}/metrics", b.metrics))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(f64::NAN)
    }

    /// Polls the EPP's /debug/index until `f` holds for it.
    async fn index_until(
        b: &Bound,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let v = index(b).await;
            if f(&v) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn blocks(v: &serde_json::Value) -> usize {
        v["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["blocks"].as_array().unwrap().len())
            .sum()
    }

    /// A pod that turns unready and back within the grace period keeps what the router knew of
    /// its cache (a real mock engine publishing vLLM ZMQ events); one that stays away longer,
    /// or comes back as another engine, loses it.
    #[tokio::test]
    async fn a_readiness_flap_keeps_the_cache_and_a_long_absence_drops_it() {
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(kvgate_mocker::serve(
            kvgate_mocker::MockerConfig {
                port: 0,
                engine: kvgate_engine::EngineConfig {
                    block_size: 16,
                    num_gpu_blocks: 1024,
                    max_num_seqs: 16,
                    max_num_batched_tokens: 8192,
                    enable_prefix_caching: true,
                    timing: Default::default(),
                },
                speedup_ratio: 100.0,
                zmq_kv_events: Some("tcp://127.0.0.1:0".into()),
                ..kvgate_mocker::MockerConfig::default()
            },
            move |addr, zmq, _| {
                let _ = addr_tx.send((addr, zmq));
            },
        ));
        let (http, zmq) = addr_rx.await.unwrap();
        let zmq_port = zmq[0].rsplit(':').next().unwrap().to_string();
        let engine_pod = |ready: bool, events_port: &str| {
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "w-0", "namespace": "ns", "labels": {"app": "vllm"},
                             "annotations": {"kvgate.io/kv-events-port": events_port}},
                "status": {"podIP": "127.0.0.1",
                           "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
            })
        };
        let (fake, client) = fake_api::Fake::new(false);
        fake.put(
            "inferencepools",
            json!({
                "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
                "metadata": {"name": "pool", "namespace": "ns"},
                "spec": {"selector": {"matchLabels": {"app": "vllm"}}, "targetPorts": [{"number": http.port()}],
                         "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}},
            }),
        );
        fake.put("pods", engine_pod(true, &zmq_port));
        let mut c = config(PathBuf::from("/unused"));
        c.router.use_kv_events = true;
        c.workers = kvgate_epp::WorkerSource::Kubernetes(kvgate_epp::KubernetesWorkers {
            client: Some(client),
            namespace: Some("ns".into()),
            pool: kvgate_epp::PoolRef::InferencePool("pool".into()),
            model: "qwen3".into(),
            block_size: 16,
            kv_events_port: None,
            unready_grace: Duration::from_secs(2),
        });
        let b = serve(c).await;

        // The engine caches a prompt; its events reach the EPP's index.
        let prompt: String = (0..200).map(|i| format!("word{i} ")).collect();
        let mut held = 0;
        for _ in 0..100 {
            let r = reqwest::Client::new()
                .post(format!("http://{http}/v1/completions"))
                .json(&json!({"model": "qwen3", "prompt": prompt, "max_tokens": 2}))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
            held = blocks(&index(&b).await);
            if held > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(held >= 4, "the EPP indexed {held} blocks");

        // Unready: out of routing, cache entries kept.
        fake.put("pods", engine_pod(false, &zmq_port));
        let v = index_until(&b, "w-0 parked", |v| {
            v["parked"].as_array().is_some_and(|p| p.len() == 1)
        })
        .await;
        assert_eq!(blocks(&v), held);
        // Ready again within the grace period: nothing was lost.
        fake.put("pods", engine_pod(true, &zmq_port));
        let v = index_until(&b, "w-0 back", |v| {
            v["parked"].as_array().is_some_and(|p| p.is_empty())
        })
        .await;
        assert_eq!(blocks(&v), held);
        assert_eq!(
            metric(&b, "kvgate_router_workers_returned_total").await,
            1.0
        );

        // Unready for longer than the grace period: forgotten.
        fake.put("pods", engine_pod(false, &zmq_port));
        index_until(&b, "the grace period to run out", |v| {
            blocks(v) == 0 && v["parked"].as_array().is_some_and(|p| p.is_empty())
        })
        .await;
        assert_eq!(metric(&b, "kvgate_router_parked_expired_total").await, 1.0);

        // Rebuilt from new events once back; then a flap that returns as another engine (its
        // event publisher moved) starts from nothing.
        fake.put("pods", engine_pod(true, &zmq_port));
        let prompt2: String = (0..120).map(|i| format!("other{i} ")).collect();
        let mut again = 0;
        for _ in 0..100 {
            reqwest::Client::new()
                .post(format!("http://{http}/v1/completions"))
                .json(&json!({"model": "qwen3", "prompt": prompt2, "max_tokens": 2}))
                .send()
                .await
                .unwrap();
            again = blocks(&index(&b).await);
            if again > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(again > 0);
        fake.put("pods", engine_pod(false, &zmq_port));
        index_until(&b, "parked again", |v| {
            v["parked"].as_array().is_some_and(|p| p.len() == 1)
        })
        .await;
        fake.put("pods", engine_pod(true, "1"));
        index_until(&b, "a new engine with an empty index", |v| {
            blocks(v) == 0 && v["parked"].as_array().is_some_and(|p| p.is_empty())
        })
        .await;
    }

    async fn routes_to(b: &Bound, want: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut s = Stream::open(b).await;
            let (r, _) = route(&mut s, "after the change", &[]).await;
            if r.metadata_destination.as_deref() == Some(want) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still routed to {:?}, not {want}",
                r.metadata_destination
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
