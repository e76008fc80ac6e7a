//! A real standalone Redis on loopback for tests: one `redis-server` on a free port, optionally
//! with replicas (`--replicaof`), which only matter for `WAIT`.
//!
//! Synchronous (std::process), like [`crate::redis_cluster`]: start it before the runtime or
//! inside `spawn_blocking`.
//!
//! The server runs with `--appendonly yes --appendfsync always`, so every acknowledged write
//! survives [`RedisStandalone::kill`] + [`RedisStandalone::restart`] (same port, same data dir).
//! That is the test's choice: what a real standalone Redis keeps across a crash is its operator's
//! persistence configuration (with Redis' default `appendfsync everysec`, up to a second of
//! acknowledged writes; with no persistence, everything). [`RedisStandaloneOptions::appendonly`]
//! turns persistence off to test that case.
//!
//! Everything (data dirs, logs) lives in one temp dir removed on drop (`AUTHREALM_KEEP_REDIS=1`
//! keeps it); every process is SIGKILLed on drop; node logs are printed when a test panics.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::redis_cluster::{check_binaries, log_tail, make_temp_dir, parse_info, replica_lines, run_with_timeout};

const HOST: &str = "127.0.0.1";
const START_ATTEMPTS: usize = 4;
const UP_TIMEOUT: Duration = Duration::from_secs(10);
const CLI_TIMEOUT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(50);

/// Options for [`RedisStandalone::start_with`].
#[derive(Debug, Clone)]
pub struct RedisStandaloneOptions {
    /// Replicas of the server (each `--replicaof` it), 0 or more.
    pub replicas: usize,
    /// `--requirepass` (and `--masterauth` on the replicas).
    pub password: Option<String>,
    /// `--appendonly yes --appendfsync always` on the server (default true): acknowledged writes
    /// survive a kill -9 and restart. False: no persistence at all (`--save ""`).
    pub appendonly: bool,
}

impl Default for RedisStandaloneOptions {
    fn default() -> Self {
        Self { replicas: 0, password: None, appendonly: true }
    }
}

struct Proc {
    port: u16,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn addr(&self) -> String {
        format!("{HOST}:{}", self.port)
    }
}

/// A running standalone Redis; see the module docs.
pub struct RedisStandalone {
    opts: RedisStandaloneOptions,
    root: PathBuf,
    server: Proc,
    replicas: Vec<Proc>,
}

impl RedisStandalone {
    /// One server with `replicas` replicas, appendonly on, no password; returns once the server
    /// answers and every replica is `state=online` at it.
    pub fn start(replicas: usize) -> Result<Self> {
        Self::start_with(RedisStandaloneOptions { replicas, ..RedisStandaloneOptions::default() })
    }

    pub fn start_with(opts: RedisStandaloneOptions) -> Result<Self> {
        check_binaries()?;
        let root = make_temp_dir()?;
        let server =
            Proc { port: 0, dir: root.join("server"), log: root.join("server").join("redis.log"), child: None };
        let mut me = RedisStandalone { opts, root, server, replicas: Vec::new() };
        fs::create_dir(&me.server.dir)?;
        me.server.port = me.spawn_fresh(Role::Server)?;
        for i in 0..me.opts.replicas {
            let dir = me.root.join(format!("replica-{i}"));
            fs::create_dir(&dir)?;
            me.replicas.push(Proc { port: 0, log: dir.join("redis.log"), dir, child: None });
            me.replicas[i].port = me.spawn_fresh(Role::Replica(i))?;
        }
        me.wait_replication(Duration::from_secs(30))?;
        Ok(me)
    }

    /// Starts the process of `role` on a new free port (retrying when the port was taken
    /// between picking and binding); returns the port.
    fn spawn_fresh(&mut self, role: Role) -> Result<u16> {
        let mut errors = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let port = crate::support::pick_port()?;
            self.proc_mut(role).port = port;
            let child = self.spawn(role)?;
            self.proc_mut(role).child = Some(child);
            match self.wait_up(role) {
                Ok(()) => return Ok(port),
                Err(e) => {
                    self.stop(role);
                    errors.push(format!("port {port}: {e:#}"));
                }
            }
        }
        bail!("could not start redis-server:\n{}", errors.join("\n"))
    }

    fn proc_ref(&self, role: Role) -> &Proc {
        match role {
            Role::Server => &self.server,
            Role::Replica(i) => &self.replicas[i],
        }
    }

    fn proc_mut(&mut self, role: Role) -> &mut Proc {
        match role {
            Role::Server => &mut self.server,
            Role::Replica(i) => &mut self.replicas[i],
        }
    }

    fn spawn(&self, role: Role) -> Result<Child> {
        let p = self.proc_ref(role);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p.log)
            .with_context(|| format!("{}", p.log.display()))?;
        let log2 = log.try_clone()?;
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(p.port.to_string())
            .args(["--bind", HOST, "--daemonize", "no", "--save", ""])
            .arg("--dir")
            .arg(&p.dir)
            .args(["--repl-diskless-sync-delay", "0"]);
        match role {
            Role::Server if self.opts.appendonly => {
                cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
            }
            Role::Server => {
                cmd.args(["--appendonly", "no"]);
            }
            Role::Replica(_) => {
                cmd.args(["--appendonly", "no", "--replicaof", HOST]).arg(self.server.port.to_string());
            }
        }
        if let Some(pw) = &self.opts.password {
            cmd.arg("--requirepass").arg(pw).arg("--masterauth").arg(pw);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .context("spawning redis-server (run hack/install-deps.sh?)")
    }

    /// Until the process answers PING with PONG (not `LOADING`); fails early if it exits.
    fn wait_up(&mut self, role: Role) -> Result<()> {
        let deadline = Instant::now() + UP_TIMEOUT;
        let addr = self.proc_ref(role).addr();
        loop {
            let p = self.proc_mut(role);
            if let Some(child) = p.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                p.child = None;
                bail!("redis-server {addr} exited ({status}); log:\n{}", log_tail(&p.log));
            }
            let last = match self.cli_at(&addr, &["PING"]) {
                Ok(r) if r.trim() == "PONG" => return Ok(()),
                Ok(r) => r,
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "redis-server {addr} not answering PING after {UP_TIMEOUT:?} (last: {last}); log:\n{}",
                    log_tail(&self.proc_ref(role).log)
                );
            }
            thread::sleep(POLL);
        }
    }

    /// `127.0.0.1:PORT` of the server.
    pub fn addr(&self) -> String {
        self.server.addr()
    }

    /// `[addr()]`: what `redis.endpoints` names.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.addr()]
    }

    pub fn replica_addrs(&self) -> Vec<String> {
        self.replicas.iter().map(Proc::addr).collect()
    }

    pub fn password(&self) -> Option<&str> {
        self.opts.password.as_deref()
    }

    pub fn is_running(&self) -> bool {
        self.server.child.is_some()
    }

    pub fn root_dir(&self) -> &Path {
        &self.root
    }

    /// `redis-cli` on the server.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        self.cli_at(&self.addr(), args)
    }

    /// `redis-cli -e -h HOST -p PORT [-a PASSWORD] ARGS…` on any process of this setup; stdout
    /// without its trailing newline. Error replies and connection failures are errors.
    pub fn cli_at(&self, addr: &str, args: &[&str]) -> Result<String> {
        let (host, port) = addr.rsplit_once(':').ok_or_else(|| anyhow!("{addr:?} is not HOST:PORT"))?;
        let mut cmd = Command::new("redis-cli");
        if let Some(pw) = &self.opts.password {
            cmd.arg("-a").arg(pw).arg("--no-auth-warning");
        }
        cmd.args(["-e", "-h", host, "-p", port]).args(args);
        run_with_timeout(cmd, CLI_TIMEOUT)
            .with_context(|| format!("redis-cli {}", args.join(" ")))?
            .stdout_of_success(port, args)
    }

    /// SIGKILLs the server (and reaps it). Replicas keep running (and keep retrying the link).
    pub fn kill(&mut self) -> Result<()> {
        let mut child = self.server.child.take().ok_or_else(|| anyhow!("{} is not running", self.addr()))?;
        let killed = child.kill();
        child.wait().context("reaping redis-server")?;
        killed.context("killing redis-server")
    }

    /// Starts the server again on the same port with the same data dir (so with appendonly the
    /// same data); returns once it answers PING (data loaded). Follow with
    /// [`wait_replication`](Self::wait_replication) when replicas matter.
    pub fn restart(&mut self) -> Result<()> {
        ensure!(self.server.child.is_none(), "{} is still running", self.addr());
        let child = self.spawn(Role::Server)?;
        self.server.child = Some(child);
        self.wait_up(Role::Server)
    }

    /// Freezes the server with SIGSTOP (sockets open, no answers); undo with
    /// [`resume`](Self::resume).
    pub fn pause(&self) -> Result<()> {
        self.pause_at(&self.addr())
    }

    pub fn resume(&self) -> Result<()> {
        self.resume_at(&self.addr())
    }

    /// SIGSTOP of the process at `addr` (the server or a replica).
    pub fn pause_at(&self, addr: &str) -> Result<()> {
        self.signal(addr, "-STOP")
    }

    /// SIGCONT of the process at `addr`.
    pub fn resume_at(&self, addr: &str) -> Result<()> {
        self.signal(addr, "-CONT")
    }

    fn signal(&self, addr: &str, sig: &str) -> Result<()> {
        let p = std::iter::once(&self.server)
            .chain(&self.replicas)
            .find(|p| p.addr() == addr)
            .ok_or_else(|| anyhow!("{addr} is not part of this setup"))?;
        let pid = p.child.as_ref().with_context(|| format!("{addr} is not running"))?.id();
        let status = Command::new("kill").arg(sig).arg(pid.to_string()).status().context("running kill")?;
        ensure!(status.success(), "kill {sig} {pid} failed: {status}");
        Ok(())
    }

    /// Until the server says `role:master` and lists every running replica `state=online`.
    pub fn wait_replication(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let want: Vec<u16> = self.replicas.iter().filter(|r| r.child.is_some()).map(|r| r.port).collect();
        loop {
            let problem = match self.cli(&["INFO", "replication"]) {
                Ok(text) => {
                    let info = parse_info(&text);
                    let online: Vec<u16> =
                        replica_lines(&info).into_iter().filter(|r| r.state == "online").map(|r| r.port).collect();
                    if info.get("role").map(String::as_str) != Some("master") {
                        format!("role {:?}", info.get("role"))
                    } else if let Some(p) = want.iter().find(|p| !online.contains(p)) {
                        format!("replica {p} not online (online: {online:?})")
                    } else {
                        // "online" is not yet acknowledging writes in time (a replica still
                        // loading or rewriting its AOF after the sync): a first mint's WAIT then
                        // timed out in CI. Settled = a write acknowledged by every replica.
                        match self.write_acknowledged(want.len()) {
                            Ok(n) if n >= want.len() => return Ok(()),
                            Ok(n) => format!("a write acknowledged by {n} of {} replicas", want.len()),
                            Err(e) => format!("{e:#}"),
                        }
                    }
                }
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!("replication not settled after {timeout:?}: {problem}\n{}", self.log_tails());
            }
            thread::sleep(POLL);
        }
    }

    /// `SET`, `WAIT replicas 1000`, `DEL` on one connection (redis-cli reading them from stdin):
    /// how many replicas acknowledged the write. The probe key is deleted again, and replicas
    /// apply that before any later write, so it never shows in a test's key counts.
    fn write_acknowledged(&self, replicas: usize) -> Result<usize> {
        use std::io::Write as _;
        let mut cmd = Command::new("redis-cli");
        if let Some(pw) = &self.opts.password {
            cmd.arg("-a").arg(pw).arg("--no-auth-warning");
        }
        let mut child = cmd
            .args(["-h", HOST, "-p", &self.server.port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("running redis-cli")?;
        child.stdin.take().context("redis-cli stdin")?.write_all(
            format!(
                "SET authrealm-test:replication-probe 1\nWAIT {replicas} 1000\nDEL authrealm-test:replication-probe\n"
            )
            .as_bytes(),
        )?;
        let out = child.wait_with_output().context("redis-cli")?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().nth(1).and_then(|l| l.trim().parse().ok()).ok_or_else(|| anyhow!("WAIT answered {text:?}"))
    }

    fn log_tails(&self) -> String {
        std::iter::once(&self.server)
            .chain(&self.replicas)
            .map(|p| format!("--- {} log {}:\n{}\n", p.addr(), p.log.display(), log_tail(&p.log)))
            .collect()
    }

    fn stop(&mut self, role: Role) {
        if let Some(mut c) = self.proc_mut(role).child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Role {
    Server,
    Replica(usize),
}

impl Drop for RedisStandalone {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("RedisStandalone dropped during a panic; logs:\n{}", self.log_tails());
        }
        // SIGKILL also ends a server left paused (SIGSTOP).
        for i in 0..self.replicas.len() {
            self.stop(Role::Replica(i));
        }
        self.stop(Role::Server);
        if std::env::var_os("AUTHREALM_KEEP_REDIS").is_some_and(|v| !v.is_empty() && v != "0") {
            eprintln!("RedisStandalone: keeping {}", self.root.display());
        } else {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}
