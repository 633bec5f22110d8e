//! OpenAI-compatible request bodies: parsed once into what routing needs, with the original JSON
//! kept so that it can be forwarded unchanged (or with `nvext.token_data` injected).
//!
//! Parsing never panics and every error names the offending field, so servers can answer 400 with
//! a useful message.

use serde_json::{Map, Value};
use std::fmt;

/// Which endpoint the body belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    Chat,
    /// `POST /v1/completions`
    Completion,
}

impl Endpoint {
    pub fn from_path(path: &str) -> Option<Self> {
        let path = path.split('?').next().unwrap_or(path).trim_end_matches('/');
        match path {
            "/v1/chat/completions" => Some(Endpoint::Chat),
            "/v1/completions" => Some(Endpoint::Completion),
            _ => None,
        }
    }
}

/// A chat message with its content flattened to text (array content: the text parts joined by
/// newlines, as vLLM does for templates that expect strings).
#[derive(Clone, Debug, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// The message as sent (tool calls, names, ...), for chat templates that use more than text.
    pub raw: Value,
}

/// A completions prompt.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct OpenAiRequest {
    pub endpoint: Endpoint,
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub prompt: Option<Prompt>,
    pub tools: Option<Value>,
    pub stream: bool,
    /// `stream_options.include_usage`
    pub include_usage: bool,
    /// `max_completion_tokens`, else `max_tokens`.
    pub max_tokens: Option<u32>,
    pub cache_salt: Option<String>,
    /// `nvext.token_data`: token ids computed upstream (the EPP), to use instead of tokenizing.
    pub token_data: Option<Vec<u32>>,
    /// The whole body, for forwarding.
    pub body: Map<String, Value>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// The JSON path of the problem (`messages[2].content`), empty for the body itself.
    pub field: String,
    pub message: String,
}

impl ParseError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "`{}`: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ParseError {}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn u32_field(body: &Map<String, Value>, key: &str) -> Result<Option<u32>, ParseError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| ParseError::new(key, "must be a whole number in 0..=4294967295")),
        Some(v) => Err(ParseError::new(
            key,
            format!("must be a whole number, not {}", type_name(v)),
        )),
    }
}

fn token_array(v: &Value, field: &str) -> Result<Vec<u32>, ParseError> {
    let Value::Array(items) = v else {
        return Err(ParseError::new(
            field,
            format!("must be an array of token ids, not {}", type_name(v)),
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, t)| {
            t.as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .ok_or_else(|| {
                    ParseError::new(
                        format!("{field}[{i}]"),
                        "must be a token id in 0..=4294967295",
                    )
                })
        })
        .collect()
}

/// The text of a message's `content`: a string, or an array of parts whose text parts are joined.
fn content_text(v: Option<&Value>, field: &str) -> Result<String, ParseError> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::new();
            for (i, p) in parts.iter().enumerate() {
                match p {
                    Value::String(s) => texts.push(s.as_str()),
                    Value::Object(o) => match o.get("type").and_then(Value::as_str) {
                        Some("text") | None => match o.get("text") {
                            Some(Value::String(s)) => texts.push(s.as_str()),
                            _ => {
                                return Err(ParseError::new(
                                    format!("{field}[{i}].text"),
                                    "a text part needs a string `text`",
                                ));
                            }
                        },
                        // Images, audio, ...: not tokenized as text; the engine handles them.
                        Some(_) => {}
                    },
                    other => {
                        return Err(ParseError::new(
                            format!("{field}[{i}]"),
                            format!("must be a content part object, not {}", type_name(other)),
                        ));
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        Some(other) => Err(ParseError::new(
            field,
            format!(
                "must be a string or an array of content parts, not {}",
                type_name(other)
            ),
        )),
    }
}

impl OpenAiRequest {
    /// Parses a request body for `endpoint`.
    pub fn parse(endpoint: Endpoint, bytes: &[u8]) -> Result<Self, ParseError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| ParseError::new("", format!("the body is not valid JSON: {e}")))?;
        let Value::Object(body) = value else {
            return Err(ParseError::new(
                "",
                format!("the body must be a JSON object, not {}", type_name(&value)),
            ));
        };
        Self::from_map(endpoint, body)
    }

    pub fn from_map(endpoint: Endpoint, body: Map<String, Value>) -> Result<Self, ParseError> {
        let model = match body.get("model") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::String(_)) => return Err(ParseError::new("model", "must not be empty")),
            None | Some(Value::Null) => {
                return Err(ParseError::new("model", "is required"));
            }
            Some(v) => {
                return Err(ParseError::new(
                    "model",
                    format!("must be a string, not {}", type_name(v)),
                ));
            }
        };
        let stream = match body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(ParseError::new(
                    "stream",
                    format!("must be a boolean, not {}", type_name(v)),
                ));
            }
        };
        let include_usage = body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let max_tokens = match u32_field(&body, "max_completion_tokens")? {
            Some(v) => Some(v),
            None => u32_field(&body, "max_tokens")?,
        };
        let cache_salt = match body.get("cache_salt") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()).filter(|s| !s.is_empty()),
            Some(v) => {
                return Err(ParseError::new(
                    "cache_salt",
                    format!("must be a string, not {}", type_name(v)),
                ));
            }
        };
        let token_data = match body.get("nvext") {
            None | Some(Value::Null) => None,
            Some(Value::Object(nvext)) => match nvext.get("token_data") {
                None | Some(Value::Null) => None,
                Some(v) => Some(token_array(v, "nvext.token_data")?),
            },
            Some(v) => {
                return Err(ParseError::new(
                    "nvext",
                    format!("must be an object, not {}", type_name(v)),
                ));
            }
        };
        let tools = body.get("tools").filter(|t| !t.is_null()).cloned();
        let mut messages = Vec::new();
        let mut prompt = None;
        match endpoint {
            Endpoint::Chat => {
                let Some(Value::Array(list)) = body.get("messages") else {
                    return Err(match body.get("messages") {
                        None | Some(Value::Null) => ParseError::new("messages", "is required"),
                        Some(v) => ParseError::new(
                            "messages",
                            format!("must be an array, not {}", type_name(v)),
                        ),
                    });
                };
                if list.is_empty() {
                    return Err(ParseError::new("messages", "must not be empty"));
                }
                for (i, m) in list.iter().enumerate() {
                    let field = format!("messages[{i}]");
                    let Value::Object(obj) = m else {
                        return Err(ParseError::new(
                            field,
                            format!("must be an object, not {}", type_name(m)),
                        ));
                    };
                    let role = match obj.get("role") {
                        Some(Value::String(r)) if !r.is_empty() => r.clone(),
                        _ => {
                            return Err(ParseError::new(
                                format!("{field}.role"),
                                "is required and must be a non-empty string",
                            ));
                        }
                    };
                    let content = content_text(obj.get("content"), &format!("{field}.content"))?;
                    messages.push(ChatMessage {
                        role,
                        content,
                        raw: m.clone(),
                    });
                }
            }
            Endpoint::Completion => {
                prompt = Some(match body.get("prompt") {
                    None | Some(Value::Null) => {
                        return Err(ParseError::new("prompt", "is required"));
                    }
                    Some(Value::String(s)) => Prompt::Text(s.clone()),
                    Some(Value::Array(items))
                        if items.iter().all(Value::is_number) && !items.is_empty() =>
                    {
                        Prompt::Tokens(token_array(&Value::Array(items.clone()), "prompt")?)
                    }
                    Some(Value::Array(items)) if items.len() == 1 => match &items[0] {
                        Value::String(s) => Prompt::Text(s.clone()),
                        v @ Value::Array(_) => Prompt::Tokens(token_array(v, "prompt[0]")?),
                        v => {
                            return Err(ParseError::new(
                                "prompt[0]",
                                format!("must be a string or token array, not {}", type_name(v)),
                            ));
                        }
                    },
                    Some(Value::Array(items)) if items.is_empty() => {
                        return Err(ParseError::new("prompt", "must not be empty"));
                    }
                    Some(Value::Array(_)) => {
                        return Err(ParseError::new(
                            "prompt",
                            "batched prompts (several prompts in one request) are not supported; send one request per prompt",
                        ));
                    }
                    Some(v) => {
                        return Err(ParseError::new(
                            "prompt",
                            format!(
                                "must be a string or an array of token ids, not {}",
                                type_name(v)
                            ),
                        ));
                    }
                });
            }
        }
        Ok(Self {
            endpoint,
            model,
            messages,
            prompt,
            tools,
            stream,
            include_usage,
            max_tokens,
            cache_salt,
            token_data,
            body,
        })
    }

    /// Like [`body_with_token_data`](Self::body_with_token_data), but from the request's own
    /// bytes: when the body has no `nvext`, the ids are appended before its closing brace and
    /// the rest is copied as is (no re-serialisation of a prompt that may be megabytes).
    /// `raw` must be the bytes this request was parsed from.
    pub fn raw_body_with_token_data(&self, raw: &[u8], tokens: &[u32]) -> Vec<u8> {
        let end = raw.iter().rposition(|b| !b.is_ascii_whitespace());
        match end {
            Some(end) if raw[end] == b'}' && !self.body.contains_key("nvext") => {
                let mut out = Vec::with_capacity(end + 32 + tokens.len() * 7);
                out.extend_from_slice(&raw[..end]);
                if !self.body.is_empty() {
                    out.push(b',');
                }
                out.extend_from_slice(b"\"nvext\":{\"token_data\":[");
                let mut buf = itoa::Buffer::new();
                for (i, t) in tokens.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(buf.format(*t).as_bytes());
                }
                out.extend_from_slice(b"]}}");
                out
            }
            _ => self.body_with_token_data(tokens),
        }
    }

    /// The body with `nvext.token_data` set to `tokens`, other `nvext` fields preserved.
    pub fn body_with_token_data(&self, tokens: &[u32]) -> Vec<u8> {
        let mut body = self.body.clone();
        set_token_data(&mut body, tokens);
        serde_json::to_vec(&Value::Object(body)).unwrap_or_default()
    }
}

/// Writes `nvext.token_data` into a body, keeping any other `nvext` fields.
pub fn set_token_data(body: &mut Map<String, Value>, tokens: &[u32]) {
    let nvext = body
        .entry("nvext")
        .or_insert_with(|| Value::Object(Map::new()));
    if !nvext.is_object() {
        *nvext = Value::Object(Map::new());
    }
    if let Value::Object(n) = nvext {
        n.insert(
            "token_data".into(),
            Value::Array(tokens.iter().map(|&t| Value::from(t)).collect()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_splice_equals_the_reserialised_body() {
        for raw in [
            r#"{"model":"m","messages":[{"role":"user","content":"h\u00e9 \"x\""}]}"#,
            "  {\"model\": \"m\", \"prompt\": \"p\"}  \n",
            r#"{"model":"m","prompt":"p","nvext":{"keep":1}}"#,
        ] {
            let ep = if raw.contains("messages") {
                Endpoint::Chat
            } else {
                Endpoint::Completion
            };
            let req = OpenAiRequest::parse(ep, raw.as_bytes()).unwrap();
            let spliced = req.raw_body_with_token_data(raw.as_bytes(), &[1, 20, 4_000_000_000]);
            let a: Value = serde_json::from_slice(&spliced).unwrap();
            let b: Value =
                serde_json::from_slice(&req.body_with_token_data(&[1, 20, 4_000_000_000])).unwrap();
            assert_eq!(a, b, "{raw}");
        }
    }
    use serde_json::json;

    fn chat(v: Value) -> Result<OpenAiRequest, ParseError> {
        OpenAiRequest::parse(Endpoint::Chat, v.to_string().as_bytes())
    }

    #[test]
    fn parses_a_chat_request() {
        let r = chat(json!({
            "model": "qwen3",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "b"}]}
            ],
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": 10,
            "max_completion_tokens": 20,
            "cache_salt": "tenant",
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "nvext": {"token_data": [1, 2, 3], "keep": "me"},
            "unknown_field": 42
        }))
        .unwrap();
        assert_eq!(r.model, "qwen3");
        assert_eq!(r.messages[1].content, "a\nb");
        assert!(r.stream && r.include_usage);
        assert_eq!(r.max_tokens, Some(20));
        assert_eq!(r.cache_salt.as_deref(), Some("tenant"));
        assert_eq!(r.token_data, Some(vec![1, 2, 3]));
        assert!(r.tools.is_some());
        assert_eq!(r.body["unknown_field"], 42);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                json!({"messages": [{"role": "user", "content": "x"}]}),
                "`model`: is required",
            ),
            (
                json!({"model": 3, "messages": []}),
                "`model`: must be a string, not a number",
            ),
            (json!({"model": "m"}), "`messages`: is required"),
            (
                json!({"model": "m", "messages": []}),
                "`messages`: must not be empty",
            ),
            (
                json!({"model": "m", "messages": [{"content": "x"}]}),
                "`messages[0].role`",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": 5}]}),
                "`messages[0].content`",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}),
                "`max_tokens`",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}),
                "`stream`",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "nvext": {"token_data": [1, "a"]}}),
                "`nvext.token_data[1]`",
            ),
        ];
        for (body, want) in cases {
            let e = chat(body.clone()).unwrap_err().to_string();
            assert!(e.contains(want), "{body}: {e}");
        }
        let e = OpenAiRequest::parse(Endpoint::Chat, b"{not json").unwrap_err();
        assert!(e.to_string().contains("not valid JSON"));
        let e = OpenAiRequest::parse(Endpoint::Chat, b"[1]").unwrap_err();
        assert!(e.to_string().contains("must be a JSON object"));
    }

    #[test]
    fn completion_prompts() {
        let p = |v: Value| {
            OpenAiRequest::parse(
                Endpoint::Completion,
                json!({"model": "m", "prompt": v}).to_string().as_bytes(),
            )
        };
        assert_eq!(
            p(json!("hi")).unwrap().prompt,
            Some(Prompt::Text("hi".into()))
        );
        assert_eq!(
            p(json!([1, 2])).unwrap().prompt,
            Some(Prompt::Tokens(vec![1, 2]))
        );
        assert_eq!(
            p(json!(["hi"])).unwrap().prompt,
            Some(Prompt::Text("hi".into()))
        );
        assert_eq!(
            p(json!([[5, 6]])).unwrap().prompt,
            Some(Prompt::Tokens(vec![5, 6]))
        );
        assert!(
            p(json!(["a", "b"]))
                .unwrap_err()
                .to_string()
                .contains("batched")
        );
        assert!(p(json!([])).is_err());
        assert!(p(json!({})).is_err());
    }

    #[test]
    fn token_data_injection_keeps_other_fields() {
        let r = chat(json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "nvext": {"keep": 1}})).unwrap();
        let out: Value = serde_json::from_slice(&r.body_with_token_data(&[7, 8])).unwrap();
        assert_eq!(out["nvext"], json!({"keep": 1, "token_data": [7, 8]}));
        assert_eq!(out["messages"][0]["content"], "x");
        let r =
            chat(json!({"model": "m", "messages": [{"role": "user", "content": "x"}]})).unwrap();
        let out: Value = serde_json::from_slice(&r.body_with_token_data(&[1])).unwrap();
        assert_eq!(out["nvext"]["token_data"], json!([1]));
    }

    #[test]
    fn endpoint_from_path() {
        assert_eq!(
            Endpoint::from_path("/v1/chat/completions"),
            Some(Endpoint::Chat)
        );
        assert_eq!(
            Endpoint::from_path("/v1/completions?x=1"),
            Some(Endpoint::Completion)
        );
        assert_eq!(Endpoint::from_path("/v1/models"), None);
    }

    fn arb_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "[a-z]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("model".to_string()),
                        Just("messages".to_string()),
                        Just("role".to_string()),
                        Just("content".to_string()),
                        Just("prompt".to_string()),
                        Just("nvext".to_string()),
                        Just("token_data".to_string()),
                        Just("max_tokens".to_string()),
                        Just("stream".to_string()),
                        Just("text".to_string()),
                        Just("type".to_string()),
                        "[a-z]{1,4}",
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// Arbitrary bytes never panic the parser.
        #[test]
        fn never_panics_on_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = OpenAiRequest::parse(Endpoint::Chat, &bytes);
            let _ = OpenAiRequest::parse(Endpoint::Completion, &bytes);
        }

        /// Arbitrary JSON shaped like requests never panics, and injection round-trips.
        #[test]
        fn never_panics_on_json(v in arb_json()) {
            let bytes = v.to_string().into_bytes();
            for ep in [Endpoint::Chat, Endpoint::Completion] {
                if let Ok(r) = OpenAiRequest::parse(ep, &bytes) {
                    let out = r.body_with_token_data(&[1, 2]);
                    let again = OpenAiRequest::parse(ep, &out);
                    proptest::prop_assert!(again.is_ok());
                    proptest::prop_assert_eq!(again.unwrap().token_data, Some(vec![1, 2]));
                }
            }
        }

        /// Splicing the ids into the client's bytes gives the same document as re-serialising,
        /// for any accepted body, pretty-printed or compact, with trailing whitespace.
        #[test]
        fn splice_equals_reserialise(
            content in "\\PC{0,40}",
            extra in proptest::collection::btree_map("[a-z_]{1,8}", arb_json(), 0..4),
            pretty in proptest::prelude::any::<bool>(),
            tokens in proptest::collection::vec(proptest::prelude::any::<u32>(), 0..20),
        ) {
            let mut m: Map<String, Value> = extra.into_iter().collect();
            m.insert("model".into(), Value::String("m".into()));
            m.insert("messages".into(), serde_json::json!([{"role": "user", "content": content}]));
            let v = Value::Object(m);
            let mut raw = if pretty {
                serde_json::to_vec_pretty(&v).unwrap_or_default()
            } else {
                v.to_string().into_bytes()
            };
            raw.extend_from_slice(b" \n");
            let parsed = OpenAiRequest::parse(Endpoint::Chat, &raw);
            // Extra fields may legitimately be refused (e.g. a mistyped `stream`); the rest
            // must splice exactly.
            if let Ok(r) = parsed {
                {
                    let spliced: Value = serde_json::from_slice(&r.raw_body_with_token_data(&raw, &tokens)).unwrap();
                    // The client's document (as parsed from its own bytes) plus the ids. Not the
                    // re-serialised body: that one rounds some floats a second time.
                    let expected = if r.body.contains_key("nvext") {
                        serde_json::from_slice(&r.body_with_token_data(&tokens)).unwrap()
                    } else {
                        let mut doc: Map<String, Value> = serde_json::from_slice(&raw).unwrap();
                        set_token_data(&mut doc, &tokens);
                        Value::Object(doc)
                    };
                    proptest::prop_assert_eq!(spliced, expected);
                }
            }
        }
    }
}
