//! `kvgate`: one binary, one subcommand per role.

mod bench_abuse;
mod bench_all;
mod bench_disagg;
mod bench_epp;
mod bench_events;
mod bench_gen_trace;
mod bench_replay;
mod bench_sweep;
mod cli;
mod demo;
mod epp_args;
mod event_plane_args;
mod mocker_args;
mod operator_args;
mod render_args;
mod router_args;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvgate: error: {e}");
            ExitCode::from(2)
        }
    }
}
