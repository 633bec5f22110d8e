//! OpenAI response bodies as vLLM 0.33 shapes them: completions, streaming chunks, usage with
//! `prompt_tokens_details.cached_tokens`, and `{"error": {...}}` errors.

use serde_json::{Value, json};

/// `{"error": {"message", "type", "param", "code"}}` with `code` = the HTTP status.
pub fn error_body(status: u16, kind: &str, message: &str, param: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": status}})
}

/// The OpenAI error type name for an HTTP status.
pub fn error_kind(status: u16) -> &'static str {
    match status {
        400 => "BadRequestError",
        404 => "NotFoundError",
        413 => "RequestTooLargeError",
        429 => "RateLimitError",
        500 => "InternalServerError",
        502 => "BadGatewayError",
        503 => "ServiceUnavailableError",
        504 => "GatewayTimeoutError",
        _ => "Error",
    }
}

pub fn usage(prompt_tokens: usize, completion_tokens: u32, cached_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens as usize,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    })
}

/// The whole response of a non-streaming request.
pub fn completion(
    chat: bool,
    id: &str,
    created: u64,
    model: &str,
    text: &str,
    finish_reason: &str,
    usage: Value,
) -> Value {
    if chat {
        json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": null, "finish_reason": finish_reason}],
            "usage": usage,
        })
    } else {
        json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason}],
            "usage": usage,
        })
    }
}

/// One streamed chunk. `role` marks the first chat chunk; `finish_reason` the last.
pub fn chunk(
    chat: bool,
    id: &str,
    created: u64,
    model: &str,
    text: &str,
    first: bool,
    finish_reason: Option<&str>,
) -> Value {
    if chat {
        let delta = if first {
            json!({"role": "assistant", "content": text})
        } else {
            json!({"content": text})
        };
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
        })
    } else {
        json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason}],
        })
    }
}

/// The final usage-only chunk (`stream_options.include_usage`).
pub fn usage_chunk(chat: bool, id: &str, created: u64, model: &str, usage: Value) -> Value {
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    json!({"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": usage})
}

/// `usage.prompt_tokens_details.cached_tokens` of a response body or stream chunk, if present.
pub fn cached_tokens(body: &Value) -> Option<u64> {
    body.get("usage")?
        .get("prompt_tokens_details")?
        .get("cached_tokens")?
        .as_u64()
}

pub fn models(model: &str, created: u64, max_model_len: u64) -> Value {
    json!({"object": "list", "data": [{
        "id": model, "object": "model", "created": created, "owned_by": "kvgate",
        "root": model, "parent": null, "max_model_len": max_model_len,
    }]})
}
