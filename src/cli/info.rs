//! `odin-sidecar info`: load the model as `serve` would and print what
//! `GetModelInfo` would answer, as JSON (the fields of `domain::ModelInfo`).

use std::process::ExitCode;

use clap::Args;

use super::ModelArgs;
use crate::app::App;

/// Flags of `info`.
#[derive(Debug, Clone, Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Runs `info`.
pub async fn run(args: InfoArgs) -> anyhow::Result<ExitCode> {
    let app = App::build(&args.model.config()?).await?;
    println!("{}", serde_json::to_string_pretty(&app.info())?);
    Ok(ExitCode::SUCCESS)
}
