//! Chat templates: HF Jinja templates rendered with minijinja (with Python string-method
//! compatibility, `raise_exception` and `strftime_now`), and the embedded ChatML template.

use crate::TokenizeError;
use kvgate_wire::openai::ChatMessage;
use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, Error, ErrorKind, Value, context};
use serde_json::Value as Json;

/// What starts a turn in ChatML.
pub const CHATML_TURN_START: &str = "<|im_start|>";

/// ChatML, with tools listed in a system turn when present.
pub const CHATML: &str = "{%- if tools %}<|im_start|>system\n# Tools\n{{ tools | tojson }}<|im_end|>\n{% endif -%}\n\
{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor -%}\n\
{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif -%}";

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(format: String) -> String {
    // Templates use this for "today's date" lines. Routing only needs determinism within a
    // process; a fixed date keeps the router's and the engine's renderings identical.
    let _ = format;
    "26 Jul 2024".to_string()
}

impl ChatTemplate {
    /// Compiles a Jinja chat template.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, TokenizeError> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", py_tojson);
        // As transformers renders chat templates: trim_blocks and lstrip_blocks on.
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TokenizeError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| TokenizeError::Template(e.to_string()))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The embedded ChatML template.
    pub fn chatml() -> Self {
        let mut env = Environment::new();
        env.add_filter("tojson", py_tojson);
        // CHATML is a constant that compiles; a failure here is a bug caught by the tests.
        let _ = env.add_template("chat", CHATML);
        Self {
            env,
            bos_token: String::new(),
            eos_token: "<|im_end|>".into(),
        }
    }

    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: Option<&Json>,
        add_generation_prompt: bool,
    ) -> Result<String, TokenizeError> {
        // Templates see the messages as sent, with content flattened to text.
        let msgs: Vec<Json> = messages
            .iter()
            .map(|m| {
                let mut raw = m.raw.clone();
                if let Json::Object(o) = &mut raw {
                    o.insert("content".into(), Json::String(m.content.clone()));
                }
                raw
            })
            .collect();
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| TokenizeError::Template(e.to_string()))?;
        tmpl.render(context! {
            messages => Value::from(Serde(&msgs)),
            tools => tools.map(|t| Value::from(Serde(t))),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(|e| TokenizeError::Template(e.to_string()))
    }
}

/// `tojson` as transformers defines it for chat templates: Python's
/// `json.dumps(x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)`,
/// which (unlike minijinja's built-in filter) does not HTML-escape and keeps the input key order.
pub(crate) fn py_tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([a, b]) => (a.clone(), b.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair of strings",
            ));
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let mut out = String::new();
    write_py_json(
        &json,
        indent,
        0,
        &item_sep,
        &key_sep,
        sort_keys.unwrap_or(false),
        &mut out,
    );
    Ok(Value::from_safe_string(out))
}

fn write_py_json(
    v: &Json,
    indent: Option<usize>,
    level: usize,
    item_sep: &str,
    key_sep: &str,
    sort_keys: bool,
    out: &mut String,
) {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    match v {
        Json::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                write_py_json(item, indent, level + 1, item_sep, key_sep, sort_keys, out);
            }
            newline(out, level);
            out.push(']');
        }
        Json::Object(map) if !map.is_empty() => {
            out.push('{');
            let mut entries: Vec<(&String, &Json)> = map.iter().collect();
            if sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push_str(key_sep);
                write_py_json(item, indent, level + 1, item_sep, key_sep, sort_keys, out);
            }
            newline(out, level);
            out.push('}');
        }
        // Scalars and empty containers print as serde_json does, which matches json.dumps
        // (non-ASCII kept, control characters escaped).
        other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
    }
}
