//! The `tcpclose` command: parses the command line and runs. Everything else is in the library.

use std::process::ExitCode;

use clap::Parser as _;
use tcpclose::{cli::Cli, metrics, run};

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
            // A mistake on the command line found once running: the status of clap's own.
            if err.downcast_ref::<metrics::UnusableAddress>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
