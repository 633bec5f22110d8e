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

/// Finds `usage.prompt_tokens_details.cached_tokens` in a response body fed in arbitrary
/// chunks (JSON or SSE), without buffering it: it looks for the `"cached_tokens":` key outside
/// JSON strings' escaped quotes and keeps the last value seen. O(1) memory per stream.
#[derive(Debug, Default)]
pub struct CachedTokensScanner {
    /// The last bytes of the previous chunk, to match a key split across chunks.
    tail: Vec<u8>,
    /// Digits of a value that a chunk boundary cut.
    pending: Option<String>,
    last: Option<u64>,
}

const KEY: &[u8] = b"\"cached_tokens\"";

impl CachedTokensScanner {
    pub fn feed(&mut self, chunk: &[u8]) {
        // Join the tail so that a key or value split across chunks is seen whole.
        let mut buf = std::mem::take(&mut self.tail);
        let start_new = buf.len();
        buf.extend_from_slice(chunk);
        if let Some(mut digits) = self.pending.take() {
            let more: Vec<u8> = buf[start_new..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .copied()
                .collect();
            digits.push_str(&String::from_utf8_lossy(&more));
            if digits.len() > 20 {
                // Longer than any u64: not a token count; drop it.
                digits.clear();
            }
            if more.len() == buf.len() - start_new {
                self.pending = Some(digits);
                self.keep_tail(buf);
                return;
            }
            self.last = digits.parse().ok().or(self.last);
        }
        let mut i = 0;
        while let Some(pos) = find(&buf[i..], KEY) {
            let at = i + pos;
            i = at + KEY.len();
            // An escaped quote means the key is text inside a string (model output).
            if at > 0 && buf[at - 1] == b'\\' {
                continue;
            }
            let rest = &buf[i..];
            let ws = rest.iter().take_while(|b| b.is_ascii_whitespace()).count();
            match rest.get(ws) {
                Some(b':') => {}
                // The chunk ends before the colon: retry with the next chunk.
                None => {
                    self.keep_from(&buf, at);
                    return;
                }
                Some(_) => continue,
            }
            let after = &rest[ws + 1..];
            let ws2 = after.iter().take_while(|b| b.is_ascii_whitespace()).count();
            let digits: Vec<u8> = after[ws2..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .copied()
                .collect();
            if ws2 == after.len() {
                self.keep_from(&buf, at);
                return;
            }
            let end = ws2 + digits.len();
            if end == after.len() {
                // The number may go on in the next chunk.
                self.pending = Some(String::from_utf8_lossy(&digits).into_owned());
                self.tail.clear();
                return;
            }
            if !digits.is_empty() {
                self.last = String::from_utf8_lossy(&digits).parse().ok().or(self.last);
            }
        }
        self.keep_tail(buf);
    }

    fn keep_from(&mut self, buf: &[u8], at: usize) {
        // Bounded: a partial key plus whitespace; a pathological run of spaces is dropped.
        let from = at.max(buf.len().saturating_sub(256));
        self.tail = buf[from..].to_vec();
    }

    fn keep_tail(&mut self, buf: Vec<u8>) {
        let keep = KEY.len();
        let from = buf.len().saturating_sub(keep);
        self.tail = buf[from..].to_vec();
    }

    /// The last `cached_tokens` value seen.
    pub fn finish(&mut self) -> Option<u64> {
        if let Some(d) = self.pending.take() {
            self.last = d.parse().ok().or(self.last);
        }
        self.last
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    fn scan(chunks: &[&[u8]]) -> Option<u64> {
        let mut s = CachedTokensScanner::default();
        for c in chunks {
            s.feed(c);
        }
        s.finish()
    }

    #[test]
    fn finds_cached_tokens_in_json_and_sse() {
        let json =
            br#"{"usage":{"prompt_tokens":100,"prompt_tokens_details":{"cached_tokens":64}}}"#;
        assert_eq!(scan(&[json]), Some(64));
        let sse = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"usage\":{\"prompt_tokens_details\":{\"cached_tokens\": 1234}}}\n\ndata: [DONE]\n\n";
        assert_eq!(scan(&[sse]), Some(1234));
        assert_eq!(scan(&[b"{\"usage\":{\"prompt_tokens\":3}}"]), None);
        // Model output that mentions the key is escaped inside a string: not usage.
        let text = br#"{"content":"say \"cached_tokens\": 99"}"#;
        assert_eq!(scan(&[text]), None);
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_answer(
            n in 0u64..10_000_000,
            pad in 0usize..50,
            cuts in proptest::collection::vec(0usize..200, 0..8),
        ) {
            let body = format!(
                "{}{{\"usage\":{{\"prompt_tokens_details\":{{\"cached_tokens\" :  {n}}}}}}}",
                " ".repeat(pad)
            );
            let b = body.as_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(b.len())).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut prev = 0;
            for c in cuts {
                chunks.push(&b[prev..c]);
                prev = c;
            }
            chunks.push(&b[prev..]);
            prop_assert_eq!(scan(&chunks), Some(n));
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8)) {
            let mut s = CachedTokensScanner::default();
            for c in &chunks {
                s.feed(c);
            }
            let _ = s.finish();
        }
    }
}
