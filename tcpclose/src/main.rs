//! The `tcpclose` command: parses the command line and runs. Everything else is in the library.

use std::process::ExitCode;

use clap::Parser as _;
use tcpclose::{cli::Cli, run};

fn main() -> ExitCode {
    let settings = Cli::parse().settings();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("tcpclose: error: starting the event loop: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tcpclose: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
