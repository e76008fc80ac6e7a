//! The operator binary as the Helm chart runs it, outside the cluster: the chart installed (RBAC,
//! webhook configuration pointing at 127.0.0.1), the binary started with the settings the
//! chart's Deployment passes, under the chart's ServiceAccount (its kubeconfig impersonates it,
//! so a verb missing from the chart's roles fails as it would in a cluster), with loopback HTTP
//! and webhook listeners. Used by `webhook_operator_e2e` and the operator benchmark.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, ensure};

use crate::kube_env::KubeEnv;
use crate::support::free_port;

/// The chart's release namespace.
pub const NAMESPACE: &str = "authrealm-system";
/// The chart's MutatingWebhookConfiguration (release `authrealm` in [`NAMESPACE`]).
pub const MWC: &str = "authrealm-authrealm-system-sidecar-injector";

/// What differs between the users.
#[derive(Clone, Debug)]
pub struct ChartOperatorOptions<'a> {
    /// `operator.watchNamespace` (and `AUTHREALM_NAMESPACE`): confine the operator to one namespace.
    pub watch_namespace: Option<&'a str>,
    pub rust_log: &'a str,
    pub sidecar_image: &'a str,
    /// More environment for the operator (e.g. a shorter certificate check interval).
    pub env: &'a [(&'a str, &'a str)],
}

/// The running operator; killed when dropped. Its output is in `log`.
pub struct ChartOperator {
    pub child: Child,
    pub log: PathBuf,
    pub http_port: u16,
    pub webhook_port: u16,
}

impl ChartOperator {
    /// Installs the chart (`repo/charts/authrealm`, release `authrealm` in [`NAMESPACE`], which
    /// must exist) and starts `bin`.
    pub fn start(env: &KubeEnv, repo: &Path, bin: &Path, opts: &ChartOperatorOptions<'_>) -> anyhow::Result<Self> {
        let (webhook_port, http_port) = (free_port(), free_port());
        let mut helm = env.helm();
        helm.args(["install", "authrealm"])
            .arg(repo.join("charts/authrealm"))
            .args(["--namespace", NAMESPACE])
            .args(["--set", &format!("webhook.url=https://127.0.0.1:{webhook_port}/mutate-pods")]);
        if let Some(ns) = opts.watch_namespace {
            helm.args(["--set", &format!("operator.watchNamespace={ns}")]);
        }
        let out = helm.output()?;
        ensure!(out.status.success(), "helm install: {}", String::from_utf8_lossy(&out.stderr));

        let mut kubeconfig: serde_json::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(env.kubeconfig_path())?)?;
        for user in kubeconfig["users"].as_array_mut().context("kubeconfig users")? {
            user["user"]["as"] = format!("system:serviceaccount:{NAMESPACE}:authrealm").into();
        }
        let operator_kubeconfig = env.dir().join("operator-as-chart-sa.kubeconfig");
        std::fs::write(&operator_kubeconfig, serde_yaml_ng::to_string(&kubeconfig)?)?;

        let log = env.dir().join("operator.log");
        let child = Command::new(bin)
            .env("KUBECONFIG", &operator_kubeconfig)
            .env("RUST_LOG", opts.rust_log)
            .env("POD_NAME", "operator-0")
            .env("POD_NAMESPACE", NAMESPACE)
            .env("AUTHREALM_HTTP_ADDR", format!("127.0.0.1:{http_port}"))
            .env("AUTHREALM_LEASE_NAME", "authrealm-operator")
            .env("AUTHREALM_WEBHOOK_LISTEN", format!("127.0.0.1:{webhook_port}"))
            .env("AUTHREALM_WEBHOOK_CONFIGURATION", MWC)
            .env("AUTHREALM_WEBHOOK_SERVICE", "authrealm-webhook")
            .env("AUTHREALM_WEBHOOK_TLS_SECRET", "authrealm-webhook-tls")
            .env("AUTHREALM_WEBHOOK_EXTRA_SANS", "127.0.0.1")
            .env("AUTHREALM_SIDECAR_IMAGE", opts.sidecar_image)
            .env("AUTHREALM_NAMESPACE", opts.watch_namespace.unwrap_or(""))
            .envs(opts.env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(&log)?.try_clone()?)
            .spawn()
            .context("starting authrealm-operator")?;
        Ok(ChartOperator { child, log, http_port, webhook_port })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last 30 lines of the operator's output.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for ChartOperator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
