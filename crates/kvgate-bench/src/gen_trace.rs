//! `kvgate bench gen-trace`: Mooncake-format traces of other shapes than the bundled one
//! (agent loops, short chats, huge documents), seeded and deterministic.

use kvgate_sim::tracegen::{GenConfig, Shape, generate, to_jsonl};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct GenTraceArgs {
    /// agent (tool loops over long shared system prompts), chat (many short chats) or docs
    /// (questions over a few huge documents).
    #[arg(long)]
    pub shape: String,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Requests to emit (default: the shape's, sized for a replay at the knee).
    #[arg(long)]
    pub requests: Option<usize>,
    /// New sessions per second (default: the shape's).
    #[arg(long)]
    pub sessions_per_sec: Option<f64>,
    /// Output file (default: standard output).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(a: &GenTraceArgs) -> Result<(), String> {
    let shape = Shape::parse(&a.shape)?;
    let mut cfg = GenConfig::new(shape, a.seed);
    if let Some(n) = a.requests {
        if n == 0 || n > 10_000_000 {
            return Err("--requests must be in 1..=10000000".into());
        }
        cfg.requests = n;
    }
    if let Some(r) = a.sessions_per_sec {
        if !(r.is_finite() && r > 0.0) {
            return Err("--sessions-per-sec must be > 0".into());
        }
        cfg.sessions_per_s = r;
    }
    let text = to_jsonl(&generate(&cfg));
    match &a.out {
        Some(p) => {
            std::fs::write(p, text).map_err(|e| format!("cannot write {}: {e}", p.display()))
        }
        None => {
            use std::io::Write as _;
            std::io::stdout()
                .write_all(text.as_bytes())
                .map_err(|e| format!("cannot write the trace: {e}"))
        }
    }
}
