//! Helpers every suite shares (the operator's tests through `operator/tests/common`, the
//! webhook/Helm suites through `tests/tests/webhook_support`, the node suite directly): one way to
//! wait for a condition, to pick a port, and to install the committed CRD.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};

/// Polls `probe` every 100 ms until it returns `Ok(Some(v))`; fails after `timeout` with the
/// description and the probe's last error.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match probe().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(format!("{e:#}")),
        }
        if Instant::now() >= deadline {
            match last_err {
                Some(e) => bail!("timed out after {timeout:?} waiting for {what} (last error: {e})"),
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// [`wait_for`] for probes that cannot fail: `Some(v)` ends the wait.
pub async fn wait_for_some<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_for(what, timeout, || {
        let fut = probe();
        async move { Ok(fut.await) }
    })
    .await
}

/// A fresh directory under the system temp dir (`<prefix>-<pid>-<n>`), removed with its content
/// when dropped — also when the test fails.
#[derive(Debug)]
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> std::io::Result<TempDir> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free loopback port (bound, then released for the caller to bind), below the kernel's
/// ephemeral range when possible: a port from `bind(0)` is handed out again to the next
/// `bind(0)` or outgoing connection of any test running beside, which then takes it before the
/// caller (a sidecar failing with "Address already in use" was seen in CI). Ports below the range
/// are only ever taken by someone asking for that number.
pub fn free_port() -> u16 {
    pick_port().expect("a free port")
}

/// [`free_port`], or why there is none.
pub fn pick_port() -> anyhow::Result<u16> {
    let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(32768);
    let (lo, hi) = if ephemeral_low > 12000 { (10000u32, ephemeral_low) } else { (20000, 30000) };
    for _ in 0..200 {
        let port = (lo + (crate::redis_cluster::random_u64() % u64::from(hi - lo)) as u32) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port found in {lo}..{hi}")
}

pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or_default()
}

/// The repository's committed CRD file, `crds/authrealm.yaml` — what users install.
pub fn committed_crd() -> anyhow::Result<CustomResourceDefinition> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/authrealm.yaml");
    let yaml = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    serde_yaml_ng::from_str(&yaml).context("parse crds/authrealm.yaml")
}

/// Creates the committed CRD and waits until it is established and AuthRealms are served.
pub async fn install_crd(client: &Client) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    api.create(&PostParams::default(), &committed_crd()?).await.context("creating the AuthRealm CRD")?;
    wait_for("the AuthRealm CRD established", Duration::from_secs(30), || {
        let api = api.clone();
        async move {
            let crd = api.get("authrealms.authrealm.dev").await?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Established" && c.status == "True"));
            Ok(established.then_some(()))
        }
    })
    .await?;
    // Discovery may lag the Established condition by a moment.
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("authrealm.dev", "v1alpha1", "AuthRealm"),
        "authrealms",
    );
    let realms: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    wait_for("AuthRealms served", Duration::from_secs(30), || {
        let realms = realms.clone();
        async move { Ok(realms.list(&ListParams::default().limit(1)).await.ok().map(|_| ())) }
    })
    .await
}

/// A one-document YAML file (e.g. a manifest under `examples/`) as JSON.
pub fn yaml_file(path: impl AsRef<Path>) -> anyhow::Result<serde_json::Value> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml_ng::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::TempDir;

    #[test]
    fn a_temp_dir_is_unique_and_gone_with_its_content_when_dropped() {
        let a = TempDir::new("authrealm-support-test").unwrap();
        let b = TempDir::new("authrealm-support-test").unwrap();
        assert_ne!(a.path(), b.path());
        std::fs::create_dir_all(a.join("sub")).unwrap();
        std::fs::write(a.join("sub/file"), b"x").unwrap();
        let path = a.path().to_owned();
        drop(a);
        assert!(!path.exists(), "{} left behind", path.display());
        assert!(b.path().exists());
    }
}
