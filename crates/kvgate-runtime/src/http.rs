//! HTTP helpers: every error is OpenAI-shaped JSON with the right status.

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kvgate_wire::response as resp;

/// `{"error": {"message", "type", "param", "code"}}` with `status`.
pub fn error(status: StatusCode, message: &str, param: Option<&str>) -> Response {
    let body = resp::error_body(
        status.as_u16(),
        resp::error_kind(status.as_u16()),
        message,
        param,
    );
    (status, axum::Json(body)).into_response()
}

/// Fallback for unknown paths.
pub async fn not_found(req: Request) -> Response {
    error(
        StatusCode::NOT_FOUND,
        &format!("no route for {} {}", req.method(), req.uri().path()),
        None,
    )
}

/// Fallback for known paths called with the wrong method.
pub async fn method_not_allowed(req: Request) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!(
            "method {} is not allowed on {}",
            req.method(),
            req.uri().path()
        ),
        None,
    )
}

/// Reads a body up to `limit` bytes: 413 past it, 400 when the client breaks off mid-body.
pub async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, Box<Response>> {
    match axum::body::to_bytes(body, limit).await {
        Ok(b) => Ok(b),
        Err(e) => {
            let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            let mut too_large = false;
            while let Some(err) = src {
                too_large |= err.is::<http_body_util::LengthLimitError>();
                src = err.source();
            }
            Err(Box::new(if too_large {
                error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("request body is larger than {limit} bytes"),
                    None,
                )
            } else {
                error(
                    StatusCode::BAD_REQUEST,
                    &format!("cannot read the request body: {e}"),
                    None,
                )
            }))
        }
    }
}
