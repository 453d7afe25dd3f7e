//! Start-up and serving: load the model, build and warm up the engines,
//! assemble the pipeline, then serve gRPC until shutdown. All heavy work
//! happens in `App::build`, so handlers only look things up.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{ServeConfig, MAX_MESSAGE_BYTES};
use crate::domain::{ModelInfo, ScoringInfo, Versions};
use crate::engine::{Device, Engine, EngineError, Graphs, Provider};
use crate::model::{Model, ModelError};
use crate::pipeline::{
    Batcher, Generation, Pipeline, PipelineOptions, Preprocessor, ScoringOptions,
};
use crate::score::{LoadedStats, Scorers};
use crate::server::tls::{TlsAcceptors, TlsError};
use crate::server::{self, conn, stack, DetectorService, Health, InferenceService};
use crate::telemetry::{ServedModel, Telemetry};
use crate::wire::kserve_v2::{self, grpc_inference_service_server::GrpcInferenceServiceServer};
use crate::wire::odin_v1::{self, detector_server::DetectorServer};

/// Why the sidecar could not start, or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The model or its card.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// ONNX Runtime or the session.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A fit statistics file cannot be used.
    #[error("fit statistics {0}")]
    Stats(String),
    /// The configured detector cannot be served.
    #[error("detector {0}")]
    Detector(String),
    /// The configured method needs the penultimate features, which could not be tapped.
    #[error("method needs the model's penultimate features: {0}")]
    Features(String),
    /// The configured method needs the gradient graph, which could not be derived.
    #[error("method needs the ODIN gradient graph, which could not be derived: {0}")]
    Gradient(String),
    /// Reflection could not index the descriptors.
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A configuration value is out of range.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The OTLP exporter could not be set up.
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A listener failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// The thread that loads the engines panicked.
    #[error("engine loader failed: {0}")]
    Loader(String),
    /// The TLS certificate, key or client CA cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A loaded, warmed-up sidecar, ready to serve.
pub struct App {
    pipeline: Arc<Pipeline>,
    reloader: Reloader,
    window: usize,
    max_unary_in_flight: usize,
    network: crate::config::NetworkOptions,
    tls: Option<TlsAcceptors>,
    token: Option<Arc<[u8]>>,
    health: Health,
    health_service:
        tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("info", &self.pipeline.current().info)
            .finish()
    }
}

impl App {
    /// Loads the model, builds one warmed-up engine per worker and starts
    /// the batcher. Must run inside a tokio runtime.
    pub async fn build(config: &ServeConfig) -> Result<App, StartError> {
        config.validate()?;
        let mut config = config.clone();
        let calibration = versioned(config.apply_calibration()?, &config);
        crate::pipeline::decode::log_backend();
        let loaded = Loaded::load(&config).await?;
        let provider = loaded.engines[0].provider();
        if config.engine.device == Device::Auto && provider == Provider::Cpu {
            tracing::warn!("CUDA is not available; serving on CPU (--device auto)");
        }
        let telemetry = Arc::new(Telemetry::start(
            config.otlp.as_ref(),
            &ServedModel {
                name: loaded.model.card.name.clone(),
                version: loaded.model.card.version.clone(),
                provider: provider.to_string(),
            },
        )?);
        if telemetry.tracing() {
            tracing::info!("exporting spans over OTLP/gRPC");
        }
        let generation = loaded.into_generation(&config, calibration, &telemetry)?;
        let info = generation.info.clone();
        tracing::info!(
            model = %info.name,
            revision = %info.versions.model,
            calibration = %info.versions.calibration,
            provider = %provider,
            workers = config.workers,
            method = %config.method,
            threshold = config.threshold,
            "model loaded and warmed up"
        );
        let options = PipelineOptions {
            decode_threads: config.decode_threads,
            memory_budget: config.memory_budget,
            fields: config.fields,
        };
        let pipeline = Arc::new(Pipeline::new(generation, options, Arc::clone(&telemetry)));
        // Weak: the push must not keep the pipeline (and its engines) alive.
        let gauges = Arc::downgrade(&pipeline);
        telemetry.spawn_metrics_push(move || gauges.upgrade().map(|p| p.gauges()));
        let (health, health_service) = Health::new();
        // Loaded and warmed up: SERVING from the first request.
        health.serving().await;
        let tls = config
            .network
            .tls
            .as_ref()
            .map(TlsAcceptors::load)
            .transpose()?;
        let token = config
            .network
            .auth_token_file
            .as_deref()
            .map(read_token)
            .transpose()?;
        let reloader = Reloader(Arc::new(ReloadState {
            config: config.clone(),
            pipeline: Arc::clone(&pipeline),
            telemetry: Arc::clone(&telemetry),
            one_at_a_time: tokio::sync::Mutex::new(()),
        }));
        Ok(App {
            pipeline,
            reloader,
            window: config.stream_window,
            max_unary_in_flight: config.max_unary_in_flight,
            network: config.network.clone(),
            tls,
            token,
            health,
            health_service,
        })
    }

    /// What is being served now (a reload may change it).
    pub fn info(&self) -> ModelInfo {
        self.pipeline.current().info.clone()
    }

    /// The handle that reloads the model and calibration (on SIGHUP, or
    /// when their files change).
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// The pipeline, for in-process use (`detect`, benchmarks).
    pub fn pipeline(&self) -> Arc<Pipeline> {
        Arc::clone(&self.pipeline)
    }

    /// Metrics and tracing.
    pub fn telemetry(&self) -> Arc<Telemetry> {
        Arc::clone(self.pipeline.telemetry())
    }

    /// The readiness switch that gRPC health and `/readyz` report.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` over plain HTTP at
    /// `listener` until `shutdown` completes. Spawn it next to `serve`.
    pub fn serve_http(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = std::io::Result<()>> + Send + 'static {
        let pipeline = Arc::clone(&self.pipeline);
        let endpoints = server::http::Endpoints {
            metrics: Arc::clone(pipeline.telemetry().metrics()),
            gauges: Arc::new(move || pipeline.gauges()),
            health: self.health.clone(),
        };
        server::http::serve(listener, endpoints, shutdown)
    }

    /// Serves on `listener` until `shutdown` completes, then drains (see
    /// [`App::serve_on`]).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartError> {
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() && self.tls.is_none() {
            tracing::warn!(
                %addr,
                "listening beyond loopback without TLS: frames and tokens travel in clear text \
                 (set --tls-cert and --tls-key)"
            );
        }
        self.serve_on(vec![conn::Listener::Tcp(listener)], shutdown)
            .await
    }

    /// Serves on a Unix domain socket until `shutdown` completes.
    pub async fn serve_unix(
        self,
        listener: tokio::net::UnixListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartError> {
        self.serve_on(vec![conn::Listener::Unix(listener)], shutdown)
            .await
    }

    /// Serves until `shutdown` completes, then drains: health turns
    /// NOT_SERVING at once, new calls get UNAVAILABLE, open streams stop
    /// being read and end with UNAVAILABLE once their accepted frames are
    /// answered, and connections close. Whatever is still open after the
    /// shutdown grace period is cut. Spans left are exported last.
    pub async fn serve_on(
        self,
        listeners: Vec<conn::Listener>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartError> {
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(odin_v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(kserve_v2::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let telemetry = Arc::clone(self.pipeline.telemetry());
        let (drain, draining) = watch::channel(false);
        // Files behind the model and calibration are watched for changes.
        tokio::spawn(watch_files(self.reloader.clone()));
        // KServe v2 / Open Inference Protocol clients, on the same port.
        let inference = GrpcInferenceServiceServer::new(InferenceService::new(
            Arc::clone(&self.pipeline),
            self.window,
            draining.clone(),
            self.health.clone(),
            self.network.request_timeout,
        ))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let detector = DetectorServer::new(DetectorService::new(
            self.pipeline,
            self.window,
            draining.clone(),
            self.network.request_timeout,
        ))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let net = &self.network;
        let incoming = conn::incoming(
            listeners,
            conn::ConnOptions {
                max_connections: net.max_connections,
                idle_timeout: net.idle_timeout,
                handshake_timeout: net.handshake_timeout,
            },
            self.tls.clone(),
            Arc::clone(telemetry.metrics()),
        );
        let stack = stack::StackOptions {
            max_unary_in_flight: self.max_unary_in_flight,
            network: net.clone(),
            token: self.token.clone(),
            draining: draining.clone(),
            metrics: Arc::clone(telemetry.metrics()),
        };
        let health = self.health.clone();
        let begin_drain = async move {
            shutdown.await;
            tracing::info!("shutting down: draining open streams");
            health.not_serving().await;
            let _ = drain.send(true);
        };
        let serving = stack::server(&stack)
            .add_service(self.health_service)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?)
            .add_service(detector)
            .add_service(inference)
            .serve_with_incoming_shutdown(incoming, begin_drain);
        let grace = net.shutdown_grace;
        let mut drained = draining;
        let cut_off = async move {
            let _ = drained.wait_for(|draining| *draining).await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            served = serving => served?,
            () = cut_off => tracing::warn!(
                ?grace,
                "shutdown grace period over; closing the connections still open"
            ),
        }
        // Export what the last frames left; shutdown blocks, so off the runtime.
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        tracing::info!("drained");
        Ok(())
    }
}

/// A model with its warmed-up engines: the slow part of a generation,
/// done off the async runtime.
struct Loaded {
    model: Model,
    engines: Vec<Engine>,
    digest: String,
}

impl Loaded {
    async fn load(config: &ServeConfig) -> Result<Loaded, StartError> {
        let model = Model::load(&config.model)?;
        let digest = crate::model::short_digest(&model.onnx);
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            let graphs = graphs(&model, &config)?;
            let engines = load_engines(&model, &graphs, &config)?;
            Ok(Loaded {
                model,
                engines,
                digest,
            })
        })
        .await
        .map_err(|e| StartError::Loader(e.to_string()))?
    }

    /// Starts the engines' workers and assembles the generation.
    fn into_generation(
        self,
        config: &ServeConfig,
        calibration: String,
        telemetry: &Arc<Telemetry>,
    ) -> Result<Generation, StartError> {
        let versions = Versions {
            model: format!("{}@{}", self.model.card.version, self.digest).into(),
            calibration: calibration.into(),
        };
        let scorers = Arc::new(load_scorers(
            config,
            &self.model,
            self.engines[0].feature_dim(),
        )?);
        let info = model_info(&self.model, &self.engines[0], config, versions, &scorers);
        let can_perturb = self.engines[0].can_perturb();
        Ok(Generation {
            preprocessor: preprocessor(&self.model, config),
            batcher: Batcher::start(self.engines, config.batch, Arc::clone(telemetry)),
            scoring: scoring_options(config, can_perturb),
            scorers,
            labels: self.model.card.labels.clone(),
            info,
        })
    }
}

fn scoring_options(config: &ServeConfig, can_perturb: bool) -> ScoringOptions {
    ScoringOptions {
        scoring: config.scoring(),
        threshold: config.threshold,
        bounds: config.bounds,
        can_perturb,
    }
}

/// Reloads the model and its calibration while serving: the new version is
/// loaded beside the old one and put in force at once for new frames;
/// frames in flight finish on the old one; open streams go on. A file that
/// cannot be used is logged and the old version keeps serving. Cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct Reloader(Arc<ReloadState>);

#[derive(Debug)]
struct ReloadState {
    config: ServeConfig,
    pipeline: Arc<Pipeline>,
    telemetry: Arc<Telemetry>,
    one_at_a_time: tokio::sync::Mutex<()>,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// The files are the ones already served.
    Unchanged,
    /// A new calibration is in force (same model and engines).
    Calibration(Versions),
    /// A new model (with its calibration) is in force.
    Model(Versions),
}

impl Reloader {
    /// Reads the model and calibration files again and puts what changed in
    /// force. On error nothing changes.
    pub async fn reload(&self) -> Result<Reloaded, StartError> {
        let state = &self.0;
        let _one = state.one_at_a_time.lock().await;
        let mut config = state.config.clone();
        let calibration = versioned(config.apply_calibration()?, &config);
        let current = state.pipeline.current();
        let model = Model::load(&config.model)?;
        let same_model = format!(
            "{}@{}",
            model.card.version,
            crate::model::short_digest(&model.onnx)
        ) == *current.info.versions.model;
        if same_model && calibration == *current.info.versions.calibration {
            return Ok(Reloaded::Unchanged);
        }
        let generation = if same_model {
            let versions = Versions {
                model: Arc::clone(&current.info.versions.model),
                calibration: calibration.into(),
            };
            let mut info = current.info.clone();
            let scoring = scoring_options(&config, current.scoring.can_perturb);
            if scoring.scoring.perturbation().is_some() && !scoring.can_perturb {
                return Err(StartError::Gradient(
                    "the new calibration needs the gradient graph, which this model lacks".into(),
                ));
            }
            let dim = current.info.scoring.feature_dim;
            let scorers = Arc::new(load_scorers(
                &config,
                &model,
                (dim > 0).then_some(dim as usize),
            )?);
            info.scoring = scoring_info(&config, scoring.can_perturb, &scorers);
            info.versions = versions;
            Generation {
                preprocessor: current.preprocessor.clone(),
                batcher: current.batcher.clone(),
                scoring,
                scorers,
                labels: current.labels.clone(),
                info,
            }
        } else {
            Loaded::load(&config)
                .await?
                .into_generation(&config, calibration, &state.telemetry)?
        };
        let versions = generation.info.versions.clone();
        state.pipeline.install(generation);
        tracing::info!(
            revision = %versions.model,
            calibration = %versions.calibration,
            "reloaded; new frames use the new version"
        );
        Ok(if same_model {
            Reloaded::Calibration(versions)
        } else {
            Reloaded::Model(versions)
        })
    }

    /// The files a reload reads: the model (when not built in) and the
    /// calibration (when from a file).
    fn files(&self) -> Vec<std::path::PathBuf> {
        let config = &self.0.config;
        let mut files = Vec::new();
        if let crate::model::ModelSource::File { model, .. } = &config.model {
            files.push(model.clone());
        }
        if let crate::config::CalibrationSource::File(path) = &config.calibration {
            files.push(path.clone());
        }
        files.extend(config.fit_stats.iter().cloned());
        files
    }
}

/// Reloads whenever a watched file's modification time changes, checking
/// every two seconds. A failed reload is logged; the old version serves on.
async fn watch_files(reloader: Reloader) {
    let files = reloader.files();
    if files.is_empty() {
        return;
    }
    let stamp = || -> Vec<Option<std::time::SystemTime>> {
        files
            .iter()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    };
    let mut seen = stamp();
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        // Stop once the server (the pipeline's other owners) is gone.
        if Arc::strong_count(&reloader.0.pipeline) <= 1 {
            return;
        }
        let now = stamp();
        if now == seen {
            continue;
        }
        seen = now;
        if let Err(e) = reloader.reload().await {
            tracing::error!(error = %e, "a watched file changed but cannot be served; the previous version serves on");
        }
    }
}

/// The model, one engine (with the fused graph when it can be derived)
/// and the preprocessor: what the offline subcommands (`calibrate`, `eval`)
/// run on, without a server.
pub fn offline_engine(config: &ServeConfig) -> Result<(Model, Engine, Preprocessor), StartError> {
    let offline = Offline::load(config)?;
    Ok((offline.model, offline.engine, offline.preprocessor))
}

/// The model's preprocessor under the configured limits and decode options.
pub fn preprocessor(model: &Model, config: &ServeConfig) -> Preprocessor {
    Preprocessor::with_options(&model.card.input, config.decode_limits(), config.decode)
}

/// What the offline subcommands run on: the model, its graphs (feature
/// taps included), one engine and the preprocessor.
#[derive(Debug)]
pub struct Offline {
    /// The model and its card.
    pub model: Model,
    /// Its graphs and feature taps.
    pub graphs: Graphs,
    /// One engine.
    pub engine: Engine,
    /// Frames to input tensors.
    pub preprocessor: Preprocessor,
}

impl Offline {
    /// Loads the model and builds one engine.
    pub fn load(config: &ServeConfig) -> Result<Offline, StartError> {
        let model = Model::load(&config.model)?;
        let graphs = graphs(&model, config)?;
        let engine = Engine::load(&model, Some(&graphs), &config.engine)?;
        let preprocessor = preprocessor(&model, config);
        Ok(Offline {
            model,
            graphs,
            engine,
            preprocessor,
        })
    }
}

/// The graphs `model` is served with, derived at start-up: the model with
/// its penultimate features exposed (when the graph analysis or the card
/// finds them), and the ODIN graph — fused with the forward pass on the
/// perturbed input unless `--engine two-session`. A model without features
/// is still served with the methods that need none, and one the gradient
/// pass cannot differentiate with the methods that need no perturbation —
/// unless the configured method needs them.
pub fn graphs(model: &Model, config: &ServeConfig) -> Result<Graphs, StartError> {
    let scoring = config.scoring();
    let taps = match crate::grad::taps::find_in_bytes(&model.onnx, model.card.features.as_deref()) {
        Ok(taps) => {
            tracing::info!(
                features = %taps.features,
                dim = taps.dim,
                layer = %taps.layer,
                from_card = taps.from_card,
                "tapped the penultimate features"
            );
            Some(Arc::new(taps))
        }
        Err(e) if scoring.method.needs_features() => {
            return Err(StartError::Features(e.to_string()))
        }
        Err(e) => {
            tracing::warn!(error = %e, "no feature taps: the feature-space detectors are unavailable");
            None
        }
    };
    let forward: Arc<[u8]> = match &taps {
        Some(t) => crate::grad::taps::with_features_output(&model.onnx, t)
            .map_err(|e| StartError::Features(e.to_string()))?
            .into(),
        None => Arc::clone(&model.onnx),
    };
    let options = crate::grad::GradOptions {
        std: model.card.input.std.clone(),
        raw_gradient: false,
        features: taps.as_ref().map(|t| t.features.clone()),
        fused: config.engine.fused,
    };
    let gradient = match crate::grad::derive(&model.onnx, &options) {
        Ok(derived) => {
            for note in &derived.summary.notes {
                tracing::info!(%note, "gradient pass");
            }
            tracing::info!(
                nodes_added = derived.summary.nodes_added,
                fused = config.engine.fused,
                "derived the ODIN gradient graph"
            );
            Some(Arc::from(derived.bytes))
        }
        Err(e) if scoring.perturbation().is_some() => {
            return Err(StartError::Gradient(e.to_string()))
        }
        Err(e) => {
            tracing::warn!(error = %e, "no gradient graph: odin and perturbed scores are unavailable");
            None
        }
    };
    Ok(Graphs {
        forward,
        fused: config.engine.fused && gradient.is_some(),
        gradient,
        taps,
    })
}

fn load_engines(
    model: &Model,
    graphs: &Graphs,
    config: &ServeConfig,
) -> Result<Vec<Engine>, StartError> {
    let input = &model.card.input;
    let zeros = vec![0.0f32; (input.channels * input.height * input.width) as usize];
    (0..config.workers)
        .map(|_| {
            let mut engine = Engine::load(model, Some(graphs), &config.engine)?;
            // Warm-up: the first run allocates and picks kernels, for both graphs.
            engine.run(&zeros, 1, None)?;
            if engine.can_perturb() {
                let odin = crate::score::Perturbation {
                    temperature: 1000.0,
                    epsilon: 0.0014,
                };
                engine.run(&zeros, 1, Some(odin))?;
            }
            Ok(engine)
        })
        .collect()
}

/// The calibration version, with the start of the SHA-256 of every
/// `--fit-stats` file appended, so that a reload notices a refitted file.
fn versioned(calibration: String, config: &ServeConfig) -> String {
    let mut version = calibration;
    for path in &config.fit_stats {
        let digest = std::fs::read(path)
            .map(|b| crate::model::short_digest(&b))
            .unwrap_or_else(|_| "unreadable".into());
        version = format!("{version}+{digest}");
    }
    version
}

/// The bearer token in `path`: its first line, trimmed. An empty or
/// unreadable file is a configuration error, never "no token".
fn read_token(path: &std::path::Path) -> Result<Arc<[u8]>, crate::config::ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        crate::config::ConfigError(format!("--auth-token-file {}: {e}", path.display()))
    })?;
    let token = text.lines().next().unwrap_or_default().trim();
    if token.is_empty() {
        return Err(crate::config::ConfigError(format!(
            "--auth-token-file {} holds no token",
            path.display()
        )));
    }
    Ok(Arc::from(token.as_bytes()))
}

fn model_info(
    model: &Model,
    engine: &Engine,
    config: &ServeConfig,
    versions: Versions,
    scorers: &Scorers,
) -> ModelInfo {
    let card = &model.card;
    let shape = engine.shape();
    ModelInfo {
        versions,
        name: card.name.clone(),
        version: card.version.clone(),
        input_name: shape.input_name.clone(),
        input_shape: shape.input_shape.clone(),
        input_layout: "NCHW".into(),
        labels: card.labels.clone(),
        preprocessing: crate::model::card::InputSpec {
            resize: config.decode.resize.unwrap_or(card.input.resize),
            ..card.input.clone()
        },
        execution_provider: engine.provider().to_string(),
        scoring: scoring_info(config, engine.can_perturb(), scorers),
    }
}

fn scoring_info(config: &ServeConfig, can_perturb: bool, scorers: &Scorers) -> ScoringInfo {
    ScoringInfo {
        method: config.method.to_string(),
        temperature: config.temperature,
        epsilon: config.scoring().effective_epsilon(),
        threshold: config.threshold,
        threshold_source: config.threshold_source.clone(),
        min_temperature: config.bounds.min_temperature,
        max_temperature: config.bounds.max_temperature,
        max_epsilon: config.bounds.max_epsilon,
        perturbation_available: can_perturb,
        detector: match (config.method, scorers.combination()) {
            (crate::score::Method::Combined, Some(c)) => format!("combined: {}", c.describe()),
            (method, _) => method.to_string(),
        },
        fit_stats: scorers
            .stats()
            .iter()
            .map(|s| match s.perturbation() {
                None => s.name.clone(),
                Some(p) => format!(
                    "{} (training features perturbed at T = {}, ε = {})",
                    s.name, p.temperature, p.epsilon
                ),
            })
            .collect(),
        feature_dim: scorers.dim().map_or(0, |d| d as u32),
    }
}

/// The fit statistics `config` names (the calibration's, then
/// `--fit-stats`), checked against their digests and the model, and the
/// scorers built on them; the configured scoring must be servable.
pub fn load_scorers(
    config: &ServeConfig,
    model: &Model,
    dim: Option<usize>,
) -> Result<Scorers, StartError> {
    let model_sha = crate::model::sha256_hex(&model.onnx);
    let mut files: Vec<(std::path::PathBuf, Option<String>)> = config
        .calibrated_stats
        .iter()
        .map(|(p, sha)| (p.clone(), Some(sha.clone())))
        .collect();
    for extra in &config.fit_stats {
        if !files.iter().any(|(p, _)| p == extra) {
            files.push((extra.clone(), None));
        }
    }
    let mut stats = Vec::with_capacity(files.len());
    for (path, want) in files {
        let bad = |e: String| StartError::Stats(format!("{}: {e}", path.display()));
        let bytes = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
        let sha = crate::model::sha256_hex(&bytes);
        if let Some(want) = want {
            if !want.eq_ignore_ascii_case(&sha) {
                return Err(bad(format!(
                    "SHA-256 is {sha}, the calibration expects {want}: the statistics changed since it was calibrated"
                )));
            }
        }
        let loaded = crate::fit::Stats::from_bytes(&bytes).map_err(|e| bad(e.to_string()))?;
        loaded
            .check_model(&model_sha)
            .map_err(|e| bad(e.to_string()))?;
        let name = path
            .file_name()
            .map_or_else(|| "fit-stats".into(), |n| n.to_string_lossy().into_owned());
        stats.push(Arc::new(LoadedStats::new(
            loaded,
            format!("{name} (sha256 {}…)", &sha[..8]),
            sha,
        )));
    }
    let scorers = Scorers::new(stats, config.combination.clone(), dim);
    scorers
        .check(&config.scoring())
        .map_err(|e| StartError::Detector(format!("{}: {e}", config.method)))?;
    Ok(scorers)
}
