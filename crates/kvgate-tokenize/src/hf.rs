//! HF `tokenizer.json` tokenizers (pure Rust) and their `tokenizer_config.json` chat templates.

use crate::cache::SplitRule;
use crate::template::ChatTemplate;
use crate::{TokenizeError, Tokenizer, Vocabulary};
use serde_json::Value;
use std::path::{Path, PathBuf};

pub struct HfTokenizer {
    tok: tokenizers::Tokenizer,
    rules: Vec<SplitRule>,
    name: String,
}

impl HfTokenizer {
    pub fn from_file(path: &Path) -> Result<Self, TokenizeError> {
        let tok = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| TokenizeError::Load(format!("{}: {e}", path.display())))?;
        // Special added tokens are split out before normalisation and pre-tokenisation, so
        // encoding can be cut before them exactly, unless they strip neighbouring whitespace.
        let mut rules: Vec<SplitRule> = tok
            .get_added_tokens_decoder()
            .values()
            .filter(|t| {
                t.special && !t.lstrip && !t.rstrip && !t.single_word && !t.content.is_empty()
            })
            .map(|t| SplitRule {
                marker: t.content.clone(),
                after_newline_only: false,
            })
            .collect();
        rules.sort_by(|a, b| a.marker.cmp(&b.marker));
        Ok(Self {
            tok,
            rules,
            name: path.display().to_string(),
        })
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tok.token_to_id(token)
    }
}

impl Tokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        self.tok
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizeError::Encode(e.to_string()))
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.tok.decode(ids, false).unwrap_or_default()
    }

    fn segment_markers(&self) -> Vec<SplitRule> {
        self.rules.clone()
    }

    fn vocabulary(&self) -> Vocabulary {
        Vocabulary::from_ids(self.tok.get_vocab(true).into_values())
    }

    fn name(&self) -> String {
        self.name.clone()
    }
}

/// A token setting in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_setting(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

/// Loads `tokenizer.json` (a file, or a directory holding it) and the chat template of the
/// `tokenizer_config.json` beside it (ChatML when there is none).
pub fn load(path: &Path) -> Result<(HfTokenizer, ChatTemplate), TokenizeError> {
    let (file, dir): (PathBuf, PathBuf) = if path.is_dir() {
        (path.join("tokenizer.json"), path.to_path_buf())
    } else {
        (
            path.to_path_buf(),
            path.parent()
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
        )
    };
    let tok = HfTokenizer::from_file(&file)?;
    let config_path = dir.join("tokenizer_config.json");
    let template = match std::fs::read_to_string(&config_path) {
        Err(_) => ChatTemplate::chatml(),
        Ok(text) => {
            let cfg: Value = serde_json::from_str(&text)
                .map_err(|e| TokenizeError::Load(format!("{}: {e}", config_path.display())))?;
            let source = match cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: the one named "default".
                Some(Value::Array(list)) => list.iter().find_map(|t| {
                    (t.get("name").and_then(Value::as_str) == Some("default"))
                        .then(|| {
                            t.get("template")
                                .and_then(Value::as_str)
                                .map(str::to_string)
                        })
                        .flatten()
                }),
                _ => None,
            };
            match source {
                None => ChatTemplate::chatml(),
                Some(src) => ChatTemplate::new(
                    &src,
                    &token_setting(cfg.get("bos_token")),
                    &token_setting(cfg.get("eos_token")),
                )?,
            }
        }
    };
    Ok((tok, template))
}
