//! From an [`AuthRealm`] to what the injector needs: its [`RealmState`] for [`super::decide::decide`],
//! carrying, for a ready realm, the [`SidecarPlan`] for [`super::mutate::mutate`]. Pure.
//!
//! Ports, mount paths and environment names are read from the sidecar config the operator renders
//! for the realm ([`render::resolve`], the `sidecar.json` the sidecar itself reads), so the pod
//! and the config cannot disagree; only what the config does not carry (Secret names and keys,
//! image, resources) comes from the spec.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::ResourceExt as _;

use super::decide::{RealmState, Role};
use super::mutate::{RedisCaRef, RedisCredentialRefs, SidecarPlan};
use crate::conditions::{KEYS_READY, find};
use crate::crd::AuthRealm;
use crate::render;

/// Sidecar settings that come from the operator's configuration rather than the realm.
#[derive(Clone, Debug, PartialEq)]
pub struct SidecarDefaults {
    /// Image used when the realm does not name one.
    pub image: String,
    pub image_pull_policy: Option<String>,
    /// Resources used when the realm does not set them.
    pub resources: ResourceRequirements,
}

/// Requests 50m CPU / 32Mi memory, memory limit 128Mi, no CPU limit (throttling a proxy on the
/// request path hurts latency more than it saves).
pub fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity("50m".into())),
            ("memory".to_owned(), Quantity("32Mi".into())),
        ])),
        limits: Some(BTreeMap::from([("memory".to_owned(), Quantity("128Mi".into()))])),
        ..ResourceRequirements::default()
    }
}

/// The realm's state as the decision sees it, with the sidecar plan of a ready realm (for the
/// verifier role; [`SidecarPlan::role`] is set from the decision). `None`: no such AuthRealm.
///
/// A pod can run once the realm's keys and config are in place: the operator reports
/// `KeysReady=True` only from a reconcile that wrote the keys Secret, the JWKS ConfigMap and the
/// sidecar ConfigMap of a valid spec, and only while the current key can sign. `Ready` is not
/// the gate: it also requires `RedisReachable`, the operator's own periodic check, which a
/// short failover, or a network path the operator lacks and the pods have, would turn into
/// refused pods. The sidecar checks Redis itself (`/readyz`, `failurePolicy`). A spec changed
/// since into one that does not resolve is not ready either (there is no config to follow).
pub fn realm_state(realm: Option<&AuthRealm>, defaults: &SidecarDefaults) -> RealmState<SidecarPlan> {
    let Some(realm) = realm else { return RealmState::NotFound };
    let conditions = realm.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    match find(conditions, KEYS_READY) {
        Some(c) if c.status == "True" => match sidecar_plan(realm, defaults) {
            Ok(plan) => RealmState::Ready { hmac: realm.spec.algorithm.is_symmetric(), realm: plan },
            Err(e) => RealmState::NotReady(format!("its spec does not resolve: {e}")),
        },
        Some(c) if c.message.is_empty() => RealmState::NotReady(format!("{KEYS_READY}={}: {}", c.status, c.reason)),
        Some(c) => RealmState::NotReady(format!("{KEYS_READY}={}: {}: {}", c.status, c.reason, c.message)),
        None => RealmState::NotReady("the operator has not reported on it yet".into()),
    }
}

/// The port of a listener address of the rendered config.
fn listener_port(field: &str, addr: &str) -> Result<u16, String> {
    addr.parse::<SocketAddr>().map(|a| a.port()).map_err(|e| format!("listeners.{field} {addr:?}: {e}"))
}

/// Directory and file name of a path of the rendered config.
fn split_path(field: &str, path: &str) -> Result<(String, String), String> {
    let p = Path::new(path);
    match (p.parent().and_then(Path::to_str), p.file_name().and_then(|f| f.to_str())) {
        (Some(dir), Some(file)) if !dir.is_empty() => Ok((dir.to_owned(), file.to_owned())),
        _ => Err(format!("{field} {path:?} is not a file path")),
    }
}

/// The verifier's sidecar of `realm`: what its rendered config names, and the Secrets, image
/// and resources from the spec (or the operator's defaults).
pub fn sidecar_plan(realm: &AuthRealm, defaults: &SidecarDefaults) -> Result<SidecarPlan, String> {
    let name = realm.name_any();
    let config =
        render::resolve(&name, &realm.namespace().unwrap_or_default(), &realm.spec).map_err(|e| e.to_string())?.config;
    let (keys_mount_dir, key_file) = split_path("keySetFile", &config.key_set_file)?;
    if key_file != render::KEYSET_KEY {
        return Err(format!("keySetFile {:?} is not the mounted {}", config.key_set_file, render::KEYSET_KEY));
    }
    let spec = &realm.spec;
    let redis_spec = spec.redis.as_ref();
    let redis = match (redis_spec.and_then(|r| r.credentials.as_ref()), config.redis.as_ref()) {
        (Some(c), Some(rendered)) => Some(RedisCredentialRefs {
            secret_name: c.secret_name.clone(),
            password_key: c.password_key.clone(),
            username_key: c.username_key.clone(),
            password_env: rendered.password_env.clone(),
            username_env: rendered.username_env.clone(),
        }),
        _ => None,
    };
    let ca_secret = redis_spec.and_then(|r| r.tls.as_ref()).and_then(|t| t.ca_secret.as_ref());
    let ca_file = config.redis.as_ref().and_then(|r| r.tls.as_ref()).and_then(|t| t.ca_file.as_deref());
    let redis_ca = match (ca_secret, ca_file) {
        (Some(s), Some(file)) => {
            let (mount_dir, file) = split_path("redis.tls.caFile", file)?;
            Some(RedisCaRef { secret: s.name.clone(), key: s.key.clone(), mount_dir, file })
        }
        _ => None,
    };
    Ok(SidecarPlan {
        realm: name,
        role: Role::Verifier,
        image: spec.sidecar.image.clone().unwrap_or_else(|| defaults.image.clone()),
        image_pull_policy: defaults.image_pull_policy.clone(),
        public_port: listener_port("public", &config.listeners.public)?,
        issuer_port: listener_port("issuer", &config.listeners.issuer)?,
        admin_port: listener_port("admin", &config.listeners.admin)?,
        keys_mount_dir,
        resources: spec.sidecar.resources.clone().unwrap_or_else(|| defaults.resources.clone()),
        redis,
        redis_ca,
        issuer_cas: crate::issuers::ca_bundles(&spec.external_issuers),
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use serde_json::json;

    use super::*;
    use crate::crd::AuthRealmStatus;

    fn realm(spec: serde_json::Value) -> AuthRealm {
        let mut r = AuthRealm::new("demo", serde_json::from_value(spec).unwrap());
        r.metadata.namespace = Some("team-a".into());
        r
    }

    fn with_conditions(mut r: AuthRealm, conds: &[(&str, &str, &str, &str)]) -> AuthRealm {
        r.status = Some(AuthRealmStatus {
            conditions: conds
                .iter()
                .map(|(type_, status, reason, message)| Condition {
                    type_: (*type_).into(),
                    status: (*status).into(),
                    reason: (*reason).into(),
                    message: (*message).into(),
                    last_transition_time: Time(Default::default()),
                    observed_generation: None,
                })
                .collect(),
            ..AuthRealmStatus::default()
        });
        r
    }

    fn defaults() -> SidecarDefaults {
        SidecarDefaults { image: "sidecar:default".into(), image_pull_policy: None, resources: default_resources() }
    }

    #[test]
    fn pods_need_keys_and_config_not_a_redis_check() {
        let base = realm(json!({"issuer": "https://i", "audiences": ["a"], "sessionMode": "stateless"}));
        assert_eq!(realm_state(None, &defaults()), RealmState::NotFound);
        assert!(matches!(realm_state(Some(&base), &defaults()), RealmState::NotReady(m) if m.contains("not reported")));
        let ready = with_conditions(
            base.clone(),
            &[
                ("Ready", "True", "Reconciled", ""),
                ("KeysReady", "True", "KeysCurrent", "key k signs"),
                ("RedisReachable", "True", "ClusterOk", ""),
            ],
        );
        assert!(matches!(realm_state(Some(&ready), &defaults()), RealmState::Ready { hmac: false, .. }));
        // The operator's Redis check failed (a failover, or a network path only the pods have):
        // Ready is False, but the keys and config are there, so pods still get the sidecar.
        let redis_down = with_conditions(
            base.clone(),
            &[
                ("Ready", "False", "Unreachable", "RedisReachable: dial 10.0.0.1:6379: refused"),
                ("KeysReady", "True", "KeysCurrent", "key k signs"),
                ("RedisReachable", "False", "Unreachable", "dial 10.0.0.1:6379: refused"),
            ],
        );
        assert!(matches!(realm_state(Some(&redis_down), &defaults()), RealmState::Ready { hmac: false, .. }));
        // No usable keys (or an invalid spec): refused, naming the condition.
        let no_keys = with_conditions(
            base.clone(),
            &[
                ("Ready", "False", "InvalidSpec", "KeysReady: spec.tokenTtl: bad"),
                ("KeysReady", "False", "InvalidSpec", "spec.tokenTtl: bad"),
                ("RedisReachable", "True", "ClusterOk", ""),
            ],
        );
        assert_eq!(
            realm_state(Some(&no_keys), &defaults()),
            RealmState::NotReady("KeysReady=False: InvalidSpec: spec.tokenTtl: bad".into())
        );
        // Ready=True alone (no KeysReady reported) is not enough.
        let only_ready = with_conditions(base.clone(), &[("Ready", "True", "Reconciled", "")]);
        assert!(
            matches!(realm_state(Some(&only_ready), &defaults()), RealmState::NotReady(m) if m.contains("not reported"))
        );
        let mut hmac = ready;
        hmac.spec.algorithm = authrealm_contract::Alg::HS256;
        assert!(matches!(realm_state(Some(&hmac), &defaults()), RealmState::Ready { hmac: true, .. }));
        // KeysReady from an earlier generation, but the spec now does not resolve: no config to follow.
        let mut broken = hmac;
        broken.spec.token_ttl = crate::crd::GoDuration("0s".into());
        assert!(
            matches!(realm_state(Some(&broken), &defaults()), RealmState::NotReady(m) if m.contains("spec.tokenTtl")),
            "{:?}",
            realm_state(Some(&broken), &defaults())
        );
    }

    #[test]
    fn plan_takes_the_realm_settings_and_falls_back_to_the_operator_defaults() {
        let r = realm(json!({
            "issuer": "https://i", "audiences": ["a"],
            "redis": {
                "endpoints": ["redis:6379"],
                "credentials": {"secretName": "redis-auth", "usernameKey": "user"},
                "tls": {"caSecret": {"name": "redis-ca"}},
            },
            "sidecar": {"ports": {"public": 7443, "issuer": 7444, "admin": 7901}},
        }));
        let plan = sidecar_plan(&r, &defaults()).unwrap();
        assert_eq!(plan.image, "sidecar:default");
        assert_eq!((plan.public_port, plan.issuer_port, plan.admin_port), (7443, 7444, 7901));
        assert_eq!(plan.resources, default_resources());
        let redis = plan.redis.unwrap();
        assert_eq!(
            (redis.secret_name.as_str(), redis.password_key.as_str(), redis.username_key.as_deref()),
            ("redis-auth", "password", Some("user"))
        );
        let ca = plan.redis_ca.unwrap();
        assert_eq!((ca.secret.as_str(), ca.key.as_str()), ("redis-ca", "ca.crt"));

        let r = realm(json!({
            "issuer": "https://i", "audiences": ["a"], "sessionMode": "stateless",
            "sidecar": {"image": "mirror/sidecar:1", "resources": {"limits": {"memory": "64Mi"}}},
        }));
        let plan = sidecar_plan(&r, &defaults()).unwrap();
        assert_eq!(plan.image, "mirror/sidecar:1");
        assert!(plan.redis.is_none() && plan.redis_ca.is_none());
        assert_eq!(plan.resources.limits.unwrap()["memory"], Quantity("64Mi".into()));
    }

    /// The injected container provides exactly what the rendered sidecar config names: its
    /// listener ports, its Redis credential variables, its key set file and CA file, and the
    /// config file itself. A change to one side only (render or mutate) fails here.
    #[test]
    fn the_injected_container_provides_what_the_rendered_config_names() {
        let r = realm(json!({
            "issuer": "https://i", "audiences": ["a"],
            "redis": {
                "endpoints": ["redis:6379"],
                "credentials": {"secretName": "s", "usernameKey": "user"},
                "tls": {"caSecret": {"name": "redis-ca", "key": "root.pem"}},
            },
            "sidecar": {"ports": {"public": 7443, "issuer": 7444, "admin": 7901}},
        }));
        let config = crate::render::resolve("demo", "team-a", &r.spec).unwrap().config;
        let plan = sidecar_plan(&r, &defaults()).unwrap();
        let c = crate::webhook::mutate::sidecar_container(&plan);
        let port_of = |addr: &str| addr.parse::<SocketAddr>().unwrap().port();
        let ports: Vec<u64> =
            c["ports"].as_array().unwrap().iter().map(|p| p["containerPort"].as_u64().unwrap()).collect();
        assert_eq!(ports, [port_of(&config.listeners.public) as u64, port_of(&config.listeners.admin) as u64]);
        assert_eq!(c["livenessProbe"]["httpGet"]["port"], json!(port_of(&config.listeners.admin)));
        assert_eq!(plan.issuer_port, port_of(&config.listeners.issuer), "checked for conflicts with the pod's ports");
        let redis = config.redis.as_ref().unwrap();
        let env: Vec<&str> = c["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert!(env.contains(&redis.password_env.as_str()) && env.contains(&redis.username_env.as_str()), "{env:?}");
        // A mounted file's path: the mount of its volume + the item's path (or the data key).
        let volumes = crate::webhook::mutate::sidecar_volumes(&plan);
        let mounted = |volume: &str, file: &str| {
            let m = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == volume).unwrap();
            format!("{}/{file}", m["mountPath"].as_str().unwrap())
        };
        assert_eq!(mounted(crate::webhook::mutate::KEYS_VOLUME, crate::render::KEYSET_KEY), config.key_set_file);
        let ca_volume = volumes.iter().find(|v| v["name"] == crate::webhook::mutate::REDIS_CA_VOLUME).unwrap();
        let item = &ca_volume["secret"]["items"][0];
        assert_eq!(item["key"], "root.pem");
        assert_eq!(
            Some(mounted(crate::webhook::mutate::REDIS_CA_VOLUME, item["path"].as_str().unwrap())),
            redis.tls.as_ref().unwrap().ca_file
        );
        assert_eq!(
            mounted(crate::webhook::mutate::CONFIG_VOLUME, crate::render::CONFIG_KEY),
            c["args"][2].as_str().unwrap()
        );
    }
}
