//! `kvgate bench replay`, with Dynamo's own selector (`dynamo-kv-router` 1.6.1's `SelectionCore`
//! and its native reference scorer) as one more policy, `dynamo-selector`. The product does not
//! link the peer, so its row is run from here:
//!
//! ```text
//! cargo bench -p kvgate-peers --bench replay -- --sweep \
//!     --policies round-robin,dynamo-selector,dynamo,kvgate
//! ```
//!
//! Every `kvgate bench replay` flag works (`--sweep`, `--trace-shape`, `--json`, `--plot`...); the
//! output is the same, with the `dynamo-selector` row next to kvgate's reimplementation of
//! Dynamo's cost function (`dynamo`).

#[path = "../tests/support/mod.rs"]
mod support;

use clap::Parser;
use kvgate_bench::replay::{BenchReplayArgs, register_policy};
use kvgate_sim::policy::Policy;
use kvgate_sim::sim::{SimConfig, fleet_view};
use support::dynamo_selector::{DynamoSelector, NAME};

#[derive(Parser)]
#[command(
    name = "replay",
    about = "kvgate bench replay, with Dynamo's own selector as a policy"
)]
struct Cli {
    #[command(flatten)]
    replay: BenchReplayArgs,
}

fn selector(cfg: &SimConfig, _seed: u64) -> Result<Box<dyn Policy>, String> {
    Ok(Box::new(DynamoSelector::new(
        &fleet_view(cfg),
        cfg.engine.block_size,
    )?))
}

fn main() {
    // `cargo bench` passes `--bench` to every harness-less bench.
    let args = std::env::args().filter(|a| a != "--bench");
    let cli = Cli::parse_from(args);
    if let Err(e) = register_policy(NAME, selector) {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    if let Err(e) = kvgate_bench::replay::run(cli.replay) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
