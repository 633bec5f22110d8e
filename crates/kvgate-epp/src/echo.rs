//! A do-nothing endpoint picker for benchmarks: it speaks the same ext_proc protocol as the EPP
//! (holds the header answer until the body is complete, re-emits the body, follows the
//! response) but routes every request to one fixed endpoint without parsing, tokenizing or
//! scoring. Envoy + this server against Envoy alone measures the protocol's own cost, the
//! floor under any body-reading picker.

use crate::protocol;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    HttpBody, ProcessingRequest, ProcessingResponse, processing_request::Request,
};
use std::pin::Pin;
use tokio::net::TcpListener;
use tokio_stream::Stream;

struct Echo {
    destination: String,
    headers: Vec<(&'static str, String)>,
}

type EchoStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for Echo {
    type ProcessStream = EchoStream;

    async fn process(
        &self,
        request: tonic::Request<tonic::Streaming<ProcessingRequest>>,
    ) -> Result<tonic::Response<Self::ProcessStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let destination = self.destination.clone();
        let headers = self.headers.clone();
        let route = move |len: Option<usize>| {
            protocol::route_response(&destination, &headers, Vec::new(), len)
        };
        Ok(tonic::Response::new(Box::pin(async_stream::stream! {
            let mut body: Vec<u8> = Vec::new();
            while let Ok(Some(m)) = inbound.message().await {
                match m.request {
                    Some(Request::RequestHeaders(h)) if h.end_of_stream => yield Ok(route(None)),
                    Some(Request::RequestBody(HttpBody { body: b, end_of_stream, .. })) => {
                        body.extend_from_slice(&b);
                        if end_of_stream {
                            yield Ok(route(Some(body.len())));
                            for r in protocol::body_chunks(&body, true, true) {
                                yield Ok(r);
                            }
                        }
                    }
                    Some(Request::ResponseHeaders(_)) => yield Ok(protocol::response_headers_continue()),
                    Some(Request::ResponseBody(HttpBody { body: b, end_of_stream, .. })) => {
                        yield Ok(protocol::body_chunk(b, end_of_stream, false));
                    }
                    Some(Request::RequestTrailers(_)) => yield Ok(protocol::trailers_continue(true)),
                    Some(Request::ResponseTrailers(_)) => yield Ok(protocol::trailers_continue(false)),
                    _ => {}
                }
            }
        })))
    }
}

/// Serves the echo picker on `listener` (plaintext, or TLS with a self-signed certificate)
/// until the task is dropped. Every request goes to `destination` as `worker_id`, rank 0.
pub async fn serve(
    listener: TcpListener,
    destination: String,
    worker_id: u64,
    tls: bool,
) -> Result<(), String> {
    let svc = ExternalProcessorServer::new(Echo {
        destination,
        headers: vec![
            ("x-dynamo-worker-instance-id", worker_id.to_string()),
            ("x-dynamo-dp-rank", "0".to_string()),
            ("x-dynamo-routing-mode", "aggregated".to_string()),
        ],
    })
    .max_decoding_message_size(64 << 20)
    .max_encoding_message_size(64 << 20);
    let r = if tls {
        let tls = crate::tls::ReloadingTls::new(None, None)?;
        crate::grpc_builder()
            .add_service(svc)
            .serve_with_incoming(crate::tls_incoming(listener, tls))
            .await
    } else {
        crate::grpc_builder()
            .add_service(svc)
            .serve_with_incoming(crate::plain_incoming(listener))
            .await
    };
    r.map_err(|e| format!("echo picker: {e}"))
}
