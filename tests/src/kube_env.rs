//! A real Kubernetes control plane on loopback for integration tests (envtest-style).
//!
//! [`KubeEnv::start`] launches, as child processes of the test:
//!
//! * **etcd** (v3.6.x) with its data directory in a fresh temporary directory and
//!   `--unsafe-no-fsync` (durability is irrelevant for a throwaway test store);
//! * **kube-apiserver** (v1.36.3) serving HTTPS on `127.0.0.1`, with a freshly generated CA, a
//!   CA-signed serving certificate for `127.0.0.1`/`localhost`, client-certificate authentication
//!   (the admin certificate is in `O=system:masters`), RBAC authorization and a service-account
//!   signing key and issuer;
//! * optionally **kube-controller-manager** ([`KubeEnvOptions::controller_manager`]), which brings
//!   garbage collection of owned objects, namespace deletion, default ServiceAccounts and the other
//!   built-in controllers. Without it the `ServiceAccount` admission plugin is disabled (there would
//!   be no default ServiceAccount to admit pods against), deleted namespaces stay `Terminating` and
//!   owned objects are never collected — exactly like controller-runtime's envtest.
//!
//! There is no kubelet and no scheduler: pods are accepted by the API but never run. The point is to
//! test the operator's API interactions — CRDs, RBAC, webhooks, status updates, Helm rendering and
//! installation — against the genuine API server rather than a mock.
//!
//! The binaries are built from source once and cached outside the repository by
//! `hack/control-plane.sh` (see [`KubeEnv::bin_dir`]); the first test run on a fresh machine pays
//! several minutes of Go compilation. Certificates are generated with the `openssl` command-line tool.
//!
//! Every environment gets free loopback ports and its own temporary directory holding the
//! certificates, the admin kubeconfig (usable by `kubectl` and `helm`, see [`KubeEnv::kubectl`] and
//! [`KubeEnv::helm`]) and the logs of every process; error messages include the tails of those logs.
//! Dropping the [`KubeEnv`] kills the processes and removes the directory (set
//! `AUTHREALM_KEEP_KUBE_ENV=1` to keep the directory for debugging). Each test should own its
//! environment: processes of an environment held in a `static` are never killed.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail, ensure};
use base64::Engine as _;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Environment variable naming a directory that already holds the control-plane binaries; when
/// set, [`KubeEnv::bin_dir`] uses it instead of running `hack/control-plane.sh`.
pub const BIN_DIR_ENV: &str = "AUTHREALM_CONTROL_PLANE_BIN";

/// Environment variable that, when set to a non-empty value, keeps an environment's temporary
/// directory (certificates, kubeconfig, logs) after the [`KubeEnv`] is dropped.
pub const KEEP_ENV: &str = "AUTHREALM_KEEP_KUBE_ENV";

/// The Kubernetes version `hack/control-plane.sh` builds.
pub const KUBERNETES_VERSION: &str = "v1.36.3";

/// How many lines of a log file error messages quote.
const LOG_TAIL_LINES: usize = 40;

/// Options for [`KubeEnv::start`].
#[derive(Debug, Clone)]
pub struct KubeEnvOptions {
    /// Also run kube-controller-manager (garbage collection, namespace deletion, default
    /// ServiceAccounts, …). Start-up then also waits for the `default` ServiceAccount, i.e. for the
    /// controllers to be running.
    pub controller_manager: bool,
    /// Extra `--flag=value` arguments appended to the kube-apiserver command line. A repeated
    /// scalar flag overrides the harness's value; list-valued flags (e.g.
    /// `--enable-admission-plugins`) accumulate.
    pub extra_apiserver_args: Vec<String>,
    /// Upper bound for each readiness wait (etcd, kube-apiserver, controller-manager).
    pub startup_timeout: Duration,
}

impl KubeEnvOptions {
    /// Options whose kube-apiserver writes a JSON audit log under `dir` by `policy` (an
    /// `audit.k8s.io/v1` Policy), in blocking mode: a request is in the log before it is answered.
    /// Returns the options and the log's path.
    pub fn audited(dir: &Path, policy: &str) -> std::io::Result<(KubeEnvOptions, PathBuf)> {
        std::fs::create_dir_all(dir)?;
        let policy_file = dir.join("audit-policy.yaml");
        std::fs::write(&policy_file, policy)?;
        let log = dir.join("audit.log");
        let opts = KubeEnvOptions {
            extra_apiserver_args: vec![
                format!("--audit-policy-file={}", policy_file.display()),
                format!("--audit-log-path={}", log.display()),
                "--audit-log-mode=blocking".into(),
                "--audit-log-format=json".into(),
            ],
            ..KubeEnvOptions::default()
        };
        Ok((opts, log))
    }
}

impl Default for KubeEnvOptions {
    fn default() -> Self {
        Self { controller_manager: false, extra_apiserver_args: Vec::new(), startup_timeout: Duration::from_secs(60) }
    }
}

/// A running etcd + kube-apiserver (+ kube-controller-manager) on loopback. See the module docs.
pub struct KubeEnv {
    dir: PathBuf,
    bin_dir: PathBuf,
    /// Children in start order; killed in reverse order on drop.
    processes: Vec<(&'static str, Child)>,
    server_url: String,
    kubeconfig: PathBuf,
    ca_pem: String,
    startup: Duration,
}

impl std::fmt::Debug for KubeEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeEnv").field("server_url", &self.server_url).field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl KubeEnv {
    /// Starts etcd and kube-apiserver (and kube-controller-manager if asked) on free loopback ports
    /// and waits until the API server reports `/readyz`. Builds the binaries first if needed.
    pub async fn start(opts: KubeEnvOptions) -> anyhow::Result<KubeEnv> {
        let bin_dir =
            tokio::task::spawn_blocking(Self::bin_dir).await.context("control-plane build task panicked")??;
        // Free ports are found by binding port 0 and releasing it, so another process can grab one
        // in between; a start that fails because an address is in use is retried with new ports.
        let mut attempt = 1;
        loop {
            match Self::start_once(&bin_dir, &opts).await {
                Ok(env) => return Ok(env),
                Err(err) if attempt < 3 && format!("{err:#}").contains("address already in use") => {
                    eprintln!("kube_env: port clash, retrying: {err:#}");
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn start_once(bin_dir: &Path, opts: &KubeEnvOptions) -> anyhow::Result<KubeEnv> {
        let started = Instant::now();
        let dir = make_temp_dir()?;
        let mut env = KubeEnv {
            dir: dir.clone(),
            bin_dir: bin_dir.to_owned(),
            processes: Vec::new(),
            server_url: String::new(),
            kubeconfig: dir.join("kubeconfig"),
            ca_pem: String::new(),
            startup: Duration::ZERO,
        };
        // From here on `env` owns the directory and the children: an early return drops it, which
        // cleans up.
        let pki = Pki::generate(&dir.join("pki"))?;
        env.ca_pem = fs::read_to_string(&pki.ca_cert)?;

        // --- etcd ---
        let (etcd_client, etcd_peer, apiserver_port) = {
            let listeners = [bind_loopback()?, bind_loopback()?, bind_loopback()?];
            let ports: Vec<u16> =
                listeners.iter().map(|l| l.local_addr().map(|a| a.port())).collect::<Result<_, _>>()?;
            (ports[0], ports[1], ports[2])
        };
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let etcd_peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let etcd_data = dir.join("etcd-data");
        env.spawn(
            "etcd",
            &[
                "--name=authrealm".into(),
                format!("--data-dir={}", etcd_data.display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={etcd_peer_url}"),
                format!("--initial-advertise-peer-urls={etcd_peer_url}"),
                format!("--initial-cluster=authrealm={etcd_peer_url}"),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
        )?;
        env.wait_until("etcd /health", opts.startup_timeout, || async move {
            http_get_loopback(etcd_client, "/health")
                .await
                .ok()
                .filter(|body| body.contains(r#""health":"true""#))
                .map(|_| ())
        })
        .await?;

        // --- kube-apiserver ---
        env.server_url = format!("https://127.0.0.1:{apiserver_port}");
        let mut args = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--cert-dir={}", pki.dir.display()),
            format!("--tls-cert-file={}", pki.serving_cert.display()),
            format!("--tls-private-key-file={}", pki.serving_key.display()),
            format!("--client-ca-file={}", pki.ca_cert.display()),
            format!("--secure-port={apiserver_port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--allow-privileged=true".into(),
            "--authorization-mode=RBAC".into(),
            format!("--service-account-issuer={}/", env.server_url),
            format!("--service-account-key-file={}", pki.sa_pub.display()),
            format!("--service-account-signing-key-file={}", pki.sa_key.display()),
            "--profiling=false".into(),
        ];
        if !opts.controller_manager {
            // Nothing would create the default ServiceAccount that this plugin insists on.
            args.push("--disable-admission-plugins=ServiceAccount".into());
        }
        args.extend(opts.extra_apiserver_args.iter().cloned());
        env.spawn("kube-apiserver", &args)?;
        env.write_kubeconfig(&pki)?;

        let client = env.client().await?;
        env.wait_until("kube-apiserver /readyz", opts.startup_timeout, || {
            let client = client.clone();
            async move {
                let req = http::Request::get("/readyz").body(Vec::new()).ok()?;
                client.request_text(req).await.ok().filter(|body| body.trim() == "ok").map(|_| ())
            }
        })
        .await?;
        eprintln!("kube_env: kube-apiserver ready at {} after {:.1?}", env.server_url, started.elapsed());

        // --- kube-controller-manager ---
        if opts.controller_manager {
            env.spawn(
                "kube-controller-manager",
                &[
                    format!("--kubeconfig={}", env.kubeconfig.display()),
                    format!("--authentication-kubeconfig={}", env.kubeconfig.display()),
                    format!("--authorization-kubeconfig={}", env.kubeconfig.display()),
                    "--leader-elect=false".into(),
                    "--controllers=*".into(),
                    format!("--root-ca-file={}", pki.ca_cert.display()),
                    format!("--service-account-private-key-file={}", pki.sa_key.display()),
                    format!("--cluster-signing-cert-file={}", pki.ca_cert.display()),
                    format!("--cluster-signing-key-file={}", pki.ca_key.display()),
                    "--use-service-account-credentials=false".into(),
                    // Its HTTPS endpoint is not needed, and the default port 10257 would clash
                    // between environments running in parallel.
                    "--secure-port=0".into(),
                    "--profiling=false".into(),
                ],
            )?;
            // The ServiceAccount controller creating `default/default` proves the controllers run.
            let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
            env.wait_until("kube-controller-manager (default ServiceAccount)", opts.startup_timeout, || {
                let sas = sas.clone();
                async move { sas.get_opt("default").await.ok().flatten().map(|_| ()) }
            })
            .await?;
            eprintln!("kube_env: kube-controller-manager running after {:.1?}", started.elapsed());
        }
        env.startup = started.elapsed();
        Ok(env)
    }

    /// The directory holding `etcd`, `kube-apiserver`, `kube-controller-manager` and `helm`.
    ///
    /// Uses `$AUTHREALM_CONTROL_PLANE_BIN` when set; otherwise runs `hack/control-plane.sh`, which
    /// builds the binaries when they are not cached yet (minutes, progress on stderr) and prints the
    /// directory as its last line of output. The result is memoised for the process.
    pub fn bin_dir() -> anyhow::Result<PathBuf> {
        static BIN_DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        BIN_DIR.get_or_init(|| locate_bin_dir().map_err(|e| format!("{e:#}"))).clone().map_err(|e| anyhow!(e))
    }

    /// Path of the admin kubeconfig (client certificate in `system:masters`, data inlined), usable
    /// by `kubectl --kubeconfig`, `helm --kubeconfig` and `KUBECONFIG=`.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// A new admin client for this API server.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// `https://127.0.0.1:PORT` of the API server.
    pub fn server_url(&self) -> String {
        self.server_url.clone()
    }

    /// PEM of the CA that signed the API server's serving certificate and the client certificates
    /// (it is also the `--client-ca-file`); e.g. for webhook `caBundle`s or extra clients.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// Creates a namespace and returns it.
    pub async fn create_namespace(&self, name: &str) -> anyhow::Result<Namespace> {
        let api: Api<Namespace> = Api::all(self.client().await?);
        let ns = Namespace {
            metadata: ObjectMeta { name: Some(name.to_owned()), ..ObjectMeta::default() },
            ..Namespace::default()
        };
        api.create(&PostParams::default(), &ns).await.with_context(|| format!("creating namespace {name}"))
    }

    /// Creates a namespace with a unique name starting with `prefix` and returns its name.
    pub async fn create_temp_namespace(&self, prefix: &str) -> anyhow::Result<String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        self.create_namespace(&name).await?;
        Ok(name)
    }

    /// A `kubectl` command (from `$PATH`) pointed at this API server with the admin kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    /// A `helm` command (the cached v3 build) pointed at this API server with the admin
    /// kubeconfig, with its cache/config/data directories inside this environment's directory.
    pub fn helm(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("helm"));
        let home = self.dir.join("helm");
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        cmd
    }

    /// The temporary directory of this environment (certificates in `pki/`, `kubeconfig`, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The log file of one of the processes (`etcd`, `kube-apiserver`, `kube-controller-manager`).
    pub fn log_path(&self, process: &str) -> PathBuf {
        self.dir.join(format!("{process}.log"))
    }

    /// How long [`KubeEnv::start`] took from creating the directory to readiness (excluding the
    /// one-off binary build).
    pub fn startup_duration(&self) -> Duration {
        self.startup
    }

    fn spawn(&mut self, name: &'static str, args: &[String]) -> anyhow::Result<()> {
        let log = File::create(self.log_path(name))?;
        let child = Command::new(self.bin_dir.join(name))
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", self.bin_dir.join(name).display()))?;
        self.processes.push((name, child));
        Ok(())
    }

    /// Polls `probe` every 100 ms until it yields `Some`, failing early when a child exits and
    /// after `timeout`, with the tails of all logs in the error.
    async fn wait_until<F, Fut>(&mut self, what: &str, timeout: Duration, probe: F) -> anyhow::Result<()>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Option<()>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if tokio::time::timeout(Duration::from_secs(5), probe()).await.ok().flatten().is_some() {
                return Ok(());
            }
            if let Some((name, status)) = self.exited()? {
                bail!("{name} exited ({status}) while waiting for {what}\n{}", self.log_tails());
            }
            if Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting for {what}\n{}", self.log_tails());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The first child that has exited, if any.
    fn exited(&mut self) -> anyhow::Result<Option<(&'static str, std::process::ExitStatus)>> {
        for (name, child) in &mut self.processes {
            if let Some(status) = child.try_wait()? {
                return Ok(Some((name, status)));
            }
        }
        Ok(None)
    }

    /// The tails of all logs, most recently started process first.
    fn log_tails(&self) -> String {
        let mut out = String::new();
        if std::env::var_os(KEEP_ENV).is_none() {
            let _ = writeln!(out, "(set {KEEP_ENV}=1 to keep {})", self.dir.display());
        }
        for (name, _) in self.processes.iter().rev() {
            let path = self.log_path(name);
            let _ = writeln!(
                out,
                "--- last {LOG_TAIL_LINES} lines of {} ---\n{}",
                path.display(),
                tail(&path, LOG_TAIL_LINES)
            );
        }
        out
    }

    fn write_kubeconfig(&self, pki: &Pki) -> anyhow::Result<()> {
        let b64 = |path: &Path| -> anyhow::Result<String> {
            Ok(base64::engine::general_purpose::STANDARD.encode(fs::read(path)?))
        };
        let kubeconfig = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: authrealm-test
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: authrealm-test
  context:
    cluster: authrealm-test
    user: admin
    namespace: default
current-context: authrealm-test
",
            server = self.server_url,
            ca = b64(&pki.ca_cert)?,
            cert = b64(&pki.admin_cert)?,
            key = b64(&pki.admin_key)?,
        );
        let mut file = File::create(&self.kubeconfig)?;
        file.write_all(kubeconfig.as_bytes())?;
        Ok(())
    }
}

impl Drop for KubeEnv {
    fn drop(&mut self) {
        for (_, child) in self.processes.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::env::var_os(KEEP_ENV).is_some_and(|v| !v.is_empty()) {
            eprintln!("kube_env: keeping {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn locate_bin_dir() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os(BIN_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/control-plane.sh");
            let output = Command::new("bash")
                .arg(&script)
                .stdin(Stdio::null())
                .stderr(Stdio::inherit())
                .output()
                .with_context(|| format!("running {}", script.display()))?;
            ensure!(
                output.status.success(),
                "{} failed ({}); its progress log is above",
                script.display(),
                output.status
            );
            let stdout = String::from_utf8(output.stdout)?;
            let last = stdout
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .with_context(|| format!("{} printed no bin directory", script.display()))?;
            PathBuf::from(last.trim())
        }
    };
    for bin in ["etcd", "kube-apiserver", "kube-controller-manager", "helm"] {
        ensure!(
            dir.join(bin).is_file(),
            "{} has no {bin} (from ${BIN_DIR_ENV} or hack/control-plane.sh)",
            dir.display()
        );
    }
    Ok(dir)
}

/// Creates a fresh, uniquely named directory under the system temporary directory.
fn make_temp_dir() -> anyhow::Result<PathBuf> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.subsec_nanos();
    loop {
        let dir = std::env::temp_dir().join(format!(
            "authrealm-kube-{}-{}-{nanos:08x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
}

fn bind_loopback() -> anyhow::Result<TcpListener> {
    TcpListener::bind(("127.0.0.1", 0)).context("binding a loopback port")
}

/// A minimal HTTP/1.0 GET against `127.0.0.1:port`, returning the body on a 200.
async fn http_get_loopback(port: u16, path: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").context("malformed HTTP response")?;
    ensure!(head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"), "{head}");
    Ok(body.to_owned())
}

/// The last `lines` lines of a file (or why it could not be read).
fn tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Err(e) = File::open(path).and_then(|mut f| f.read_to_string(&mut text)) {
        return format!("<cannot read: {e}>");
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Key material of one environment, generated with the `openssl` CLI into `dir`.
struct Pki {
    dir: PathBuf,
    ca_cert: PathBuf,
    ca_key: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    admin_cert: PathBuf,
    admin_key: PathBuf,
    sa_key: PathBuf,
    sa_pub: PathBuf,
}

impl Pki {
    fn generate(dir: &Path) -> anyhow::Result<Pki> {
        fs::create_dir_all(dir)?;
        let pki = Pki {
            dir: dir.to_owned(),
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            serving_cert: dir.join("apiserver.crt"),
            serving_key: dir.join("apiserver.key"),
            admin_cert: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            sa_key: dir.join("sa.key"),
            sa_pub: dir.join("sa.pub"),
        };
        let days = "3650";
        // CA (ECDSA P-256: fast to generate, supported by Go and rustls alike).
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            path_str(&pki.ca_key)?,
            "-out",
            path_str(&pki.ca_cert)?,
            "-days",
            days,
            "-subj",
            "/CN=authrealm-test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        ])?;
        pki.issue(
            "apiserver",
            "/CN=kube-apiserver",
            "subjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,\
             DNS:kubernetes.default,DNS:kubernetes.default.svc,\
             DNS:kubernetes.default.svc.cluster.local\n\
             extendedKeyUsage=serverAuth\n",
        )?;
        pki.issue("admin", "/O=system:masters/CN=authrealm-admin", "extendedKeyUsage=clientAuth\n")?;
        // Service-account token signing key: RSA, the algorithm every consumer supports.
        openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", path_str(&pki.sa_key)?])?;
        openssl(&["pkey", "-in", path_str(&pki.sa_key)?, "-pubout", "-out", path_str(&pki.sa_pub)?])?;
        Ok(pki)
    }

    /// Issues `<name>.crt`/`<name>.key` signed by the CA with the given subject and extensions.
    fn issue(&self, name: &str, subject: &str, extensions: &str) -> anyhow::Result<()> {
        let key = self.dir.join(format!("{name}.key"));
        let csr = self.dir.join(format!("{name}.csr"));
        let cert = self.dir.join(format!("{name}.crt"));
        let ext = self.dir.join(format!("{name}.ext"));
        fs::write(
            &ext,
            format!(
                "basicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature,keyEncipherment\n\
                 {extensions}"
            ),
        )?;
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            path_str(&key)?,
            "-out",
            path_str(&csr)?,
            "-subj",
            subject,
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            path_str(&csr)?,
            "-CA",
            path_str(&self.ca_cert)?,
            "-CAkey",
            path_str(&self.ca_key)?,
            "-CAcreateserial",
            "-CAserial",
            path_str(&self.dir.join("ca.srl"))?,
            "-days",
            "3650",
            "-extfile",
            path_str(&ext)?,
            "-out",
            path_str(&cert)?,
        ])?;
        Ok(())
    }
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str().with_context(|| format!("non-UTF-8 path {}", path.display()))
}

fn openssl(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running openssl (is it installed?)")?;
    ensure!(
        output.status.success(),
        "openssl {} failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}
