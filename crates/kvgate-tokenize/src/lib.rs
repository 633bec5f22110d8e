//! Tokenization shared by the frontend, the EPP and the mocker, so that all three produce the same
//! token ids (and hence the same block hashes) for the same request:
//! - [`Tokenizer`]: text <-> ids; the embedded default is tiktoken `o200k_base` (nothing to
//!   download); HF `tokenizer.json` files are supported by [`hf`];
//! - [`template`]: chat templates rendered with minijinja (HF `tokenizer_config.json`, or the
//!   embedded ChatML template);
//! - [`cache`]: an exact tokenization cache, so that a multi-turn conversation does not
//!   re-tokenize its earlier turns;
//! - [`PromptTokenizer`]: all of it behind one call per OpenAI request.

pub mod cache;
pub mod hf;
pub mod template;

use cache::SegmentCache;
use kvgate_wire::openai::{Endpoint, OpenAiRequest, Prompt};
use std::sync::Arc;
use template::ChatTemplate;

/// Text to token ids and back.
pub trait Tokenizer: Send + Sync {
    /// Encodes text, recognising special tokens written in it (chat templates rely on this).
    fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError>;
    /// Decodes ids to text (lossy for ids that are not valid on their own).
    fn decode(&self, ids: &[u32]) -> String;
    /// Where encoding can be split without changing the result (used by the multi-turn cache).
    fn segment_markers(&self) -> Vec<cache::SplitRule>;
    fn name(&self) -> String;
}

/// tiktoken `o200k_base`, embedded in the binary (one shared instance per process).
pub struct Tiktoken {
    bpe: &'static tiktoken_rs::CoreBPE,
}

impl Tiktoken {
    pub fn o200k_base() -> Result<Self, TokenizeError> {
        Ok(Self {
            bpe: tiktoken_rs::o200k_base_singleton(),
        })
    }
}

impl Tokenizer for Tiktoken {
    fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        Ok(self.bpe.encode_with_special_tokens(text))
    }

    fn decode(&self, ids: &[u32]) -> String {
        match self.bpe.decode(ids) {
            Ok(s) => s,
            Err(_) => String::from_utf8_lossy(&self.bpe.decode_bytes(ids).unwrap_or_default())
                .into_owned(),
        }
    }

    fn segment_markers(&self) -> Vec<cache::SplitRule> {
        // The embedded ChatML template ends every turn with `<|im_end|>\n` and starts the next
        // with `<|im_start|>`. o200k's pre-tokeniser never joins a newline with a following `<`,
        // but it does join a space with it, so only newline-preceded markers are cut points
        // (property-tested in tests/tokenize.rs).
        vec![cache::SplitRule {
            marker: template::CHATML_TURN_START.to_string(),
            after_newline_only: true,
        }]
    }

    fn name(&self) -> String {
        "tiktoken/o200k_base".into()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("cannot load tokenizer: {0}")]
    Load(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("tokenization failed: {0}")]
    Encode(String),
}

/// Request -> token ids: chat template, tokenizer and multi-turn cache together.
pub struct PromptTokenizer {
    tokenizer: Arc<dyn Tokenizer>,
    template: ChatTemplate,
    cache: SegmentCache,
}

impl PromptTokenizer {
    pub fn new(tokenizer: Arc<dyn Tokenizer>, template: ChatTemplate, cache_tokens: usize) -> Self {
        let markers = tokenizer.segment_markers();
        Self {
            tokenizer,
            template,
            cache: SegmentCache::new(markers, cache_tokens),
        }
    }

    /// A HF tokenizer (`tokenizer.json`, or a directory holding it and `tokenizer_config.json`),
    /// or the embedded default when `path` is `None`.
    pub fn load(path: Option<&std::path::Path>) -> Result<Self, TokenizeError> {
        match path {
            None => Self::embedded(),
            Some(p) => {
                let (tok, template) = hf::load(p)?;
                Ok(Self::new(Arc::new(tok), template, DEFAULT_CACHE_TOKENS))
            }
        }
    }

    /// The embedded default: tiktoken `o200k_base` with a ChatML template. Nothing to download.
    pub fn embedded() -> Result<Self, TokenizeError> {
        Ok(Self::new(
            Arc::new(Tiktoken::o200k_base()?),
            ChatTemplate::chatml(),
            DEFAULT_CACHE_TOKENS,
        ))
    }

    pub fn tokenizer(&self) -> &Arc<dyn Tokenizer> {
        &self.tokenizer
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    pub fn cache(&self) -> &SegmentCache {
        &self.cache
    }

    /// The prompt text a chat request renders to (for debugging and tests).
    pub fn render(&self, req: &OpenAiRequest) -> Result<String, TokenizeError> {
        self.template
            .render(&req.messages, req.tools.as_ref(), true)
    }

    /// Token ids of a request's prompt. `nvext.token_data` is not consulted here: callers decide
    /// whether to trust ids computed upstream.
    pub fn tokenize(&self, req: &OpenAiRequest) -> Result<Vec<u32>, TokenizeError> {
        match req.endpoint {
            Endpoint::Chat => {
                let text = self.render(req)?;
                self.cache.encode(self.tokenizer.as_ref(), &text)
            }
            Endpoint::Completion => match &req.prompt {
                Some(Prompt::Tokens(ids)) => Ok(ids.clone()),
                Some(Prompt::Text(text)) => self.cache.encode(self.tokenizer.as_ref(), text),
                None => Ok(Vec::new()),
            },
        }
    }
}

/// Default bound of the multi-turn cache, in cached tokens.
pub const DEFAULT_CACHE_TOKENS: usize = 8 << 20;
