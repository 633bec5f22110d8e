//! Synthetic Mooncake-format traces of other shapes than the bundled conversation trace, so
//! that routing is not tuned to one workload. Seeded and deterministic: the same shape, seed
//! and size give the same bytes.
//!
//! A prompt is modelled as a list of 512-token blocks (Mooncake's hash-id granularity). A block
//! id is shared exactly when everything up to the end of that block is the same content: a
//! session's context grows by appending, so its complete blocks keep their ids turn after turn,
//! and a partial last block gets a fresh id whenever its content changes. Shared system
//! prompts and documents are fixed block lists that many sessions start with.
//!
//! Shapes ([`Shape`]):
//! - `agent`: tool-calling agent loops. A few long system prompts (tools and instructions,
//!   6k-16k tokens) shared by every session that uses them (Zipf popularity); each session runs
//!   3-30 steps, each appending a tool result (200-4k tokens) and asking for a short tool call
//!   (20-300 output tokens), 0.5-6 s apart.
//! - `chat`: many short chats. One short shared system prompt (about 400 tokens), 1-8 turns of
//!   40-600-token user messages and 50-800-token answers, 5-60 s of reading and typing between
//!   turns.
//! - `docs`: questions over a few huge documents. 200 documents of 8k-110k tokens (Zipf
//!   popularity), each question 30-300 tokens with 50-500 output tokens; 1-4 follow-up questions
//!   per session, plus one in five requests a short unrelated chat.

use crate::trace::{MOONCAKE_BLOCK_TOKENS, TraceRow};
use kvgate_core::random::{RandomSource, SplitMix64};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Agent,
    Chat,
    Docs,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Agent, Shape::Chat, Shape::Docs];

    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "agent" => Ok(Shape::Agent),
            "chat" => Ok(Shape::Chat),
            "docs" => Ok(Shape::Docs),
            other => Err(format!(
                "unknown trace shape {other:?} (known: agent, chat, docs)"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Shape::Agent => "agent",
            Shape::Chat => "chat",
            Shape::Docs => "docs",
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenConfig {
    pub shape: Shape,
    pub seed: u64,
    /// Requests to emit (the trace is cut there, mid-session if need be).
    pub requests: usize,
    /// New sessions per second (the sweep scales the whole trace's rate anyway).
    pub sessions_per_s: f64,
}

impl GenConfig {
    /// The shape's defaults: a session rate at which 16 default engines (16,384 blocks, 8,192
    /// batched tokens) reach their knee a few times faster than the trace's own rate, like the
    /// bundled trace, and enough requests that the replay at the knee lasts minutes.
    pub fn new(shape: Shape, seed: u64) -> Self {
        let (sessions_per_s, requests) = match shape {
            Shape::Agent => (1.0, 20_000),
            Shape::Chat => (12.0, 40_000),
            Shape::Docs => (2.4, 12_000),
        };
        Self {
            shape,
            seed,
            requests,
            sessions_per_s,
        }
    }
}

/// Documents of the `docs` shape: their blocks (about 7M tokens) are more than 16 default
/// engines can cache (4.2M tokens), so where each document is kept matters.
const DOCUMENTS: usize = 200;

/// Hands out fresh block ids.
struct Ids(u64);

impl Ids {
    fn fresh(&mut self) -> u64 {
        self.0 += 1;
        self.0
    }
}

/// A growing prompt: complete blocks (ids stable) and the tokens of a partial last block.
#[derive(Clone, Debug, Default)]
struct Context {
    full: Vec<u64>,
    tail: usize,
}

impl Context {
    fn from_shared(blocks: &[u64]) -> Self {
        Self {
            full: blocks.to_vec(),
            tail: 0,
        }
    }

    fn tokens(&self) -> usize {
        self.full.len() * MOONCAKE_BLOCK_TOKENS + self.tail
    }

    /// Appends `n` tokens of new content.
    fn append(&mut self, n: usize, ids: &mut Ids) {
        self.tail += n;
        while self.tail >= MOONCAKE_BLOCK_TOKENS {
            self.full.push(ids.fresh());
            self.tail -= MOONCAKE_BLOCK_TOKENS;
        }
    }

    /// The hash ids of the prompt as it is now: the partial block (its content is new every
    /// time it changes) gets a fresh id.
    fn hash_ids(&self, ids: &mut Ids) -> Vec<u64> {
        let mut v = self.full.clone();
        if self.tail > 0 {
            v.push(ids.fresh());
        }
        v
    }
}

struct Rng(SplitMix64);

impl Rng {
    fn f(&mut self) -> f64 {
        self.0.next_f64()
    }
    /// Uniform integer in `[lo, hi]`.
    fn int(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.0.below(hi - lo + 1)
    }
    /// Log-uniform integer in `[lo, hi]` (lengths spread over orders of magnitude).
    fn log_int(&mut self, lo: usize, hi: usize) -> usize {
        let (a, b) = ((lo as f64).ln(), (hi as f64).ln());
        ((a + (b - a) * self.f()).exp().round() as usize).clamp(lo, hi)
    }
    fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.f()).ln()
    }
    /// Zipf(1) over `0..n`.
    fn zipf(&mut self, n: usize) -> usize {
        let h: f64 = (1..=n).map(|k| 1.0 / k as f64).sum();
        let mut u = self.f() * h;
        for k in 1..=n {
            u -= 1.0 / k as f64;
            if u <= 0.0 {
                return k - 1;
            }
        }
        n - 1
    }
}

/// One request of a session, before the whole trace is sorted.
struct Pending {
    at_s: f64,
    session: usize,
    row: TraceRow,
}

/// Emits the trace, sorted by timestamp.
pub fn generate(cfg: &GenConfig) -> Vec<TraceRow> {
    let mut rng = Rng(SplitMix64::new(cfg.seed ^ 0x6b76_6761_7465));
    let mut ids = Ids(0);
    let shared: Vec<Vec<u64>> = match cfg.shape {
        Shape::Agent => (0..6)
            .map(|_| {
                let n = rng.int(6_000, 16_000) / MOONCAKE_BLOCK_TOKENS;
                (0..n).map(|_| ids.fresh()).collect()
            })
            .collect(),
        Shape::Chat => vec![(0..1).map(|_| ids.fresh()).collect()],
        Shape::Docs => (0..DOCUMENTS)
            .map(|_| {
                let n = rng.log_int(8_000, 110_000) / MOONCAKE_BLOCK_TOKENS;
                (0..n).map(|_| ids.fresh()).collect()
            })
            .collect(),
    };
    let mut out: Vec<Pending> = Vec::new();
    let mut t = 0.0f64;
    let mut session = 0usize;
    // Sessions overlap in time, so generate until enough requests exist, then keep the first
    // `requests` by arrival.
    let target = cfg.requests.max(1);
    while out.len() < target + target / 4 {
        t += rng.exp(1.0 / cfg.sessions_per_s.max(1e-9));
        session += 1;
        let mut at = t;
        let mut push = |at: f64, ctx: &Context, out_len: usize, ids: &mut Ids| {
            out.push(Pending {
                at_s: at,
                session,
                row: TraceRow {
                    timestamp: 0.0,
                    input_length: ctx.tokens().max(1) as u64,
                    output_length: out_len.max(1) as u64,
                    hash_ids: ctx.hash_ids(ids),
                },
            });
        };
        match cfg.shape {
            Shape::Agent => {
                let mut ctx = Context::from_shared(&shared[rng.zipf(shared.len())]);
                ctx.append(rng.int(100, 600), &mut ids); // the task
                let steps = rng.int(3, 30);
                for _ in 0..steps {
                    let out_len = rng.log_int(20, 300);
                    push(at, &ctx, out_len, &mut ids);
                    ctx.append(out_len, &mut ids);
                    ctx.append(rng.log_int(200, 4_000), &mut ids); // the tool's result
                    // Generation (~30 ms per token) plus the tool's run time.
                    at += out_len as f64 * 0.03 + 0.5 + rng.exp(1.5).min(6.0);
                }
            }
            Shape::Chat => {
                let mut ctx = Context::from_shared(&shared[0]);
                ctx.append(rng.int(0, 200), &mut ids);
                let turns = rng.int(1, 8);
                for _ in 0..turns {
                    ctx.append(rng.log_int(40, 600), &mut ids);
                    let out_len = rng.log_int(50, 800);
                    push(at, &ctx, out_len, &mut ids);
                    ctx.append(out_len, &mut ids);
                    at += out_len as f64 * 0.03 + 5.0 + rng.exp(15.0).min(55.0);
                }
            }
            Shape::Docs => {
                if rng.f() < 0.2 {
                    let mut ctx = Context::default();
                    ctx.append(rng.log_int(100, 2_000), &mut ids);
                    push(at, &ctx, rng.log_int(50, 500), &mut ids);
                } else {
                    let ctx = Context::from_shared(&shared[rng.zipf(shared.len())]);
                    let questions = rng.int(1, 5);
                    for _ in 0..questions {
                        // Each question is asked of the document alone (a fresh tail).
                        let mut q = ctx.clone();
                        q.append(rng.log_int(30, 300), &mut ids);
                        let out_len = rng.log_int(50, 500);
                        push(at, &q, out_len, &mut ids);
                        at += out_len as f64 * 0.03 + 3.0 + rng.exp(10.0).min(40.0);
                    }
                }
            }
        }
    }
    out.sort_by(|a, b| a.at_s.total_cmp(&b.at_s).then(a.session.cmp(&b.session)));
    out.truncate(target);
    out.into_iter()
        .map(|p| TraceRow {
            timestamp: (p.at_s * 1000.0).round(),
            ..p.row
        })
        .collect()
}

/// One JSON line per request, as Mooncake's traces are written.
pub fn to_jsonl(rows: &[TraceRow]) -> String {
    let mut s = String::new();
    for r in rows {
        s.push_str(&format!(
            "{{\"timestamp\": {}, \"input_length\": {}, \"output_length\": {}, \"hash_ids\": [{}]}}\n",
            r.timestamp as u64,
            r.input_length,
            r.output_length,
            r.hash_ids
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace;

    fn small(shape: Shape, seed: u64) -> Vec<TraceRow> {
        generate(&GenConfig {
            requests: 2_000,
            ..GenConfig::new(shape, seed)
        })
    }

    #[test]
    fn deterministic_per_seed_and_different_across_seeds() {
        for shape in Shape::ALL {
            assert_eq!(small(shape, 7), small(shape, 7), "{shape}");
            assert_ne!(small(shape, 7), small(shape, 8), "{shape}");
        }
    }

    #[test]
    fn rows_are_well_formed_and_round_trip_through_the_parser() {
        for shape in Shape::ALL {
            let rows = small(shape, 1);
            assert_eq!(rows.len(), 2_000);
            for w in rows.windows(2) {
                assert!(w[0].timestamp <= w[1].timestamp);
            }
            for r in &rows {
                let blocks = (r.input_length as usize).div_ceil(MOONCAKE_BLOCK_TOKENS);
                assert_eq!(r.hash_ids.len(), blocks, "{shape}: {r:?}");
                assert!(r.output_length >= 1);
            }
            let parsed = trace::parse(&to_jsonl(&rows)).unwrap();
            assert_eq!(parsed, rows, "{shape}");
        }
    }

    #[test]
    fn shapes_differ_in_the_way_they_claim() {
        let mean_len = |rows: &[TraceRow]| {
            rows.iter().map(|r| r.input_length as f64).sum::<f64>() / rows.len() as f64
        };
        let mean_out = |rows: &[TraceRow]| {
            rows.iter().map(|r| r.output_length as f64).sum::<f64>() / rows.len() as f64
        };
        let (agent, chat, docs) = (
            small(Shape::Agent, 1),
            small(Shape::Chat, 1),
            small(Shape::Docs, 1),
        );
        // Chats are short; documents are the longest prompts; agents ask for short outputs.
        assert!(mean_len(&chat) < 3_000.0, "{}", mean_len(&chat));
        assert!(mean_len(&docs) > mean_len(&agent), "{}", mean_len(&docs));
        assert!(mean_len(&agent) > 8_000.0, "{}", mean_len(&agent));
        assert!(mean_out(&agent) < mean_out(&chat));
        // Shared prefixes make reuse high for agents and documents.
        for (rows, lo) in [(&agent, 0.7), (&docs, 0.7), (&chat, 0.2)] {
            let bound = trace::reuse_bound(rows, MOONCAKE_BLOCK_TOKENS);
            assert!(bound > lo, "{bound}");
        }
    }

    #[test]
    fn a_sessions_turns_extend_its_own_prefix() {
        let rows = small(Shape::Agent, 3);
        // Some later request must start with all complete blocks of an earlier one and be
        // longer: an agent step re-sends its whole context.
        let found = rows.iter().enumerate().take(200).any(|(i, a)| {
            let full = a.input_length as usize / MOONCAKE_BLOCK_TOKENS;
            full > 12
                && rows[i + 1..].iter().any(|b| {
                    b.input_length > a.input_length && b.hash_ids[..full] == a.hash_ids[..full]
                })
        });
        assert!(found);
    }
}
