//! The binary's command line: keygen output is a usable key set; config errors exit
//! non-zero with one line naming the field.

use std::process::Command;

use authrealm_contract::{KeySet, KeyState, SidecarConfig};
use authrealm_tests::sidecar::sidecar_bin;

fn tmp(name: &str) -> authrealm_tests::support::TempDir {
    authrealm_tests::support::TempDir::new(&format!("authrealm-cli-{name}")).unwrap()
}

#[test]
fn keygen_writes_a_key_set_the_sidecar_accepts() {
    let bin = sidecar_bin().unwrap();
    let d = tmp("keygen");
    let keys = d.join("keyset.json");
    let public = d.join("public.json");
    for alg in ["ES256", "ES384", "RS256", "PS256", "EdDSA", "HS512"] {
        let out = Command::new(&bin)
            .args(["keygen", "--alg", alg, "--out"])
            .arg(&keys)
            .arg("--public-out")
            .arg(&public)
            .output()
            .unwrap();
        assert!(out.status.success(), "{alg}: {}", String::from_utf8_lossy(&out.stderr));
        let set = KeySet::from_json(&std::fs::read(&keys).unwrap()).unwrap();
        assert_eq!(set.keys.len(), 1);
        assert_eq!(set.keys[0].alg.as_str(), alg);
        assert_eq!(set.keys[0].kid, String::from_utf8_lossy(&out.stdout).trim());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777,
            0o600,
            "private key set readable by others"
        );
        let public_set = KeySet::from_json(&std::fs::read(&public).unwrap()).unwrap();
        assert!(!public_set.has_private_material());
    }
    // --rotate keeps the old key (retired) and adds a new current one.
    let out = Command::new(&bin).args(["keygen", "--alg", "HS512", "--rotate", "--out"]).arg(&keys).output().unwrap();
    assert!(out.status.success());
    let set = KeySet::from_json(&std::fs::read(&keys).unwrap()).unwrap();
    assert_eq!(set.keys.iter().map(|k| k.state).collect::<Vec<_>>(), [KeyState::Retired, KeyState::Current]);

    let cfg_path = d.join("sidecar.json");
    let cfg = SidecarConfig::example("demo", keys.to_str().unwrap(), None);
    std::fs::write(&cfg_path, cfg.to_json_pretty()).unwrap();
    let out = Command::new(&bin).args(["check-config", "--config"]).arg(&cfg_path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("can mint: true"));
    drop(d); // removes the directory
}

#[test]
fn config_errors_exit_non_zero_with_one_line_naming_the_field() {
    let bin = sidecar_bin().unwrap();
    let d = tmp("badcfg");
    let cfg_path = d.join("sidecar.json");
    let good = SidecarConfig::example("demo", "/nonexistent/keyset.json", Some(vec!["127.0.0.1:7000".into()]));
    let mut cases: Vec<(serde_json::Value, &str)> = vec![];
    let mut v = serde_json::to_value(&good).unwrap();
    v["audiences"] = serde_json::json!([]);
    cases.push((v, "audiences"));
    let mut v = serde_json::to_value(&good).unwrap();
    v["redis"]["endpoints"] = serde_json::json!(["no-port"]);
    cases.push((v, "redis.endpoints[0]"));
    let mut v = serde_json::to_value(&good).unwrap();
    v["listeners"]["issuer"] = serde_json::json!("0.0.0.0:8444");
    cases.push((v, "listeners.issuer"));
    let mut v = serde_json::to_value(&good).unwrap();
    v["sesionMode"] = serde_json::json!("multi");
    cases.push((v, "sesionMode"));
    cases.push((serde_json::to_value(&good).unwrap(), "keySetFile"));
    for (cfg, field) in cases {
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let out = Command::new(&bin).args(["run", "--config"]).arg(&cfg_path).output().unwrap();
        assert_eq!(out.status.code(), Some(78), "{field}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(field), "{field} not named in: {stderr}");
    }
    drop(d); // removes the directory
}
