//! `odin-sidecar info`: load the model as `serve` would and print what
//! `GetModelInfo` would answer, as JSON.

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
    let info = app.info();
    let preprocessing = info.preprocessing.clone().unwrap_or_default();
    let scoring = info.scoring.clone().unwrap_or_default();
    let json = serde_json::json!({
        "name": info.name,
        "version": info.version,
        "input_name": info.input_name,
        "input_shape": info.input_shape,
        "input_layout": info.input_layout,
        "labels": info.labels,
        "preprocessing": {
            "height": preprocessing.height,
            "width": preprocessing.width,
            "channels": preprocessing.channels,
            "channel_order": preprocessing.channel_order,
            "resize": preprocessing.resize,
            "mean": preprocessing.mean,
            "std": preprocessing.std,
        },
        "execution_provider": info.execution_provider,
        "scoring": {
            "method": scoring.method,
            "temperature": scoring.temperature,
            "epsilon": scoring.epsilon,
            "threshold": scoring.threshold,
        },
    });
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(ExitCode::SUCCESS)
}
