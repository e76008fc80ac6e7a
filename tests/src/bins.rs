//! The workspace's binaries for the harnesses: built once by the test command, found here.
//!
//! `hack/test.sh` runs `cargo test --workspace --no-run` first and exports `AUTHREALM_BIN_DIR`
//! (the profile directory holding `authrealm-operator` and `authrealm-sidecar`), so no test ever
//! runs cargo. A suite run on its own (`cargo test -p authrealm-tests --test sidecar_proxy`)
//! without it falls back to one `cargo build` of the binary per test process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context as _, Result, ensure};

/// `authrealm-sidecar`: `$AUTHREALM_SIDECAR_BIN`, else `$AUTHREALM_BIN_DIR/authrealm-sidecar`,
/// else built.
pub fn sidecar() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| find("AUTHREALM_SIDECAR_BIN", "authrealm-sidecar").map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

/// `authrealm-operator`: `$AUTHREALM_OPERATOR_BIN`, else `$AUTHREALM_BIN_DIR/authrealm-operator`,
/// else built.
pub fn operator() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| find("AUTHREALM_OPERATOR_BIN", "authrealm-operator").map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn find(var: &str, name: &str) -> Result<PathBuf> {
    let given = std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("AUTHREALM_BIN_DIR").filter(|v| !v.is_empty()).map(|d| Path::new(&d).join(name)));
    if let Some(path) = given {
        ensure!(path.is_file(), "{} does not exist (from {var} / AUTHREALM_BIN_DIR)", path.display());
        return Ok(path);
    }
    let dir = profile_dir()?;
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "-q", "-p", name, "--bin", name]);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().with_context(|| format!("cargo build -p {name}"))?;
    ensure!(status.success(), "cargo build -p {name} failed");
    Ok(dir.join(name))
}

/// The cargo profile directory of the running test binary (`target/<profile>/deps/<exe>` →
/// `target/<profile>`), where cargo puts the workspace's binaries.
pub fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    exe.parent().and_then(Path::parent).map(Path::to_path_buf).context("no target/<profile> above the test binary")
}
