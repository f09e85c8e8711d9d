//! The `tcpclose` command.

mod cli;
mod hang_check;
mod metrics;
mod output;
mod run;
mod sockets;
mod system;
mod tracer;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
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
    match runtime.block_on(run::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tcpclose: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
