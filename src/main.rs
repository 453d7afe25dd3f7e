//! `odin-sidecar`: parse the command line, run one subcommand, exit.
//! Errors are printed once, with their causes, and give exit code 1
//! (64 for unusable configuration, as sysexits' EX_USAGE).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = odin_sidecar::cli::Cli::parse();
    odin_sidecar::cli::init_logging(cli.log_format);
    match odin_sidecar::cli::run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
