//! From an [`AuthRealm`] to what the injector needs: its [`RealmState`] for [`super::decide`] and
//! the [`SidecarPlan`] for [`super::mutate`]. Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::decide::{RealmState, Role};
use super::mutate::{RedisCredentialRefs, SidecarPlan};
use crate::conditions::{KEYS_READY, find};
use crate::crd::AuthRealm;

/// Environment variable names the rendered sidecar config uses for the Redis credentials
/// (`render::resolve` writes these into `redis.passwordEnv` / `redis.usernameEnv`).
pub const PASSWORD_ENV: &str = "AUTHREALM_REDIS_PASSWORD";
pub const USERNAME_ENV: &str = "AUTHREALM_REDIS_USERNAME";

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

/// The realm's state as the decision sees it. `None`: no such AuthRealm.
///
/// A pod can run once the realm's keys and config are in place: the operator reports
/// `KeysReady=True` only from a reconcile that wrote the keys Secret, the JWKS ConfigMap and the
/// sidecar ConfigMap of a valid spec, and only while the current key can sign. `Ready` is not
/// the gate: it also requires `RedisReachable`, the operator's own periodic check, which a
/// short failover, or a network path the operator lacks and the pods have, would turn into
/// refused pods. The sidecar checks Redis itself (`/readyz`, `failurePolicy`).
pub fn realm_state(realm: Option<&AuthRealm>) -> RealmState {
    let Some(realm) = realm else { return RealmState::NotFound };
    let conditions = realm.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    match find(conditions, KEYS_READY) {
        Some(c) if c.status == "True" => RealmState::Ready { hmac: realm.spec.algorithm.is_symmetric() },
        Some(c) if c.message.is_empty() => RealmState::NotReady(format!("{KEYS_READY}={}: {}", c.status, c.reason)),
        Some(c) => RealmState::NotReady(format!("{KEYS_READY}={}: {}: {}", c.status, c.reason, c.message)),
        None => RealmState::NotReady("the operator has not reported on it yet".into()),
    }
}

/// The sidecar for `role` in a pod of `realm`.
pub fn sidecar_plan(realm: &AuthRealm, role: Role, defaults: &SidecarDefaults) -> SidecarPlan {
    let spec = &realm.spec;
    let port = |p: i32, default: u16| u16::try_from(p).ok().filter(|p| *p > 0).unwrap_or(default);
    let redis = spec.redis.as_ref();
    SidecarPlan {
        realm: kube::ResourceExt::name_any(realm),
        role,
        image: spec.sidecar.image.clone().unwrap_or_else(|| defaults.image.clone()),
        image_pull_policy: defaults.image_pull_policy.clone(),
        public_port: port(spec.sidecar.ports.public, 8443),
        issuer_port: port(spec.sidecar.ports.issuer, 8444),
        admin_port: port(spec.sidecar.ports.admin, 9901),
        resources: spec.sidecar.resources.clone().unwrap_or_else(|| defaults.resources.clone()),
        redis: redis.and_then(|r| r.credentials.as_ref()).map(|c| RedisCredentialRefs {
            secret_name: c.secret_name.clone(),
            password_key: c.password_key.clone(),
            username_key: c.username_key.clone(),
            password_env: PASSWORD_ENV.into(),
            username_env: USERNAME_ENV.into(),
        }),
        redis_ca: redis
            .and_then(|r| r.tls.as_ref())
            .and_then(|t| t.ca_secret.as_ref())
            .map(|s| (s.name.clone(), s.key.clone())),
        issuer_cas: crate::issuers::ca_bundles(&spec.external_issuers),
    }
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
        assert_eq!(realm_state(None), RealmState::NotFound);
        assert!(matches!(realm_state(Some(&base)), RealmState::NotReady(m) if m.contains("not reported")));
        let ready = with_conditions(
            base.clone(),
            &[
                ("Ready", "True", "Reconciled", ""),
                ("KeysReady", "True", "KeysCurrent", "key k signs"),
                ("RedisReachable", "True", "ClusterOk", ""),
            ],
        );
        assert_eq!(realm_state(Some(&ready)), RealmState::Ready { hmac: false });
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
        assert_eq!(realm_state(Some(&redis_down)), RealmState::Ready { hmac: false });
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
            realm_state(Some(&no_keys)),
            RealmState::NotReady("KeysReady=False: InvalidSpec: spec.tokenTtl: bad".into())
        );
        // Ready=True alone (no KeysReady reported) is not enough.
        let only_ready = with_conditions(base.clone(), &[("Ready", "True", "Reconciled", "")]);
        assert!(matches!(realm_state(Some(&only_ready)), RealmState::NotReady(m) if m.contains("not reported")));
        let mut hmac = ready;
        hmac.spec.algorithm = authrealm_contract::Alg::HS256;
        assert_eq!(realm_state(Some(&hmac)), RealmState::Ready { hmac: true });
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
        let plan = sidecar_plan(&r, Role::Verifier, &defaults());
        assert_eq!(plan.image, "sidecar:default");
        assert_eq!((plan.public_port, plan.issuer_port, plan.admin_port), (7443, 7444, 7901));
        assert_eq!(plan.resources, default_resources());
        let redis = plan.redis.unwrap();
        assert_eq!(
            (redis.secret_name.as_str(), redis.password_key.as_str(), redis.username_key.as_deref()),
            ("redis-auth", "password", Some("user"))
        );
        assert_eq!(plan.redis_ca, Some(("redis-ca".into(), "ca.crt".into())));

        let r = realm(json!({
            "issuer": "https://i", "audiences": ["a"], "sessionMode": "stateless",
            "sidecar": {"image": "mirror/sidecar:1", "resources": {"limits": {"memory": "64Mi"}}},
        }));
        let plan = sidecar_plan(&r, Role::Issuer, &defaults());
        assert_eq!(plan.image, "mirror/sidecar:1");
        assert!(plan.redis.is_none() && plan.redis_ca.is_none());
        assert_eq!(plan.resources.limits.unwrap()["memory"], Quantity("64Mi".into()));
    }

    /// The env names injected are the ones the operator writes into the sidecar config.
    #[test]
    fn env_names_match_the_rendered_config() {
        let r = realm(json!({
            "issuer": "https://i", "audiences": ["a"],
            "redis": {"endpoints": ["redis:6379"], "credentials": {"secretName": "s"}},
        }));
        let resolved = crate::render::resolve("demo", "team-a", &r.spec).unwrap();
        let redis = resolved.config.redis.unwrap();
        assert_eq!((redis.password_env.as_str(), redis.username_env.as_str()), (PASSWORD_ENV, USERNAME_ENV));
    }
}
