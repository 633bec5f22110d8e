//! One simulated engine (one dp rank): continuous batching over a [`BlockPool`].
//!
//! Each [`Engine::step`] is one forward pass: running requests decode one token each, prefills
//! advance in chunks within `max_num_batched_tokens`, and waiting requests are admitted FCFS while
//! `max_num_seqs` and free blocks allow (a request whose prompt blocks cannot be allocated waits,
//! and so does everything behind it). A decode that needs a block when none is free preempts the
//! most recently admitted request, which is recomputed later (its cached blocks usually survive).
//! The step's duration comes from the [`TimingModel`]; the caller decides what time means (real
//! time for the mocker, virtual time for the trace replay).

use crate::pool::{BlockPool, CacheEvent, SlotId};
use crate::timing::TimingModel;
use kvgate_core::hashing::{BlockHashes, HashSeed};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EngineConfig {
    pub block_size: usize,
    pub num_gpu_blocks: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub enable_prefix_caching: bool,
    pub timing: TimingModel,
}

impl Default for EngineConfig {
    /// Dynamo's mocker defaults.
    fn default() -> Self {
        Self {
            block_size: 64,
            num_gpu_blocks: 16_384,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            enable_prefix_caching: true,
            timing: TimingModel::default(),
        }
    }
}

/// A request handed to the engine.
#[derive(Clone, Debug)]
pub struct EngineRequest {
    /// Caller-chosen, unique among live requests.
    pub id: u64,
    pub prompt: Vec<u32>,
    pub max_output_tokens: u32,
    /// Seeds the generated token ids (deterministic per request).
    pub output_seed: u64,
    /// Cache namespace (LoRA / salt) of the prompt's blocks.
    pub hash_seed: HashSeed,
    /// The prompt's KV was computed elsewhere and transferred here (the decode side of
    /// disaggregated serving): at its first admission the prompt costs no compute, its blocks
    /// are allocated and enter the prefix cache as if computed, and decoding starts at once.
    pub kv_transferred: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Finish {
    pub prompt_tokens: usize,
    /// Prompt tokens served from the prefix cache at admission.
    pub cached_tokens: usize,
    pub completion_tokens: u32,
}

/// One generated token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenOutput {
    pub id: u64,
    pub token: u32,
    /// 0-based index among the request's generated tokens.
    pub index: u32,
    /// Set on the request's last token; its blocks are released.
    pub finished: Option<Finish>,
    /// Prompt tokens served from cache (known from the first token on).
    pub cached_tokens: usize,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Step {
    pub duration: Duration,
    pub outputs: Vec<TokenOutput>,
    pub events: Vec<CacheEvent>,
    pub new_prefill_tokens: usize,
    pub decoding: usize,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub active_blocks: usize,
    pub cached_blocks: usize,
    pub total_blocks: usize,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub finished: u64,
    pub preemptions: u64,
    /// Prefix-cache lookups and hits, in tokens.
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
}

#[derive(Debug)]
struct Seq {
    id: u64,
    tokens: Vec<u32>,
    prompt_len: usize,
    max_output: u32,
    output_seed: u64,
    hashes: BlockHashes,
    slots: Vec<SlotId>,
    /// Tokens whose KV is computed.
    computed: usize,
    /// Tokens to compute before decoding (the prompt; after a preemption, everything so far).
    prefill_target: usize,
    /// Leading blocks registered in the prefix cache.
    registered: usize,
    cached_tokens: usize,
    generated: u32,
    admitted_at: u64,
    /// Set at the first admission: a preempted request's later admissions must not rewrite its
    /// reported cache hit nor count its prompt again.
    admitted_once: bool,
    /// See [`EngineRequest::kv_transferred`]; only the first admission uses it (a preempted
    /// request recomputes).
    kv_transferred: bool,
}

#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    pool: BlockPool,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    admissions: u64,
    stats: EngineStats,
}

/// SplitMix64 finaliser: the token at `index` of a request's output.
fn output_token(seed: u64, index: u32) -> u32 {
    let mut z = seed ^ (u64::from(index).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    // Stay in the range of ordinary word tokens of common vocabularies.
    ((z ^ (z >> 31)) % 30_000) as u32 + 1_000
}

/// The prompt (or a decode step) is computed: the request produces its next token.
fn emit_token(seq: &mut Seq) -> TokenOutput {
    let token = output_token(seq.output_seed, seq.generated);
    let index = seq.generated;
    seq.generated += 1;
    seq.tokens.push(token);
    seq.hashes.extend(&[token]);
    seq.prefill_target = seq.prefill_target.max(seq.computed);
    let finished = (seq.generated >= seq.max_output).then_some(Finish {
        prompt_tokens: seq.prompt_len,
        cached_tokens: seq.cached_tokens,
        completion_tokens: seq.generated,
    });
    TokenOutput {
        id: seq.id,
        token,
        index,
        finished,
        cached_tokens: seq.cached_tokens,
    }
}

impl Engine {
    pub fn new(config: EngineConfig) -> Self {
        let pool = BlockPool::new(config.num_gpu_blocks, config.enable_prefix_caching);
        Self {
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            admissions: 0,
            stats: EngineStats::default(),
            config,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            active_blocks: self.pool.active(),
            cached_blocks: self.pool.num_cached(),
            total_blocks: self.pool.capacity(),
            ..self.stats
        }
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Fraction of KV blocks referenced by running requests.
    pub fn kv_usage(&self) -> f64 {
        self.pool.active() as f64 / self.pool.capacity().max(1) as f64
    }

    /// Queues a request. A prompt that can never fit in the cache is refused.
    pub fn submit(&mut self, req: EngineRequest) -> Result<(), SubmitError> {
        let bs = self.config.block_size.max(1);
        let need = (req.prompt.len() + req.max_output_tokens as usize).div_ceil(bs);
        if need > self.pool.capacity() {
            return Err(SubmitError::TooLong {
                blocks_needed: need,
                capacity: self.pool.capacity(),
            });
        }
        if req.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        let hashes = BlockHashes::from_tokens(&req.prompt, bs, req.hash_seed);
        let prompt_len = req.prompt.len();
        self.waiting.push_back(Seq {
            id: req.id,
            tokens: req.prompt,
            prompt_len,
            max_output: req.max_output_tokens.max(1),
            output_seed: req.output_seed,
            hashes,
            slots: Vec::new(),
            computed: 0,
            prefill_target: prompt_len,
            registered: 0,
            cached_tokens: 0,
            generated: 0,
            admitted_at: 0,
            admitted_once: false,
            kv_transferred: req.kv_transferred,
        });
        Ok(())
    }

    /// Drops a request wherever it is (client went away). Returns whether it was known.
    pub fn abort(&mut self, id: u64) -> bool {
        if let Some(pos) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(pos);
            return true;
        }
        if let Some(pos) = self.running.iter().position(|s| s.id == id) {
            let seq = self.running.remove(pos);
            self.release(&seq);
            return true;
        }
        false
    }

    /// Forgets every unreferenced cached block.
    pub fn reset_prefix_cache(&mut self) -> Vec<CacheEvent> {
        self.pool.reset_prefix_cache();
        self.pool.drain_events()
    }

    fn release(&mut self, seq: &Seq) {
        for &slot in &seq.slots {
            self.pool.release(slot);
        }
    }

    /// Makes sure `seq` has slots for `len` tokens; false when the pool is exhausted.
    fn grow(pool: &mut BlockPool, seq: &mut Seq, len: usize, bs: usize) -> bool {
        while seq.slots.len() < len.div_ceil(bs) {
            match pool.allocate() {
                Some(s) => seq.slots.push(s),
                None => return false,
            }
        }
        true
    }

    /// Registers every newly full, computed block of `seq` in the prefix cache.
    fn register_full(pool: &mut BlockPool, seq: &mut Seq, bs: usize) {
        let full = (seq.computed / bs).min(seq.hashes.seqs().len());
        while seq.registered < full {
            let i = seq.registered;
            let parent = i.checked_sub(1).map(|p| seq.hashes.seqs()[p]);
            pool.register(
                seq.slots[i],
                seq.hashes.seqs()[i],
                parent,
                seq.hashes.locals()[i],
                &seq.tokens[i * bs..(i + 1) * bs],
            );
            seq.registered += 1;
        }
    }

    /// Preempts the most recently admitted running request other than `keep`; returns the
    /// index it had in `running`.
    fn preempt_one(&mut self, keep: usize) -> Option<usize> {
        let victim = self
            .running
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != keep)
            .max_by_key(|(_, s)| s.admitted_at)
            .map(|(i, _)| i)?;
        self.preempt_at(victim);
        Some(victim)
    }

    /// Sends `running[v]` back to the head of the queue, to be recomputed.
    fn preempt_at(&mut self, v: usize) {
        let mut seq = self.running.remove(v);
        self.release(&seq);
        seq.slots.clear();
        seq.computed = 0;
        seq.registered = 0;
        seq.prefill_target = seq.tokens.len();
        self.stats.preemptions += 1;
        self.waiting.push_front(seq);
    }

    /// Runs one forward pass. Returns `None` when there is nothing to do.
    pub fn step(&mut self) -> Option<Step> {
        if self.is_idle() {
            return None;
        }
        let bs = self.config.block_size.max(1);
        let mut budget = self.config.max_num_batched_tokens.max(1);
        let mut new_prefill = 0usize;
        let mut decoding = 0usize;
        let mut outputs = Vec::new();

        // 1. Running requests: decode one token, or continue a chunked prefill.
        let mut i = 0;
        while i < self.running.len() {
            let decode = self.running[i].computed >= self.running[i].prefill_target;
            let want = if decode {
                self.running[i].tokens.len() + 1
            } else {
                let chunk = (self.running[i].prefill_target - self.running[i].computed).min(budget);
                if chunk == 0 {
                    i += 1;
                    continue;
                }
                self.running[i].computed + chunk
            };
            // Find room, preempting newer requests if we must.
            let mut ok = Self::grow(&mut self.pool, &mut self.running[i], want, bs);
            while !ok {
                let Some(v) = self.preempt_one(i) else { break };
                if v < i {
                    i -= 1;
                }
                ok = Self::grow(&mut self.pool, &mut self.running[i], want, bs);
            }
            if !ok {
                // Nothing left to preempt (cannot happen: `submit` refuses requests larger than
                // the cache). Recompute this one later rather than spin.
                self.preempt_at(i);
                continue;
            }
            let seq = &mut self.running[i];
            if decode {
                budget = budget.saturating_sub(1);
                decoding += 1;
                seq.computed = seq.tokens.len();
            } else {
                let chunk = want - seq.computed;
                budget -= chunk;
                new_prefill += chunk;
                seq.computed = want;
            }
            Self::register_full(&mut self.pool, seq, bs);
            if seq.computed >= seq.prefill_target {
                // Prefill done (or a decode step): one new token.
                let out = emit_token(seq);
                self.stats.generation_tokens += 1;
                outputs.push(out);
                if out.finished.is_some() {
                    let seq = self.running.remove(i);
                    self.release(&seq);
                    self.stats.finished += 1;
                    continue;
                }
            }
            i += 1;
        }

        // 2. Admit waiting requests while seats, budget and blocks allow.
        while budget > 0 && self.running.len() < self.config.max_num_seqs.max(1) {
            let Some(seq) = self.waiting.front() else {
                break;
            };
            // The last prompt token is always recomputed (it produces the first output).
            let max_hit_blocks = (seq.prefill_target.saturating_sub(1)) / bs;
            let hits = self
                .pool
                .prefix_hits(&seq.hashes.seqs()[..max_hit_blocks.min(seq.hashes.seqs().len())]);
            let need = seq.prefill_target.div_ceil(bs) - hits;
            let idle_hits = self.pool.idle_hits(seq.hashes.seqs(), hits);
            if need + idle_hits > self.pool.available() {
                break;
            }
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            let first_time = !seq.admitted_once;
            seq.admitted_once = true;
            for h in 0..hits {
                if let Some(slot) = self.pool.acquire(seq.hashes.seqs()[h]) {
                    seq.slots.push(slot);
                }
            }
            seq.computed = hits * bs;
            seq.registered = hits;
            if first_time {
                seq.cached_tokens = hits * bs;
                self.stats.prompt_tokens += seq.prompt_len as u64;
                self.stats.prefix_query_tokens += seq.prompt_len as u64;
                self.stats.prefix_hit_tokens += (hits * bs) as u64;
            }
            self.admissions += 1;
            seq.admitted_at = self.admissions;
            let target = seq.prefill_target;
            if !Self::grow(&mut self.pool, &mut seq, target, bs) {
                // Cannot happen after the availability check; undo and wait.
                self.release(&seq);
                seq.slots.clear();
                self.waiting.push_front(seq);
                break;
            }
            if first_time && seq.kv_transferred {
                // The KV arrived with the request: no prefill compute, no budget.
                seq.computed = seq.prefill_target;
            } else {
                let chunk = (seq.prefill_target - seq.computed).min(budget);
                budget -= chunk;
                new_prefill += chunk;
                seq.computed += chunk;
            }
            Self::register_full(&mut self.pool, &mut seq, bs);
            if seq.computed >= seq.prefill_target {
                let out = emit_token(&mut seq);
                self.stats.generation_tokens += 1;
                outputs.push(out);
                if out.finished.is_some() {
                    self.release(&seq);
                    self.stats.finished += 1;
                    continue;
                }
            }
            self.running.push(seq);
        }

        let duration = self
            .config
            .timing
            .step(new_prefill, decoding, self.kv_usage());
        Some(Step {
            duration,
            outputs,
            events: self.pool.drain_events(),
            new_prefill_tokens: new_prefill,
            decoding,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitError {
    EmptyPrompt,
    TooLong {
        blocks_needed: usize,
        capacity: usize,
    },
    /// The engine's driver has stopped (real-time drivers only).
    EngineGone,
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::EmptyPrompt => f.write_str("the prompt is empty"),
            SubmitError::EngineGone => f.write_str("the engine is not running"),
            SubmitError::TooLong {
                blocks_needed,
                capacity,
            } => write!(
                f,
                "prompt plus max_tokens needs {blocks_needed} KV blocks but the engine has {capacity}"
            ),
        }
    }
}

impl std::error::Error for SubmitError {}
