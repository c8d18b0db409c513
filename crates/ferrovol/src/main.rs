use std::process::ExitCode;

use clap::Parser;
use ferrovol::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    ferrovol::logging::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferrovol: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => ferrovol::server::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "ferrovol failed");
            eprintln!("ferrovol: {e}");
            ExitCode::FAILURE
        }
    }
}
