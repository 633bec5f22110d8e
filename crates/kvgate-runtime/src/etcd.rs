//! A small etcd v3 client over etcd's HTTP/JSON gateway (`POST /v3/kv/range`, served on the
//! client URLs of etcd 3.4 and later), enough to read Dynamo's discovery records.
//!
//! The gateway speaks the proto3 JSON mapping of etcd's gRPC API: keys and values are base64,
//! 64-bit integers are decimal strings, fields at their default value (no `kvs`, `more: false`,
//! lease 0) are left out. A prefix listing is one range `[prefix, prefix + 1)`, read in pages of
//! [`PAGE_LIMIT`] keys pinned to the revision of the first page, so it is a consistent snapshot
//! even when keys change while it is read.
//!
//! # Dynamo 1.6 discovery layout (`--discovery-backend etcd`)
//!
//! Dynamo reads the endpoint from `ETCD_ENDPOINTS` (default `http://localhost:2379`). Each worker
//! (one per `--num-workers` of a mocker) writes its records under one lease of its own, 30 s TTL
//! (`ETCD_LEASE_TTL`), kept alive about every 15 s; the lease id is the worker's instance id and
//! the last path segment of its keys is that id (or a publisher id) in lowercase hex. The values
//! are the same JSON documents as the file discovery backend writes:
//! - [`DYNAMO_INSTANCES_PREFIX`] `<namespace>/<component>/<endpoint>/<instance id hex>`:
//!   `{"type":"Endpoint","namespace":..,"component":..,"endpoint":..,"instance_id":..,
//!   "transport":{"tcp":"host:port/<id hex>/<ns>/<component>/<endpoint>"},..}`;
//! - [`DYNAMO_MDC_PREFIX`] `<namespace>/<component>/<endpoint>/<instance id hex>`: the model
//!   card, `{"type":"Model",..,"instance_id":..,"card_json":{"display_name":..,
//!   "kv_cache_block_size":..,"runtime_config":{"total_kv_blocks":..,..},..}}`;
//! - `v1/event_channels/namespace/<ns>/component/<c>/endpoint/<e>/topic/<topic>/<publisher hex>`
//!   and `v1/event_sources/...`: the event plane (`{"type":"EventChannel",..}`).
//!
//! A worker that shuts down cleanly (SIGTERM) revokes its lease: its keys go at once. A worker
//! that is killed leaves them until the lease expires, 15 to 30 s later.

use serde::Deserialize;
use std::time::Duration;

/// Where Dynamo 1.6 registers its endpoint instances (one key per worker and endpoint).
pub const DYNAMO_INSTANCES_PREFIX: &str = "v1/instances/";
/// Where Dynamo 1.6 registers its model cards (one key per worker serving a model).
pub const DYNAMO_MDC_PREFIX: &str = "v1/mdc/";

/// How long one listing may take, all pages included, unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest response body accepted for one page.
pub const MAX_PAGE_BYTES: usize = 16 << 20;
/// Largest listing accepted (keys and values of all pages).
pub const MAX_LISTING_BYTES: usize = 64 << 20;
/// Keys asked for per page.
pub const PAGE_LIMIT: u64 = 1000;

/// One key of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
    pub mod_revision: i64,
}

/// The keys under a prefix at one revision of the store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// The store's revision the listing reflects (to watch from `revision + 1`).
    pub revision: i64,
    /// In key order.
    pub kvs: Vec<KeyValue>,
}

/// The keys under `prefix` (as UTF-8 strings, in key order) and their values, from the etcd
/// at `endpoint` (`http://host:port`, or `host:port`), within [`DEFAULT_TIMEOUT`].
pub async fn list_prefix(endpoint: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    let listing = Client::new(endpoint)?.range_prefix(prefix).await?;
    Ok(listing
        .kvs
        .into_iter()
        .map(|kv| (kv.key, kv.value))
        .collect())
}

/// An etcd endpoint, with a connection pool; cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    timeout: Duration,
}

impl Client {
    /// A client of the etcd at `endpoint` (`http://host:port` or `host:port`; `https` is not
    /// supported), with [`DEFAULT_TIMEOUT`].
    pub fn new(endpoint: &str) -> Result<Self, String> {
        Self::with_timeout(endpoint, DEFAULT_TIMEOUT)
    }

    /// [`new`](Self::new) with a bound on each listing, all pages included.
    pub fn with_timeout(endpoint: &str, timeout: Duration) -> Result<Self, String> {
        let base = normalize_endpoint(endpoint)?;
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| format!("etcd client for {base}: {}", error_chain(&e)))?;
        Ok(Self {
            http,
            base,
            timeout,
        })
    }

    /// The endpoint's base URL, e.g. `http://127.0.0.1:2379`.
    pub fn endpoint(&self) -> &str {
        &self.base
    }

    /// All keys under `prefix` (every key when it is empty) at one revision.
    pub async fn range_prefix(&self, prefix: &str) -> Result<Listing, String> {
        match tokio::time::timeout(self.timeout, self.range_pages(prefix.as_bytes())).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "etcd at {}: listing {prefix:?} took longer than {:?}",
                self.base, self.timeout
            )),
        }
    }

    async fn range_pages(&self, prefix: &[u8]) -> Result<Listing, String> {
        let (mut key, range_end) = prefix_range(prefix);
        let range_end = b64_encode(&range_end);
        let mut listing = Listing::default();
        let mut total = 0usize;
        loop {
            let mut req = serde_json::json!({
                "key": b64_encode(&key),
                "range_end": range_end,
                "limit": PAGE_LIMIT,
            });
            if listing.revision > 0 {
                // Later pages read the same snapshot as the first.
                req["revision"] = listing.revision.into();
            }
            let body = self.post("/v3/kv/range", &req).await?;
            let page = decode_range(&body).map_err(|e| {
                format!(
                    "etcd at {}: bad /v3/kv/range answer: {e}: {}",
                    self.base,
                    snippet(&body)
                )
            })?;
            if listing.revision == 0 {
                listing.revision = page.revision;
            }
            if page.more && page.kvs.is_empty() {
                return Err(format!(
                    "etcd at {}: /v3/kv/range said more keys follow but sent none",
                    self.base
                ));
            }
            for kv in page.kvs {
                total += kv.key.len() + kv.value.len();
                if total > MAX_LISTING_BYTES {
                    return Err(format!(
                        "etcd at {}: the keys under {:?} exceed {MAX_LISTING_BYTES} bytes",
                        self.base,
                        String::from_utf8_lossy(prefix)
                    ));
                }
                let key = String::from_utf8(kv.key).map_err(|e| {
                    format!(
                        "etcd at {}: key {:?} under {:?} is not UTF-8",
                        self.base,
                        String::from_utf8_lossy(e.as_bytes()),
                        String::from_utf8_lossy(prefix)
                    )
                })?;
                listing.kvs.push(KeyValue {
                    key,
                    value: kv.value,
                    lease: kv.lease,
                    mod_revision: kv.mod_revision,
                });
            }
            if !page.more {
                return Ok(listing);
            }
            // The next page starts just after the last key of this one.
            key = listing
                .kvs
                .last()
                .map(|kv| kv.key.as_bytes().to_vec())
                .unwrap_or_default();
            key.push(0);
        }
    }

    /// POSTs `req` to the gateway and returns the body of a 200 answer, at most
    /// [`MAX_PAGE_BYTES`].
    async fn post(&self, path: &str, req: &serde_json::Value) -> Result<Vec<u8>, String> {
        let url = format!("{}{path}", self.base);
        let mut resp = self.http.post(&url).json(req).send().await.map_err(|e| {
            let what = if e.is_connect() {
                "unreachable"
            } else if e.is_timeout() {
                "timed out"
            } else {
                "request failed"
            };
            format!(
                "etcd at {} {what} (POST {url}): {}",
                self.base,
                error_chain(&e)
            )
        })?;
        let status = resp.status();
        if let Some(len) = resp.content_length()
            && len > MAX_PAGE_BYTES as u64
        {
            return Err(format!(
                "etcd at {}: POST {url} answered {len} bytes, more than {MAX_PAGE_BYTES}",
                self.base
            ));
        }
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_PAGE_BYTES {
                        return Err(format!(
                            "etcd at {}: POST {url} answered more than {MAX_PAGE_BYTES} bytes",
                            self.base
                        ));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    return Err(format!(
                        "etcd at {}: reading the answer to POST {url}: {}",
                        self.base,
                        error_chain(&e)
                    ));
                }
            }
        }
        if !status.is_success() {
            return Err(format!(
                "etcd at {}: POST {url} answered {status}: {}",
                self.base,
                gateway_error(&body)
            ));
        }
        Ok(body)
    }
}

/// `http://host:port` from `http://host:port/`, `host:port`, ...
fn normalize_endpoint(endpoint: &str) -> Result<String, String> {
    let e = endpoint.trim();
    if e.is_empty() {
        return Err("etcd endpoint is empty".into());
    }
    if e.contains(',') {
        return Err(format!(
            "etcd endpoint {endpoint:?} is a list: pass one endpoint (e.g. the first of ETCD_ENDPOINTS)"
        ));
    }
    let host = match e.split_once("://") {
        Some((scheme, _)) if !scheme.eq_ignore_ascii_case("http") => {
            return Err(format!(
                "etcd endpoint {endpoint:?}: only http:// is supported, not {scheme}://"
            ));
        }
        Some((_, rest)) => rest,
        None => e,
    }
    .trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        return Err(format!(
            "etcd endpoint {endpoint:?}: expected http://host:port or host:port"
        ));
    }
    Ok(format!("http://{host}"))
}

/// `(key, range_end)` of the range holding exactly the keys that start with `prefix`: etcd's
/// convention, `range_end` is the prefix with its last byte below 0xff incremented (and what
/// follows it dropped); `"\0"` for "to the end" (prefix empty or all 0xff), where an empty
/// prefix also starts the range at `"\0"`, the lowest key.
fn prefix_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let key = if prefix.is_empty() {
        vec![0]
    } else {
        prefix.to_vec()
    };
    let mut end = prefix.to_vec();
    while let Some(&last) = end.last() {
        if last < 0xff {
            if let Some(l) = end.last_mut() {
                *l = last + 1;
            }
            return (key, end);
        }
        end.pop();
    }
    (key, vec![0])
}

/// One decoded page of `/v3/kv/range`.
#[derive(Debug, PartialEq, Eq)]
struct RangePage {
    revision: i64,
    kvs: Vec<RawKeyValue>,
    more: bool,
}

#[derive(Debug, PartialEq, Eq)]
struct RawKeyValue {
    key: Vec<u8>,
    value: Vec<u8>,
    lease: i64,
    mod_revision: i64,
}

#[derive(Deserialize)]
struct RangeJson {
    #[serde(default)]
    header: Option<HeaderJson>,
    #[serde(default)]
    kvs: Vec<KvJson>,
    #[serde(default)]
    more: bool,
}

#[derive(Deserialize)]
struct HeaderJson {
    #[serde(default)]
    revision: Int64,
}

#[derive(Deserialize)]
struct KvJson {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    lease: Int64,
    #[serde(default)]
    mod_revision: Int64,
}

/// A proto3 JSON int64: a decimal string (what the gateway writes) or a number.
#[derive(Default)]
struct Int64(i64);

impl<'de> Deserialize<'de> for Int64 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Num(i64),
            Str(String),
        }
        match Repr::deserialize(d)? {
            Repr::Num(n) => Ok(Int64(n)),
            Repr::Str(s) => s
                .parse()
                .map(Int64)
                .map_err(|_| serde::de::Error::custom(format!("{s:?} is not an int64"))),
        }
    }
}

fn decode_range(body: &[u8]) -> Result<RangePage, String> {
    let json: RangeJson = serde_json::from_slice(body).map_err(|e| format!("bad JSON: {e}"))?;
    let mut kvs = Vec::with_capacity(json.kvs.len());
    for (i, kv) in json.kvs.into_iter().enumerate() {
        let key = b64_decode(&kv.key).map_err(|e| format!("kvs[{i}].key: {e}"))?;
        let value = b64_decode(&kv.value).map_err(|e| format!("kvs[{i}].value: {e}"))?;
        kvs.push(RawKeyValue {
            key,
            value,
            lease: kv.lease.0,
            mod_revision: kv.mod_revision.0,
        });
    }
    Ok(RangePage {
        revision: json.header.map_or(0, |h| h.revision.0),
        kvs,
        more: json.more,
    })
}

/// The gateway's error message (`{"error":..,"message":..,"code":..}`), else the body's start.
fn gateway_error(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorJson {
        #[serde(default)]
        message: String,
        #[serde(default)]
        error: String,
        #[serde(default)]
        code: Option<i64>,
    }
    match serde_json::from_slice::<ErrorJson>(body) {
        Ok(e) if !e.message.is_empty() || !e.error.is_empty() => {
            let msg = if e.message.is_empty() {
                e.error
            } else {
                e.message
            };
            match e.code {
                Some(c) => format!("{msg} (gRPC code {c})"),
                None => msg,
            }
        }
        _ => snippet(body),
    }
}

/// The start of a body, for error messages.
fn snippet(body: &[u8]) -> String {
    const MAX: usize = 300;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]);
    let text = text.trim();
    if text.is_empty() {
        "(empty body)".into()
    } else if body.len() > MAX {
        format!("{text}...")
    } else {
        text.to_string()
    }
}

/// An error and its sources, `a: b: c` (reqwest's own message omits the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Standard base64, written padded (what etcd's gateway reads for `bytes` fields) and read
/// padded or not (etcd writes it padded).
const B64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

fn b64_encode(data: &[u8]) -> String {
    base64::Engine::encode(&B64, data)
}

fn b64_decode(s: &str) -> Result<Vec<u8>, String> {
    // Padding, when there is any, must be complete (the engine would also take `Zg=`).
    if s.ends_with('=') && !s.len().is_multiple_of(4) {
        return Err(format!("bad base64 length ({} characters)", s.len()));
    }
    base64::Engine::decode(&B64, s).map_err(|e| format!("bad base64: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_matches_known_encodings() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("v1/instances/", "djEvaW5zdGFuY2VzLw=="),
        ] {
            assert_eq!(b64_encode(plain.as_bytes()), enc);
            assert_eq!(b64_decode(enc).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        for n in 0..all.len() {
            assert_eq!(b64_decode(&b64_encode(&all[..n])).unwrap(), &all[..n]);
        }
        assert_eq!(b64_decode("Zm8").unwrap(), b"fo");
        assert_eq!(b64_decode("+/+/").unwrap(), [0xfb, 0xff, 0xbf]);
        for bad in ["Z", "Zm9vY", "Zg===", "Zm8*", "Zg=", "Z=g="] {
            assert!(b64_decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefix_ranges_follow_etcd() {
        assert_eq!(prefix_range(b"v1/"), (b"v1/".to_vec(), b"v10".to_vec()));
        assert_eq!(prefix_range(b"a\xff"), (b"a\xff".to_vec(), b"b".to_vec()));
        assert_eq!(prefix_range(b"\xff\xff"), (b"\xff\xff".to_vec(), vec![0]));
        assert_eq!(prefix_range(b""), (vec![0], vec![0]));
    }

    #[test]
    fn endpoints_are_normalized() {
        assert_eq!(
            normalize_endpoint("http://127.0.0.1:2379/").unwrap(),
            "http://127.0.0.1:2379"
        );
        assert_eq!(
            normalize_endpoint(" etcd:2379 ").unwrap(),
            "http://etcd:2379"
        );
        assert_eq!(normalize_endpoint("HTTP://e:1").unwrap(), "http://e:1");
        for bad in [
            "",
            "https://e:2379",
            "http://",
            "http://a:1,http://b:1",
            "http://e:1/v3",
        ] {
            assert!(normalize_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn decodes_a_gateway_range_answer() {
        // As etcd 3.4's gateway writes it: int64 as strings, bytes as base64.
        let body = br#"{"header":{"cluster_id":"324952591200643719","member_id":"3319814642761637952","revision":"17","raft_term":"2"},"kvs":[{"key":"djEvaW5zdGFuY2VzL2EvYi9jLzFm","create_revision":"6","mod_revision":"7","version":"1","value":"eyJpbnN0YW5jZV9pZCI6MzF9","lease":"2324035865134567174"},{"key":"djEvaW5zdGFuY2VzL2EvYi9jLzIw","create_revision":"8","mod_revision":"8","version":"1"}],"more":true,"count":"5"}"#;
        let page = decode_range(body).unwrap();
        assert_eq!(page.revision, 17);
        assert!(page.more);
        assert_eq!(
            page.kvs,
            vec![
                RawKeyValue {
                    key: b"v1/instances/a/b/c/1f".to_vec(),
                    value: br#"{"instance_id":31}"#.to_vec(),
                    lease: 2324035865134567174,
                    mod_revision: 7,
                },
                RawKeyValue {
                    key: b"v1/instances/a/b/c/20".to_vec(),
                    value: Vec::new(),
                    lease: 0,
                    mod_revision: 8,
                },
            ]
        );
    }

    #[test]
    fn decodes_an_empty_answer_and_numbers() {
        // No key: the gateway leaves out kvs, count and more.
        let page = decode_range(br#"{"header":{"revision":"60"}}"#).unwrap();
        assert_eq!(page.revision, 60);
        assert!(page.kvs.is_empty() && !page.more);
        // Plain JSON numbers are accepted too.
        let page =
            decode_range(br#"{"header":{"revision":3},"kvs":[{"key":"YQ==","lease":9}]}"#).unwrap();
        assert_eq!((page.revision, page.kvs[0].lease), (3, 9));
        assert_eq!(page.kvs[0].key, b"a");
    }

    #[test]
    fn rejects_bad_answers_with_a_reason() {
        let e = decode_range(b"<html>").unwrap_err();
        assert!(e.contains("bad JSON"), "{e}");
        let e = decode_range(br#"{"kvs":[{"key":"not base64!"}]}"#).unwrap_err();
        assert!(e.contains("kvs[0].key") && e.contains("base64"), "{e}");
        let e = decode_range(br#"{"header":{"revision":"x1"}}"#).unwrap_err();
        assert!(e.contains("not an int64"), "{e}");
        let e = decode_range(br#"{"kvs":{}}"#).unwrap_err();
        assert!(e.contains("bad JSON"), "{e}");
    }

    #[test]
    fn gateway_errors_are_readable() {
        assert_eq!(
            gateway_error(
                br#"{"error":"illegal base64 data at input byte 3","message":"illegal base64 data at input byte 3","code":3}"#
            ),
            "illegal base64 data at input byte 3 (gRPC code 3)"
        );
        assert_eq!(gateway_error(b"Not Found\n"), "Not Found");
        assert_eq!(gateway_error(b""), "(empty body)");
        let long = vec![b'x'; 1000];
        assert!(gateway_error(&long).ends_with("..."));
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_is_reported() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = list_prefix(&format!("127.0.0.1:{port}"), "v1/")
            .await
            .unwrap_err();
        assert!(
            e.contains("unreachable") && e.contains(&port.to_string()),
            "{e}"
        );
    }
}
