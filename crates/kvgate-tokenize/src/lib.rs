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
    /// Every id this tokenizer can produce or decode (regular and special tokens). Built once
    /// per [`PromptTokenizer`]; token ids that clients send are checked against it.
    fn vocabulary(&self) -> Vocabulary;
}

/// A set of token ids as a bitmap: checking a 50k-token prompt costs tens of microseconds.
#[derive(Clone, Debug)]
pub struct Vocabulary {
    words: Vec<u64>,
    len: usize,
}

impl Vocabulary {
    pub fn from_ids(ids: impl IntoIterator<Item = u32>) -> Self {
        let mut words: Vec<u64> = Vec::new();
        for id in ids {
            let w = (id / 64) as usize;
            if words.len() <= w {
                words.resize(w + 1, 0);
            }
            words[w] |= 1 << (id % 64);
        }
        let len = words.iter().map(|w| w.count_ones() as usize).sum();
        Self { words, len }
    }

    pub fn contains(&self, id: u32) -> bool {
        self.words
            .get((id / 64) as usize)
            .is_some_and(|w| w & (1 << (id % 64)) != 0)
    }

    /// How many ids the vocabulary holds.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first id (and its position) that is not in the vocabulary.
    pub fn first_unknown(&self, ids: &[u32]) -> Option<(usize, u32)> {
        ids.iter()
            .enumerate()
            .find(|(_, id)| !self.contains(**id))
            .map(|(i, id)| (i, *id))
    }
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

/// Texts at least this long are encoded on several threads. Measured with `cargo bench -p
/// kvgate-runtime --bench prepare` on 2 SMT threads: a 55 KB prompt was slower split than whole
/// (the hand-off costs more than half the work saves), a 344 KB one 10% faster.
const PARALLEL_MIN_BYTES: usize = 128 * 1024;
const MAX_ENCODE_THREADS: usize = 4;

/// A cut point near `target` where o200k's pre-tokeniser splits whatever the context: an ASCII
/// letter, one space, an ASCII letter, cut before the space. No piece of the pattern can span a
/// letter followed by a space (letter runs stop at the space; punctuation and whitespace runs
/// cannot start on a letter), the piece after it (` word`) starts at the space, and the pattern
/// has no look-behind, so encoding the two sides apart gives the same ids. Special tokens
/// contain no space. Looks forward up to `window` bytes.
pub fn o200k_cut_near(text: &str, target: usize, window: usize) -> Option<usize> {
    let b = text.as_bytes();
    let end = (target + window).min(b.len().saturating_sub(1));
    (target.max(1)..end)
        .find(|&p| b[p] == b' ' && b[p - 1].is_ascii_alphabetic() && b[p + 1].is_ascii_alphabetic())
}

type EncodeJob = Box<dyn FnOnce() + Send>;

/// Long-lived encoder threads. Scoped threads would be created per call, and each new thread
/// meets cold regex caches (tiktoken keeps a regex per thread slot): slower than one core.
struct EncodePool {
    workers: Vec<std::sync::Mutex<std::sync::mpsc::Sender<EncodeJob>>>,
}

fn encode_pool() -> &'static EncodePool {
    static POOL: std::sync::OnceLock<EncodePool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let n = cores.clamp(1, MAX_ENCODE_THREADS) - 1;
        let workers = (0..n)
            .filter_map(|i| {
                let (tx, rx) = std::sync::mpsc::channel::<EncodeJob>();
                std::thread::Builder::new()
                    .name(format!("kvgate-encode-{i}"))
                    .spawn(move || {
                        while let Ok(job) = rx.recv() {
                            job();
                        }
                    })
                    .ok()
                    .map(|_| std::sync::Mutex::new(tx))
            })
            .collect();
        EncodePool { workers }
    })
}

impl Tiktoken {
    /// Encodes in up to `parts` pieces cut by [`o200k_cut_near`], the first on this thread and
    /// the others on the encoder threads; identical to one-piece encoding (property-tested).
    /// Falls back to one piece when no cut is found or no encoder thread is available.
    pub fn encode_parallel(&self, text: &str, parts: usize) -> Vec<u32> {
        let pool = encode_pool();
        let parts = parts.min(pool.workers.len() + 1);
        let mut cuts = vec![0];
        for i in 1..parts {
            let target = text.len() * i / parts;
            let last = *cuts.last().unwrap_or(&0);
            if let Some(c) = o200k_cut_near(text, target.max(last + 1), 4096)
                && c > last
            {
                cuts.push(c);
            }
        }
        cuts.push(text.len());
        if cuts.len() <= 2 {
            return self.bpe.encode_with_special_tokens(text);
        }
        let bpe = self.bpe;
        let (tx, rx) = std::sync::mpsc::channel::<(usize, Vec<u32>)>();
        let mut local: Vec<(usize, String)> = Vec::new();
        for (i, w) in cuts.windows(2).enumerate().skip(1) {
            let piece = text[w[0]..w[1]].to_string();
            let tx = tx.clone();
            let sent = pool.workers[(i - 1) % pool.workers.len()]
                .lock()
                .ok()
                .and_then(|worker| {
                    worker
                        .send(Box::new(move || {
                            let _ = tx.send((i, bpe.encode_with_special_tokens(&piece)));
                        }))
                        .map_err(|e| e.0)
                        .err()
                });
            // A worker that is gone leaves its piece to this thread.
            if let Some(_job) = sent {
                local.push((i, text[w[0]..w[1]].to_string()));
            }
        }
        drop(tx);
        let mut results: Vec<Option<Vec<u32>>> = vec![None; cuts.len() - 1];
        results[0] = Some(bpe.encode_with_special_tokens(&text[..cuts[1]]));
        for (i, piece) in local {
            results[i] = Some(bpe.encode_with_special_tokens(&piece));
        }
        for (i, ids) in rx.iter() {
            results[i] = Some(ids);
        }
        let mut out = Vec::new();
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Some(ids) => out.extend(ids),
                // A worker panicked on its piece: encode it here.
                None => out.extend(bpe.encode_with_special_tokens(&text[cuts[i]..cuts[i + 1]])),
            }
        }
        out
    }
}

fn encode_threads(len: usize) -> usize {
    if len < PARALLEL_MIN_BYTES {
        return 1;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores
        .min(MAX_ENCODE_THREADS)
        .min(len / (PARALLEL_MIN_BYTES / 2))
}

impl Tokenizer for Tiktoken {
    fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        let threads = encode_threads(text.len());
        if threads > 1 {
            return Ok(self.encode_parallel(text, threads));
        }
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

    fn vocabulary(&self) -> Vocabulary {
        // o200k_base's ids end at 200,018 (`<|endofprompt|>`), with gaps among the specials:
        // probe a margin past the end and keep what decodes.
        Vocabulary::from_ids(
            (0..TIKTOKEN_PROBE_IDS).filter(|&id| self.bpe.decode_bytes(&[id]).is_ok()),
        )
    }
}

/// How far [`Tiktoken::vocabulary`] probes (o200k_base ends at 200,018).
const TIKTOKEN_PROBE_IDS: u32 = 1 << 18;

#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("cannot load tokenizer: {0}")]
    Load(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("tokenization failed: {0}")]
    Encode(String),
    /// A client-sent token id that the tokenizer does not know.
    #[error(
        "`{field}[{index}]`: token id {id} is not in the vocabulary of {tokenizer} ({vocab} ids)"
    )]
    UnknownTokenId {
        field: String,
        index: usize,
        id: u32,
        tokenizer: String,
        vocab: usize,
    },
}

impl TokenizeError {
    /// The request field at fault, when the client's input is (for the `param` of an error).
    pub fn field(&self) -> Option<String> {
        match self {
            Self::UnknownTokenId { field, index, .. } => Some(format!("{field}[{index}]")),
            _ => None,
        }
    }
}

/// Request -> token ids: chat template, tokenizer and multi-turn cache together.
pub struct PromptTokenizer {
    tokenizer: Arc<dyn Tokenizer>,
    template: ChatTemplate,
    cache: SegmentCache,
    vocabulary: std::sync::OnceLock<Vocabulary>,
}

impl PromptTokenizer {
    pub fn new(tokenizer: Arc<dyn Tokenizer>, template: ChatTemplate, cache_tokens: usize) -> Self {
        let markers = tokenizer.segment_markers();
        Self {
            tokenizer,
            template,
            cache: SegmentCache::new(markers, cache_tokens),
            vocabulary: std::sync::OnceLock::new(),
        }
    }

    /// The tokenizer's vocabulary, built on first use.
    pub fn vocabulary(&self) -> &Vocabulary {
        self.vocabulary.get_or_init(|| self.tokenizer.vocabulary())
    }

    /// Checks client-sent ids (`field` names them in the error) against the vocabulary.
    pub fn check_ids(&self, ids: &[u32], field: &str) -> Result<(), TokenizeError> {
        let vocab = self.vocabulary();
        match vocab.first_unknown(ids) {
            None => Ok(()),
            Some((index, id)) => Err(TokenizeError::UnknownTokenId {
                field: field.to_string(),
                index,
                id,
                tokenizer: self.tokenizer.name(),
                vocab: vocab.len(),
            }),
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
    /// whether to route on ids computed upstream. A completions prompt given as ids is checked
    /// against the vocabulary.
    pub fn tokenize(&self, req: &OpenAiRequest) -> Result<Vec<u32>, TokenizeError> {
        match req.endpoint {
            Endpoint::Chat => {
                let text = self.render(req)?;
                self.cache.encode(self.tokenizer.as_ref(), &text)
            }
            Endpoint::Completion => match &req.prompt {
                Some(Prompt::Tokens(ids)) => {
                    self.check_ids(ids, "prompt")?;
                    Ok(ids.clone())
                }
                Some(Prompt::Text(text)) => self.cache.encode(self.tokenizer.as_ref(), text),
                None => Ok(Vec::new()),
            },
        }
    }
}

/// Default bound of the multi-turn cache, in cached tokens.
pub const DEFAULT_CACHE_TOKENS: usize = 8 << 20;
