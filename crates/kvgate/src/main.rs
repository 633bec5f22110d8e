//! `kvgate`: one binary, one subcommand per role.

mod cli;
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
