//! Exact multi-turn tokenization cache.
//!
//! A rendered chat prompt is split before every segment marker (e.g. `<|im_start|>`), each
//! segment is encoded on its own and cached by its text, and the results are concatenated. A
//! conversation's next turn re-renders its earlier turns identically, so they come from the
//! cache and only the new turns are encoded. Splitting is exact because markers start a new
//! pre-tokenisation piece whatever precedes them (checked by property tests against full
//! encoding with each tokenizer).

use crate::{TokenizeError, Tokenizer};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use xxhash_rust::xxh3::xxh3_128;

/// A cut point: before `marker`, and (with `after_newline_only`) only where a newline precedes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitRule {
    pub marker: String,
    pub after_newline_only: bool,
}

struct Entry {
    /// The segment itself: a hit must be the same text, not merely the same hash (the hash is
    /// not collision-resistant, and a collision would hand one request another's tokens).
    text: std::sync::Arc<str>,
    ids: std::sync::Arc<[u32]>,
    last_used: u64,
}

struct Inner {
    map: HashMap<u128, Entry>,
    tokens: usize,
    tick: u64,
}

pub struct SegmentCache {
    markers: Vec<SplitRule>,
    max_tokens: usize,
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Segments shorter than this are encoded directly (caching them costs more than it saves).
const MIN_CACHED_SEGMENT: usize = 64;

impl SegmentCache {
    pub fn new(markers: Vec<SplitRule>, max_tokens: usize) -> Self {
        Self {
            markers: markers
                .into_iter()
                .filter(|m| !m.marker.is_empty())
                .collect(),
            max_tokens,
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                tokens: 0,
                tick: 0,
            }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Segment lookups served from the cache / encoded.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Splits `text` before every marker occurrence.
    pub fn segments<'a>(&self, text: &'a str) -> Vec<&'a str> {
        if self.markers.is_empty() {
            return vec![text];
        }
        let mut cuts: Vec<usize> = Vec::new();
        for rule in &self.markers {
            cuts.extend(
                text.match_indices(rule.marker.as_str())
                    .map(|(i, _)| i)
                    .filter(|&i| i > 0 && (!rule.after_newline_only || text[..i].ends_with('\n'))),
            );
        }
        cuts.sort_unstable();
        cuts.dedup();
        let mut out = Vec::with_capacity(cuts.len() + 1);
        let mut start = 0;
        for c in cuts {
            out.push(&text[start..c]);
            start = c;
        }
        out.push(&text[start..]);
        out
    }

    /// Encodes `text` as `tokenizer.encode(text)` would, reusing cached segments.
    pub fn encode(&self, tokenizer: &dyn Tokenizer, text: &str) -> Result<Vec<u32>, TokenizeError> {
        let segments = self.segments(text);
        if segments.len() == 1 || self.max_tokens == 0 {
            return tokenizer.encode(text);
        }
        let mut out = Vec::new();
        for seg in segments {
            if seg.len() < MIN_CACHED_SEGMENT {
                out.extend(tokenizer.encode(seg)?);
                continue;
            }
            let key = xxh3_128(seg.as_bytes());
            if let Some(ids) = self.get(key, seg) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                out.extend_from_slice(&ids);
                continue;
            }
            self.misses.fetch_add(1, Ordering::Relaxed);
            // Encode outside the lock: other requests keep going meanwhile.
            let ids: std::sync::Arc<[u32]> = tokenizer.encode(seg)?.into();
            out.extend_from_slice(&ids);
            self.put(key, seg, ids);
        }
        Ok(out)
    }

    fn get(&self, key: u128, text: &str) -> Option<std::sync::Arc<[u32]>> {
        let mut inner = self.inner.lock().ok()?;
        inner.tick += 1;
        let tick = inner.tick;
        let e = inner.map.get_mut(&key)?;
        if &*e.text != text {
            return None;
        }
        e.last_used = tick;
        Some(e.ids.clone())
    }

    /// What an entry costs against the bound, in token-sized units (ids + text + overhead).
    fn cost(text: &str, ids: &[u32]) -> usize {
        ids.len() + text.len() / 4 + 16
    }

    fn put(&self, key: u128, text: &str, ids: std::sync::Arc<[u32]>) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let cost = Self::cost(text, &ids);
        if cost > self.max_tokens {
            return;
        }
        inner.tick += 1;
        let tick = inner.tick;
        inner.tokens += cost;
        let entry = Entry {
            text: text.into(),
            ids,
            last_used: tick,
        };
        if let Some(old) = inner.map.insert(key, entry) {
            inner.tokens -= Self::cost(&old.text, &old.ids);
        }
        if inner.tokens > self.max_tokens {
            // Evict the least recently used half (amortised O(1) per insertion).
            let mut ticks: Vec<u64> = inner.map.values().map(|e| e.last_used).collect();
            let mid = ticks.len() / 2;
            ticks.select_nth_unstable(mid);
            let cutoff = ticks[mid];
            let mut freed = 0;
            inner.map.retain(|_, e| {
                let keep = e.last_used > cutoff;
                if !keep {
                    freed += Self::cost(&e.text, &e.ids);
                }
                keep
            });
            inner.tokens -= freed;
        }
    }
}
