//! `odin-sidecar`: parse the command line, run one subcommand, exit.
//! Errors are printed once, with their causes, and give exit code 1, or 64
//! (sysexits' EX_USAGE) when the configuration is unusable. clap itself
//! exits with 2 for flags it cannot parse.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = odin_sidecar::cli::Cli::parse();
    odin_sidecar::cli::init_logging(cli.log_format);
    match odin_sidecar::cli::run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            if odin_sidecar::cli::is_usage_error(&error) {
                ExitCode::from(64)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
