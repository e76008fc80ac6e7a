//! Command line: flags (with environment fallbacks), their validation, and the process's run
//! loop (HTTP endpoint, CRD check, leader election, controller, signals).

use std::net::SocketAddr;
use std::time::Duration;

use clap::{ArgAction, Parser, Subcommand};

use crate::controller::{self, Settings};
use crate::crd::{AuthRealm, GoDuration};
use crate::leader::{self, LeaseSettings};
use crate::metrics::Metrics;
use crate::server::{self, Health};

/// Exit code of a bad command line or configuration (EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "authrealm-operator",
    version,
    about = "Reconciles AuthRealms into rotating signing keys, a JWKS and sidecar config"
)]
pub struct Args {
    /// Log format (the filter is `AUTHREALM_LOG`, e.g. `info,kube_runtime=warn`; as in the sidecar).
    #[arg(long, env = "AUTHREALM_LOG_FORMAT", value_enum, default_value = "text", global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum LogFormat {
    Text,
    /// One JSON object per line, fields flattened (what log pipelines parse).
    Json,
}

/// Logging to stderr: `AUTHREALM_LOG` filter (default `info,kube_runtime=warn`; `RUST_LOG` is
/// still read when `AUTHREALM_LOG` is unset), text or JSON, colour only on a terminal.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AUTHREALM_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_runtime=warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Json => b.json().flatten_event(true).init(),
        LogFormat::Text => b.init(),
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the AuthRealm CRD as YAML (`... crdgen > crds/authrealm.yaml`).
    Crdgen,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Watch AuthRealms in this namespace only (default: all namespaces).
    #[arg(long, env = "AUTHREALM_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "AUTHREALM_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: String,
    /// Use a coordination.k8s.io Lease so only one replica reconciles.
    #[arg(long, env = "AUTHREALM_LEADER_ELECT", default_value_t = true, action = ArgAction::Set)]
    pub leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(long, env = "AUTHREALM_LEASE_NAME", default_value = "authrealm-operator")]
    pub lease_name: String,
    /// Namespace of the leader Lease (default: $POD_NAMESPACE, else --namespace, else `default`).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// This replica's identity in the Lease and in events (default: $POD_NAME, else the host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How long a Lease is valid without renewal.
    #[arg(long, env = "AUTHREALM_LEASE_DURATION", default_value = "15s")]
    pub lease_duration: String,
    /// A leader that could not renew for this long stops (must be shorter than the lease duration).
    #[arg(long, env = "AUTHREALM_RENEW_DEADLINE", default_value = "10s")]
    pub renew_deadline: String,
    /// Interval of lease renewals and acquisition attempts (must be shorter than the renew deadline).
    #[arg(long, env = "AUTHREALM_RETRY_PERIOD", default_value = "2s")]
    pub retry_period: String,
    /// Realms reconciled in parallel.
    #[arg(long, env = "AUTHREALM_CONCURRENCY", default_value_t = 4)]
    pub concurrency: u16,
    /// Longest interval between two Redis checks of a realm.
    #[arg(long, env = "AUTHREALM_REDIS_CHECK_INTERVAL", default_value = "60s")]
    pub redis_check_interval: String,
    /// Longest time a realm deletion waits for its session purge.
    #[arg(long, env = "AUTHREALM_PURGE_TIMEOUT", default_value = "5m")]
    pub purge_timeout: String,
    /// The sidecar-injection webhook (`--webhook-*`, `--sidecar-image*`).
    #[command(flatten)]
    pub webhook: crate::webhook::WebhookConfig,
}

/// Validated settings of a run.
#[derive(Debug, Clone)]
pub struct Config {
    pub http_addr: SocketAddr,
    pub settings: Settings,
    pub lease: Option<LeaseSettings>,
    /// None when `--webhook-enabled=false`.
    pub webhook: Option<crate::webhook::WebhookConfig>,
}

/// A flag that cannot be used, named.
#[derive(Debug, thiserror::Error)]
#[error("invalid --{flag}: {message}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub message: String,
}

fn duration(flag: &'static str, v: &str) -> Result<Duration, ConfigError> {
    let d = GoDuration::new(v).parse().map_err(|message| ConfigError { flag, message })?;
    if d.is_zero() {
        return Err(ConfigError { flag, message: "must be longer than 0s".into() });
    }
    Ok(d)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("authrealm-operator-{}", std::process::id()))
}

impl RunArgs {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let http_addr = self.http_addr.parse().map_err(|e| ConfigError {
            flag: "http-addr",
            message: format!("{:?} is not ip:port: {e}", self.http_addr),
        })?;
        if self.concurrency == 0 {
            return Err(ConfigError { flag: "concurrency", message: "must be at least 1".into() });
        }
        let identity = self.identity.clone().filter(|s| !s.is_empty()).unwrap_or_else(hostname);
        let settings = Settings {
            namespace: self.namespace.clone().filter(|s| !s.is_empty()),
            concurrency: self.concurrency,
            redis_check_interval: duration("redis-check-interval", &self.redis_check_interval)?,
            purge_timeout: duration("purge-timeout", &self.purge_timeout)?,
            identity: identity.clone(),
        };
        let lease = if self.leader_elect {
            let lease_duration = duration("lease-duration", &self.lease_duration)?;
            let renew_deadline = duration("renew-deadline", &self.renew_deadline)?;
            let retry_period = duration("retry-period", &self.retry_period)?;
            if renew_deadline >= lease_duration {
                return Err(ConfigError {
                    flag: "renew-deadline",
                    message: "must be shorter than --lease-duration".into(),
                });
            }
            if retry_period >= renew_deadline {
                return Err(ConfigError {
                    flag: "retry-period",
                    message: "must be shorter than --renew-deadline".into(),
                });
            }
            let namespace = self
                .lease_namespace
                .clone()
                .filter(|s| !s.is_empty())
                .or_else(|| settings.namespace.clone())
                .unwrap_or_else(|| "default".into());
            Some(LeaseSettings {
                namespace,
                name: self.lease_name.clone(),
                identity,
                lease_duration,
                renew_deadline,
                retry_period,
            })
        } else {
            None
        };
        let webhook = match self.webhook.enabled {
            true => {
                self.webhook.check().map_err(|(flag, message)| ConfigError { flag, message })?;
                Some(self.webhook.clone())
            }
            false => None,
        };
        Ok(Config { http_addr, settings, lease, webhook })
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown requested");
}

/// Runs the operator until a signal (exit 0) or a fatal error (exit 1).
pub async fn run(cfg: Config) -> i32 {
    let metrics = Metrics::new();
    let health = Health::new(metrics.clone());
    let (addr, _server) = match server::serve(cfg.http_addr, health.clone()).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("authrealm-operator: cannot listen on {}: {e}", cfg.http_addr);
            return 1;
        }
    };
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    let kube_config = match kube::Config::infer().await {
        Ok(mut c) => {
            // API server audit logs then tell the replicas' requests apart.
            c.headers.push((http::header::USER_AGENT, user_agent(&cfg.settings.identity)));
            c
        }
        Err(e) => {
            eprintln!("authrealm-operator: cannot load a Kubernetes client config (kubeconfig or in-cluster): {e}");
            return 1;
        }
    };
    let client = match kube::Client::try_from(kube_config.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("authrealm-operator: cannot build a Kubernetes client (kubeconfig or in-cluster config): {e}");
            return 1;
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let shutdown = stopped();
    tokio::pin!(shutdown);

    // Wait for the CRD, saying how to install it.
    let realms: kube::Api<AuthRealm> = match &cfg.settings.namespace {
        Some(ns) => kube::Api::namespaced(client.clone(), ns),
        None => kube::Api::all(client.clone()),
    };
    loop {
        match controller::check_crd(&realms).await {
            Ok(()) => break,
            Err(e) => tracing::error!("{e}; retrying in 10s"),
        }
        tokio::select! {
            _ = &mut shutdown => return 0,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
    // The sidecar-injection webhook: every replica serves it, leader or not.
    let webhook = match cfg.webhook.clone() {
        None => None,
        Some(w) => match crate::webhook::start_webhook(client.clone(), w, metrics.webhook.clone()).await {
            Ok(handle) => Some(handle),
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("authrealm-operator: {e}");
                return 1;
            }
        },
    };
    health.set_ready(true);

    let settings = cfg.settings.clone();
    let result = match cfg.lease {
        None => {
            metrics.leader.set(1);
            controller::run(client, settings, metrics, stopped()).await.map_err(leader::LeaderError::from)
        }
        Some(lease) => {
            let m = metrics.clone();
            leader::run_elected(client, lease, metrics, stopped(), move |term, stop| async move {
                // The controller's own client, whose writes stop with the term.
                let c = leader::fenced_client(kube_config, &term).map_err(controller::Error::Client)?;
                controller::run_in_term(c, settings, m, term, async move {
                    let _ = stop.await;
                })
                .await
            })
            .await
        }
    };
    if let Some(handle) = webhook {
        handle.shutdown().await;
    }
    match result {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("authrealm-operator: {e}");
            1
        }
    }
}

/// `authrealm-operator/<version> (<identity>)`, or without the identity if it cannot be a header.
pub fn user_agent(identity: &str) -> http::HeaderValue {
    let base = concat!("authrealm-operator/", env!("CARGO_PKG_VERSION"));
    http::HeaderValue::from_str(&format!("{base} ({identity})"))
        .unwrap_or_else(|_| http::HeaderValue::from_static(base))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("authrealm-operator").chain(extra.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_validate() {
        let cfg = args(&["--identity", "op-0"]).run.validate().unwrap();
        let lease = cfg.lease.unwrap();
        assert_eq!((lease.identity.as_str(), lease.lease_duration), ("op-0", Duration::from_secs(15)));
        assert_eq!(cfg.settings.redis_check_interval, Duration::from_secs(60));
        assert!(args(&["--leader-elect", "false"]).run.validate().unwrap().lease.is_none());
        assert!(matches!(args(&["crdgen"]).command, Some(Command::Crdgen)));
    }

    #[test]
    fn the_user_agent_names_the_replica() {
        assert_eq!(
            user_agent("op-0").to_str().unwrap(),
            concat!("authrealm-operator/", env!("CARGO_PKG_VERSION"), " (op-0)")
        );
        assert_eq!(
            user_agent("bad\nname").to_str().unwrap(),
            concat!("authrealm-operator/", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn bad_flags_are_named() {
        for (flags, flag) in [
            (&["--http-addr", "nope"][..], "http-addr"),
            (&["--lease-duration", "5s", "--renew-deadline", "10s"][..], "renew-deadline"),
            (&["--retry-period", "20s"][..], "retry-period"),
            (&["--redis-check-interval", "soon"][..], "redis-check-interval"),
            (&["--concurrency", "0"][..], "concurrency"),
        ] {
            let e = args(flags).run.validate().unwrap_err();
            assert_eq!(e.flag, flag, "{e}");
        }
    }
}
