//! The Endpoint Picker Protocol's message details, free of I/O: reading headers and metadata
//! from Envoy's `ProcessingRequest`s, and building the `ProcessingResponse`s the EPP sends back
//! (routing headers + `envoy.lb` metadata, re-emitted body chunks, JSON immediate responses).

use envoy_types::pb::envoy::config::core::v3::{
    HeaderMap, HeaderValue, HeaderValueOption, Metadata, header_value_option,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ImmediateResponse,
    ProcessingRequest, ProcessingResponse, StreamedBodyResponse, TrailersResponse, body_mutation,
    processing_response,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
pub use kvgate_wire::response::CachedTokensScanner;

/// Header (and `envoy.lb` key) naming the endpoint(s) the gateway must use.
pub const DESTINATION: &str = "x-gateway-destination-endpoint";
/// `envoy.lb` key naming the endpoint that served the request (response path).
pub const SERVED: &str = "x-gateway-destination-endpoint-served";
/// `envoy.lb.subset_hint` key: the endpoints the gateway allows.
pub const SUBSET: &str = "x-gateway-destination-endpoint-subset";
pub const LB_NAMESPACE: &str = "envoy.lb";
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
/// Where Envoy puts the attributes the filter asked for (`response_attributes`).
pub const EXT_PROC_ATTRIBUTES: &str = "envoy.filters.http.ext_proc";

/// GAIE's chunk size for re-emitted bodies (under the 64 KiB the proto recommends).
pub const BODY_CHUNK_BYTES: usize = 62_000;

/// Routing headers only the EPP may set: removed from every request before it is forwarded.
pub const CLIENT_ROUTING_HEADERS: &[&str] = &[
    DESTINATION,
    SERVED,
    SUBSET,
    "x-dynamo-worker-instance-id",
    "x-dynamo-dp-rank",
    "x-dynamo-routing-mode",
    "x-dynamo-prefill-instance-id",
    "x-dynamo-prefill-dp-rank",
];

/// A header's value: Envoy sends `raw_value` (bytes); older senders fill `value`.
pub fn header_value(h: &HeaderValue) -> &[u8] {
    if h.raw_value.is_empty() {
        h.value.as_bytes()
    } else {
        &h.raw_value
    }
}

/// The first header named `name` (lower case), as text.
pub fn get_header<'a>(map: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    map?.headers
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(header_value(h)).ok())
}

/// Headers of this request that a client must not control: the fixed list plus any other
/// `x-dynamo-*` header (a future routing header must not slip through).
pub fn headers_to_remove(map: Option<&HeaderMap>) -> Vec<String> {
    let mut out: Vec<String> = CLIENT_ROUTING_HEADERS
        .iter()
        .map(|s| (*s).to_string())
        .collect();
    if let Some(map) = map {
        for h in &map.headers {
            let k = h.key.to_ascii_lowercase();
            if k.starts_with("x-dynamo-") && !out.contains(&k) {
                out.push(k);
            }
        }
    }
    out
}

fn string_list(v: &Value) -> Vec<String> {
    match &v.kind {
        Some(Kind::StringValue(s)) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        Some(Kind::ListValue(l)) => l.values.iter().flat_map(string_list).collect(),
        _ => Vec::new(),
    }
}

/// The gateway's subset hint: `None` when absent (all endpoints allowed), else the allowed
/// `ip:port` list (possibly empty). Accepts a list of strings or one comma-separated string.
pub fn subset_hint(md: Option<&Metadata>) -> Option<Vec<String>> {
    let ns = md?.filter_metadata.get(SUBSET_NAMESPACE)?;
    let v = ns.fields.get(SUBSET)?;
    Some(string_list(v))
}

fn struct_string<'a>(s: &'a Struct, key: &str) -> Option<&'a str> {
    match &s.fields.get(key)?.kind {
        Some(Kind::StringValue(v)) if !v.is_empty() => Some(v.as_str()),
        _ => None,
    }
}

/// The endpoint that served the request, as the gateway reports it on the response path:
/// GAIE's `envoy.lb` metadata key first, then Envoy's `upstream.address` attribute.
pub fn served_endpoint(req: &ProcessingRequest) -> Option<String> {
    if let Some(md) = &req.metadata_context
        && let Some(lb) = md.filter_metadata.get(LB_NAMESPACE)
        && let Some(v) = struct_string(lb, SERVED)
    {
        return Some(v.to_string());
    }
    let attrs = req.attributes.get(EXT_PROC_ATTRIBUTES)?;
    struct_string(attrs, "upstream.address").map(str::to_string)
}

fn header_option(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            value: String::new(),
            raw_value: value.as_bytes().to_vec(),
        }),
        // Replace, never add a second value next to one the request already had.
        append_action: header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

/// The request-headers answer that routes: destination header and identical `envoy.lb`
/// metadata, the `x-dynamo-*` headers, client routing headers removed, route cache cleared.
/// `content_length`: the length of the body that will be re-emitted.
pub fn route_response(
    destination: &str,
    set: &[(&str, String)],
    remove: Vec<String>,
    content_length: Option<usize>,
) -> ProcessingResponse {
    let mut set_headers = vec![header_option(DESTINATION, destination)];
    set_headers.extend(set.iter().map(|(k, v)| header_option(k, v)));
    // Set headers overwrite; removing them too would depend on Envoy's mutation order.
    let mut remove = remove;
    remove.retain(|r| r != DESTINATION && !set.iter().any(|(k, _)| k == r));
    if let Some(n) = content_length {
        set_headers.push(header_option("content-length", &n.to_string()));
    }
    let lb = Struct {
        fields: [(DESTINATION.to_string(), string_value(destination))]
            .into_iter()
            .collect(),
    };
    let metadata = Struct {
        fields: [(
            LB_NAMESPACE.to_string(),
            Value {
                kind: Some(Kind::StructValue(lb)),
            },
        )]
        .into_iter()
        .collect(),
    };
    ProcessingResponse {
        response: Some(processing_response::Response::RequestHeaders(
            HeadersResponse {
                response: Some(CommonResponse {
                    header_mutation: Some(HeaderMutation {
                        set_headers,
                        remove_headers: remove,
                    }),
                    clear_route_cache: true,
                    ..Default::default()
                }),
            },
        )),
        dynamic_metadata: Some(metadata),
        ..Default::default()
    }
}

/// The body re-emitted as streamed chunks of at most [`BODY_CHUNK_BYTES`]; the last one carries
/// `end_of_stream`. An empty body is one empty final chunk.
/// `end_of_stream`: false when trailers follow the body.
pub fn body_chunks(body: &[u8], request: bool, end_of_stream: bool) -> Vec<ProcessingResponse> {
    if body.is_empty() {
        return vec![body_chunk(Vec::new(), end_of_stream, request)];
    }
    let n = body.len().div_ceil(BODY_CHUNK_BYTES);
    body.chunks(BODY_CHUNK_BYTES)
        .enumerate()
        .map(|(i, c)| body_chunk(c.to_vec(), end_of_stream && i + 1 == n, request))
        .collect()
}

/// One streamed body chunk, on the request or the response path.
pub fn body_chunk(body: Vec<u8>, end_of_stream: bool, request: bool) -> ProcessingResponse {
    let r = BodyResponse {
        response: Some(CommonResponse {
            body_mutation: Some(BodyMutation {
                mutation: Some(body_mutation::Mutation::StreamedResponse(
                    StreamedBodyResponse {
                        body,
                        end_of_stream,
                        ..Default::default()
                    },
                )),
            }),
            ..Default::default()
        }),
    };
    ProcessingResponse {
        response: Some(if request {
            processing_response::Response::RequestBody(r)
        } else {
            processing_response::Response::ResponseBody(r)
        }),
        ..Default::default()
    }
}

/// Lets the response headers through unchanged.
pub fn response_headers_continue() -> ProcessingResponse {
    ProcessingResponse {
        response: Some(processing_response::Response::ResponseHeaders(
            HeadersResponse {
                response: Some(CommonResponse::default()),
            },
        )),
        ..Default::default()
    }
}

pub fn trailers_continue(request: bool) -> ProcessingResponse {
    let t = TrailersResponse::default();
    ProcessingResponse {
        response: Some(if request {
            processing_response::Response::RequestTrailers(t)
        } else {
            processing_response::Response::ResponseTrailers(t)
        }),
        ..Default::default()
    }
}

/// An error answered by the gateway on the EPP's behalf, with an OpenAI-style JSON body.
pub fn immediate(
    status: u16,
    message: &str,
    param: Option<&str>,
    retry_after_secs: Option<u32>,
) -> ProcessingResponse {
    let body = kvgate_wire::response::error_body(
        status,
        kvgate_wire::response::error_kind(status),
        message,
        param,
    );
    let mut set_headers = vec![header_option("content-type", "application/json")];
    if let Some(s) = retry_after_secs {
        set_headers.push(header_option("retry-after", &s.to_string()));
    }
    ProcessingResponse {
        response: Some(processing_response::Response::ImmediateResponse(
            ImmediateResponse {
                status: Some(HttpStatus {
                    code: i32::from(status),
                }),
                headers: Some(HeaderMutation {
                    set_headers,
                    remove_headers: Vec::new(),
                }),
                body: body.to_string().into_bytes(),
                grpc_status: None,
                details: format!("kvgate_epp_{status}"),
            },
        )),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use envoy_types::pb::google::protobuf::ListValue;

    #[test]
    fn subset_hint_accepts_lists_and_comma_strings() {
        let mut md = Metadata::default();
        assert_eq!(subset_hint(Some(&md)), None);
        let list = Value {
            kind: Some(Kind::ListValue(ListValue {
                values: vec![string_value("10.0.0.1:8000"), string_value("10.0.0.2:8000")],
            })),
        };
        md.filter_metadata.insert(
            SUBSET_NAMESPACE.into(),
            Struct {
                fields: [(SUBSET.to_string(), list)].into_iter().collect(),
            },
        );
        assert_eq!(
            subset_hint(Some(&md)).unwrap(),
            vec!["10.0.0.1:8000", "10.0.0.2:8000"]
        );
        md.filter_metadata.insert(
            SUBSET_NAMESPACE.into(),
            Struct {
                fields: [(SUBSET.to_string(), string_value("a:1, b:2"))]
                    .into_iter()
                    .collect(),
            },
        );
        assert_eq!(subset_hint(Some(&md)).unwrap(), vec!["a:1", "b:2"]);
        md.filter_metadata.insert(
            SUBSET_NAMESPACE.into(),
            Struct {
                fields: [(SUBSET.to_string(), string_value(""))]
                    .into_iter()
                    .collect(),
            },
        );
        assert_eq!(subset_hint(Some(&md)).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn removes_every_dynamo_header_the_client_sent() {
        let map = HeaderMap {
            headers: vec![
                HeaderValue {
                    key: "X-Dynamo-Future-Thing".into(),
                    value: String::new(),
                    raw_value: b"1".to_vec(),
                },
                HeaderValue {
                    key: "x-request-id".into(),
                    value: "r".into(),
                    raw_value: Vec::new(),
                },
            ],
        };
        let r = headers_to_remove(Some(&map));
        assert!(r.contains(&"x-dynamo-future-thing".to_string()));
        assert!(r.contains(&DESTINATION.to_string()));
        assert!(!r.contains(&"x-request-id".to_string()));
        assert_eq!(get_header(Some(&map), "x-request-id"), Some("r"));
        assert_eq!(get_header(Some(&map), "x-dynamo-future-thing"), Some("1"));
    }

    #[test]
    fn bodies_are_rechunked_with_end_of_stream_last() {
        let body = vec![b'x'; BODY_CHUNK_BYTES * 2 + 5];
        let chunks = body_chunks(&body, true, true);
        assert_eq!(chunks.len(), 3);
        let mut total = 0;
        for (i, c) in chunks.iter().enumerate() {
            let Some(processing_response::Response::RequestBody(b)) = &c.response else {
                panic!("not a request body")
            };
            let Some(body_mutation::Mutation::StreamedResponse(s)) = b
                .response
                .as_ref()
                .unwrap()
                .body_mutation
                .as_ref()
                .unwrap()
                .mutation
                .as_ref()
            else {
                panic!("not streamed")
            };
            assert!(s.body.len() <= BODY_CHUNK_BYTES);
            assert_eq!(s.end_of_stream, i == 2);
            total += s.body.len();
        }
        assert_eq!(total, body.len());
        assert_eq!(body_chunks(&[], false, true).len(), 1);
    }

    #[test]
    fn route_response_sets_header_and_metadata_identically() {
        let r = route_response(
            "10.0.0.1:8000",
            &[("x-dynamo-worker-instance-id", "7".into())],
            vec!["x-dynamo-dp-rank".into()],
            Some(42),
        );
        let md = r.dynamic_metadata.unwrap();
        let Some(Kind::StructValue(lb)) = &md.fields[LB_NAMESPACE].kind else {
            panic!()
        };
        assert_eq!(struct_string(lb, DESTINATION), Some("10.0.0.1:8000"));
        let Some(processing_response::Response::RequestHeaders(h)) = r.response else {
            panic!()
        };
        let c = h.response.unwrap();
        assert!(c.clear_route_cache);
        let m = c.header_mutation.unwrap();
        let get = |k: &str| {
            m.set_headers
                .iter()
                .find(|h| h.header.as_ref().unwrap().key == k)
                .map(|h| String::from_utf8(h.header.as_ref().unwrap().raw_value.clone()).unwrap())
        };
        assert_eq!(get(DESTINATION).as_deref(), Some("10.0.0.1:8000"));
        assert_eq!(get("content-length").as_deref(), Some("42"));
        assert_eq!(get("x-dynamo-worker-instance-id").as_deref(), Some("7"));
        assert_eq!(m.remove_headers, vec!["x-dynamo-dp-rank"]);
    }
}
