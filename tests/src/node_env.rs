//! A real one-node Kubernetes (`hack/node.sh`) for end-to-end tests: the chart's operator pods,
//! the images, injected app pods and Services, all actually running.
//!
//! [`NodeEnv::start`]:
//!
//! 1. takes an exclusive `flock` on [`LOCK_FILE`] for the lifetime of the [`NodeEnv`], so test
//!    binaries (or two `cargo test` runs) that want the node wait for each other instead of
//!    colliding — there is one node per machine (fixed interface names and address range);
//! 2. packs the images (`hack/images.sh --no-import`) from the binaries of the test's own cargo
//!    profile directory (`target/debug` under `cargo test`: the binaries the test command already
//!    built, no second release build) into a directory of its own ([`IMAGES_DIR_NAME`] under the
//!    cache), after `cargo build -p authrealm-operator -p authrealm-sidecar` (a no-op when they are
//!    fresh);
//! 3. runs `hack/node.sh down` then `hack/node.sh up` with a state directory of its own
//!    ([`NODE_DIR_NAME`]), so a node left by a killed test run is replaced by a fresh one, and
//!    a node someone started by hand (the default state directory) is never taken over: `up`
//!    refuses while that one owns the machine-wide names;
//! 4. returns with the admin kubeconfig; [`NodeEnv::client`] gives a `kube::Client`.
//!
//! Dropping the [`NodeEnv`] — also while unwinding from a panic — runs `hack/node.sh down`, which
//! removes every process, mount, interface, iptables rule and cgroup of the node. Keep the
//! `NodeEnv` in a local of the test (not a `static`: statics are never dropped). A test process
//! killed outright leaves the node up; the next start replaces it.
//!
//! Needs root (Linux, network namespaces, cgroups): [`NodeEnv::available`] says why not.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// Serialises every user of the node on this machine (held while a [`NodeEnv`] lives).
pub const LOCK_FILE: &str = "/run/authrealm-node-e2e.lock";
/// State directory of the test node, under the cache directory.
pub const NODE_DIR_NAME: &str = "node-e2e";
/// OCI archives of the test node's images, under the cache directory.
pub const IMAGES_DIR_NAME: &str = "images-e2e";

/// The image references `hack/images.sh` produces.
pub const OPERATOR_IMAGE: &str = "localhost/authrealm/authrealm-operator:dev";
pub const SIDECAR_IMAGE: &str = "localhost/authrealm/authrealm-sidecar:dev";
pub const LOGIN_APP_IMAGE: &str = "localhost/authrealm/login-app:dev";

/// The repository root (tests/ is one level below it).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// `$AUTHREALM_CACHE`, default `~/.cache/authrealm` (as the hack scripts use it).
pub fn cache_root() -> PathBuf {
    std::env::var_os("AUTHREALM_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/authrealm")
    })
}

/// The operator and sidecar binaries (see [`crate::bins`]); returns their directory.
pub fn build_binaries() -> anyhow::Result<PathBuf> {
    let operator = crate::bins::operator()?;
    let sidecar = crate::bins::sidecar()?;
    let dir = operator.parent().context("operator binary without a directory")?.to_path_buf();
    ensure!(sidecar.parent() == Some(dir.as_path()), "operator and sidecar binaries in different directories");
    Ok(dir)
}

/// A running node; see the module docs.
pub struct NodeEnv {
    node_dir: PathBuf,
    images_dir: PathBuf,
    kubeconfig: PathBuf,
    node_bin: PathBuf,
    control_plane_bin: PathBuf,
    startup: Duration,
    _lock: File,
}

impl std::fmt::Debug for NodeEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeEnv").field("node_dir", &self.node_dir).field("kubeconfig", &self.kubeconfig).finish()
    }
}

impl NodeEnv {
    /// `Err(reason)` when this machine cannot run the node (not root, not Linux).
    pub fn available() -> Result<(), String> {
        if !cfg!(target_os = "linux") {
            return Err("the local node needs Linux".into());
        }
        let uid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1).map(str::to_owned))
            })
            .flatten();
        if uid.as_deref() != Some("0") {
            return Err("the local node needs root (network namespace, cgroups, mounts)".into());
        }
        Ok(())
    }

    /// Packs the images, starts the node and waits until it is Ready. Blocking (minutes on a cold
    /// machine: it builds the Kubernetes binaries it lacks).
    pub fn start() -> anyhow::Result<NodeEnv> {
        let started = Instant::now();
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .with_context(|| format!("open {LOCK_FILE}"))?;
        if lock.try_lock().is_err() {
            eprintln!("node_env: another test holds {LOCK_FILE}; waiting for it");
            lock.lock().with_context(|| format!("flock {LOCK_FILE}"))?;
        }
        let cache = cache_root();
        let node_dir = cache.join(NODE_DIR_NAME);
        let images_dir = cache.join(IMAGES_DIR_NAME);

        let bin_dir = build_binaries()?;

        let t = Instant::now();
        let mut images = script("hack/images.sh");
        images.arg("--no-import").env("AUTHREALM_IMAGES_DIR", &images_dir).env("AUTHREALM_BIN_DIR", &bin_dir);
        run(&mut images, "hack/images.sh")?;
        eprintln!("node_env: images packed from {} in {:.1?}", bin_dir.display(), t.elapsed());

        let mut env = NodeEnv {
            node_dir,
            images_dir,
            kubeconfig: PathBuf::new(),
            node_bin: PathBuf::new(),
            control_plane_bin: PathBuf::new(),
            startup: Duration::ZERO,
            _lock: lock,
        };
        // A node this state directory left behind (a killed test run) goes first.
        let _ = env.node_sh("down").output();
        let t = Instant::now();
        let out = env.node_sh("up").stderr(Stdio::inherit()).output().context("run hack/node.sh up")?;
        // From here on, Drop tears down whatever `up` left (it cleans up after itself on failure).
        ensure!(
            out.status.success(),
            "hack/node.sh up failed ({}); logs in {}/log",
            out.status,
            env.node_dir.display()
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let kubeconfig =
            stdout.lines().rev().find(|l| !l.trim().is_empty()).context("hack/node.sh up printed nothing")?;
        env.kubeconfig = PathBuf::from(kubeconfig.trim());
        ensure!(env.kubeconfig.is_file(), "kubeconfig {} missing", env.kubeconfig.display());
        eprintln!("node_env: node up in {:.1?}", t.elapsed());

        let vars = env.node_sh("env").output().context("hack/node.sh env")?;
        for line in String::from_utf8_lossy(&vars.stdout).lines() {
            if let Some(v) = line.strip_prefix("AUTHREALM_NODE_BIN=") {
                env.node_bin = PathBuf::from(v);
            } else if let Some(v) = line.strip_prefix("AUTHREALM_CONTROL_PLANE_BIN=") {
                env.control_plane_bin = PathBuf::from(v);
            }
        }
        ensure!(env.node_bin.join("kubectl").is_file(), "no kubectl in {}", env.node_bin.display());
        ensure!(env.control_plane_bin.join("helm").is_file(), "no helm in {}", env.control_plane_bin.display());
        env.startup = started.elapsed();
        Ok(env)
    }

    fn node_sh(&self, verb: &str) -> Command {
        let mut cmd = script("hack/node.sh");
        cmd.arg(verb)
            .env("AUTHREALM_NODE_DIR", &self.node_dir)
            .env("AUTHREALM_IMAGES_DIR", &self.images_dir)
            .stdin(Stdio::null());
        cmd
    }

    /// The admin kubeconfig (cluster-admin; server https://10.97.255.1:6443, reachable from the host).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Directory of the node's logs (kubelet, containerd, API server, …).
    pub fn log_dir(&self) -> PathBuf {
        self.node_dir.join("log")
    }

    /// How long [`NodeEnv::start`] took (image packing included).
    pub fn startup_duration(&self) -> Duration {
        self.startup
    }

    /// A client for the node's API server.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let kc = Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// `kubectl --kubeconfig <admin>`.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.node_bin.join("kubectl"));
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).stdin(Stdio::null());
        cmd
    }

    /// `helm --kubeconfig <admin>`, with helm's caches in the node's state directory.
    pub fn helm(&self) -> Command {
        let mut cmd = Command::new(self.control_plane_bin.join("helm"));
        let home = self.node_dir.join("helm");
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .stdin(Stdio::null());
        cmd
    }

    /// `hack/up.sh --kubeconfig <admin> --images local ARGS…`: the README's first command aimed at
    /// this node as at any existing cluster (the node's images are already imported), with this
    /// node's kubectl and helm (and helm's caches in the node's state directory).
    pub fn up_sh_existing(&self, args: &[&str]) -> Command {
        let mut cmd = script("hack/up.sh");
        let home = self.node_dir.join("helm");
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--images", "local"])
            .args(args)
            .env("AUTHREALM_NODE_BIN", &self.node_bin)
            .env("AUTHREALM_CONTROL_PLANE_BIN", &self.control_plane_bin)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .stdin(Stdio::null());
        cmd
    }

    /// Tears the node down now (also done on drop); errors if `down` reports leftovers.
    pub fn down(&mut self) -> anyhow::Result<()> {
        let out = self.node_sh("down").output().context("run hack/node.sh down")?;
        self.kubeconfig = PathBuf::new();
        ensure!(
            out.status.success(),
            "hack/node.sh down left things behind:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

impl Drop for NodeEnv {
    fn drop(&mut self) {
        if std::env::var_os("AUTHREALM_NODE_KEEP").is_some_and(|v| !v.is_empty()) {
            eprintln!("node_env: AUTHREALM_NODE_KEEP set: the node stays up ({})", self.node_dir.display());
            return;
        }
        match self.node_sh("down").output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                eprintln!("node_env: hack/node.sh down: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr))
            }
            Err(e) => eprintln!("node_env: hack/node.sh down: {e}"),
        }
    }
}

fn script(path: &str) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join(path)).current_dir(repo_root());
    cmd
}

/// Runs a command to completion; its stdout is discarded, its stderr quoted on failure.
pub fn run(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
