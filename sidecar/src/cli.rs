//! Command line: `run`, `keygen`, `check-config`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::net::TcpListener;
use tokio::sync::watch;

use authrealm_contract::keygen::{generate, random_kid};
use authrealm_contract::{Alg, KeySet, KeyState, SidecarConfig};

use crate::app::App;
use crate::keys::KeyStore;
use crate::metrics::Metrics;

/// Exit code for configuration errors (sysexits EX_CONFIG).
pub const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "authrealm-sidecar",
    version,
    about = "JWT validation with immediate revocation, in front of your app"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, env = "AUTHREALM_LOG_FORMAT", value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve: public proxy listener, loopback issuer API, admin listener.
    Run {
        /// The sidecar config file (sidecar.json).
        #[arg(long, env = "AUTHREALM_CONFIG", default_value = "/etc/authrealm/config/sidecar.json")]
        config: PathBuf,
        /// How long in-flight requests may take to finish after SIGTERM.
        #[arg(long, env = "AUTHREALM_DRAIN_SECONDS", default_value_t = 20)]
        drain_seconds: u64,
    },
    /// Write a key set with one current key (for running without Kubernetes).
    Keygen {
        #[arg(long, default_value = "ES256")]
        alg: Alg,
        #[arg(long)]
        out: PathBuf,
        /// Also write the public-only projection (for verify-only sidecars).
        #[arg(long)]
        public_out: Option<PathBuf>,
        /// Key id (random when omitted).
        #[arg(long)]
        kid: Option<String>,
        /// Add a new key to an existing set instead: the old current key is retired.
        #[arg(long)]
        rotate: bool,
    },
    /// Validate a config file and its key set, then exit.
    CheckConfig {
        #[arg(long, env = "AUTHREALM_CONFIG")]
        config: PathBuf,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AUTHREALM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Json => b.json().flatten_event(true).init(),
        LogFormat::Text => b.init(),
    }
}

fn config_error(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("authrealm-sidecar: {msg}");
    ExitCode::from(EXIT_CONFIG)
}

fn load_config(path: &PathBuf) -> Result<SidecarConfig, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
    SidecarConfig::from_json(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match cli.command {
        Command::Keygen { alg, out, public_out, kid, rotate } => keygen(alg, out, public_out, kid, rotate),
        Command::CheckConfig { config } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(e) => return config_error(e),
            };
            match KeyStore::load(std::path::Path::new(&cfg.key_set_file)) {
                Ok(k) => {
                    let ring = k.ring();
                    println!(
                        "ok: realm {} with {} key(s), current {:?}, can mint: {}",
                        cfg.realm,
                        ring.keys.len(),
                        ring.current_kid(),
                        ring.signer().is_some()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => config_error(format!("keySetFile: {e}")),
            }
        }
        Command::Run { config, drain_seconds } => {
            init_logging(cli.log_format);
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(e) => return config_error(e),
            };
            let keys = match KeyStore::load(std::path::Path::new(&cfg.key_set_file)) {
                Ok(k) => k,
                Err(e) => return config_error(format!("keySetFile: {e}")),
            };
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
            rt.block_on(run(cfg, keys, Duration::from_secs(drain_seconds)))
        }
    }
}

fn keygen(alg: Alg, out: PathBuf, public_out: Option<PathBuf>, kid: Option<String>, rotate: bool) -> ExitCode {
    let now = crate::app::now_unix();
    let mut set = if rotate {
        match std::fs::read(&out)
            .map_err(|e| e.to_string())
            .and_then(|b| KeySet::from_json(&b).map_err(|e| e.to_string()))
        {
            Ok(s) => s,
            Err(e) => return config_error(format!("--rotate: {}: {e}", out.display())),
        }
    } else {
        KeySet::empty()
    };
    for k in set.keys.iter_mut().filter(|k| k.state == KeyState::Current) {
        k.state = KeyState::Retired;
        k.retired_at = Some(now);
    }
    let kid = kid.unwrap_or_else(random_kid);
    let key = match generate(alg, &kid, now, KeyState::Current) {
        Ok(k) => k,
        Err(e) => return config_error(e),
    };
    set.keys.push(key);
    if let Err(e) = set.validate() {
        return config_error(e);
    }
    if let Err(e) = write_private(&out, set.to_json_pretty().as_bytes()) {
        return config_error(format!("{}: {e}", out.display()));
    }
    if let Some(p) = public_out
        && let Err(e) = std::fs::write(&p, set.public_only().to_json_pretty())
    {
        return config_error(format!("{}: {e}", p.display()));
    }
    println!("{kid}");
    ExitCode::SUCCESS
}

/// Write a file readable only by its owner, replacing it atomically.
fn write_private(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

async fn bind(name: &str, addr: &str) -> Result<TcpListener, ExitCode> {
    TcpListener::bind(addr).await.map_err(|e| config_error(format!("listeners.{name}: cannot bind {addr}: {e}")))
}

async fn run(cfg: SidecarConfig, keys: KeyStore, drain: Duration) -> ExitCode {
    if let Some(redis) = cfg.redis.as_ref().filter(|_| cfg.session_mode != authrealm_contract::SessionMode::Stateless)
        && let Err(e) = crate::session::build_client(redis, false)
    {
        return config_error(e);
    }
    let metrics = Metrics::new();
    keys.spawn_reloader(Duration::from_millis(cfg.key_reload_interval_ms), metrics.clone());
    let app = App::new(cfg, keys, metrics);
    let public = match bind("public", &app.cfg.listeners.public).await {
        Ok(l) => l,
        Err(c) => return c,
    };
    let issuer = match bind("issuer", &app.cfg.listeners.issuer).await {
        Ok(l) => l,
        Err(c) => return c,
    };
    let admin = match bind("admin", &app.cfg.listeners.admin).await {
        Ok(l) => l,
        Err(c) => return c,
    };
    app.spawn_redis();
    app.external.spawn();
    let ring = app.keys.ring();
    tracing::info!(
        realm = %app.cfg.realm,
        public = %app.cfg.listeners.public,
        issuer = %app.cfg.listeners.issuer,
        admin = %app.cfg.listeners.admin,
        upstream = %app.cfg.upstream.address,
        session_mode = ?app.cfg.session_mode,
        failure_policy = ?app.cfg.failure_policy,
        keys = ring.keys.len(),
        can_mint = ring.signer().is_some(),
        "authrealm sidecar started"
    );
    drop(ring);

    let (tx, rx) = watch::channel(false);
    let client = crate::proxy::upstream_client(&app);
    let a = app.clone();
    let public_task =
        tokio::spawn(crate::server::serve(app.clone(), public, true, rx.clone(), drain, move |peer, req| {
            crate::proxy::handle(a.clone(), client.clone(), peer, req)
        }));
    let a = app.clone();
    let issuer_task =
        tokio::spawn(crate::server::serve(app.clone(), issuer, false, rx.clone(), drain, move |_, req| {
            crate::issuer::handle(a.clone(), req)
        }));
    let a = app.clone();
    // The admin listener keeps answering (readiness false) until the others have drained.
    let (admin_tx, admin_rx) = watch::channel(false);
    let admin_task = tokio::spawn(crate::server::serve(
        app.clone(),
        admin,
        false,
        admin_rx,
        Duration::from_secs(1),
        move |_, req| crate::admin::handle(a.clone(), req),
    ));

    wait_for_signal().await;
    tracing::info!(drain_seconds = drain.as_secs(), "shutting down: draining in-flight requests");
    app.draining.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = tx.send(true);
    let _ = public_task.await;
    let _ = issuer_task.await;
    let _ = admin_tx.send(true);
    let _ = admin_task.await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

#[allow(dead_code)]
fn _assert_send(app: Arc<App>) -> impl Send {
    app
}
