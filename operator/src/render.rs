//! Pure rendering: from an AuthRealm and its key set to the objects the operator owns, and from
//! the spec to the sidecar config file (the contract's [`SidecarConfig`]) and the rotation
//! [`Schedule`]. Names, labels, annotations and mount paths are defined here once.

use std::collections::BTreeMap;

use authrealm_contract::config::{
    CONFIG_VERSION, IdentityHeader, Limits, Listeners, RedisConfig, RedisTls, SessionCacheConfig, Upstream,
    default_identity_headers,
};
use authrealm_contract::{KeySet, RedisMode, SessionMode, SidecarConfig};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::crd::{AuthRealm, AuthRealmSpec, GoDuration, RedisCredentials, RedisTlsSpec};
pub use crate::keys_secret::{
    ANN_KEYS_INCIDENT, ANN_KEYSET_SHA256, ANN_TOKEN_LIFETIMES, Incident, KEYSET_KEY, keyset_bytes, sha256_hex,
};
use crate::rotation::{Lifetimes, Schedule};

/// The one field manager of every server-side apply.
pub const MANAGER: &str = "authrealm-operator";

/// Data key of the RFC 7517 JWK Set in the JWKS ConfigMap.
pub const JWKS_KEY: &str = "jwks.json";
/// Data key of the sidecar config in the sidecar ConfigMap.
pub const CONFIG_KEY: &str = "sidecar.json";

/// Where the injector mounts the key set (the Secret for issuer pods, the JWKS ConfigMap for
/// verify-only pods); the sidecar config's `keySetFile` points here.
pub const KEYS_MOUNT_DIR: &str = "/etc/authrealm/keys";
pub const KEY_SET_FILE: &str = "/etc/authrealm/keys/keyset.json";
/// Where the injector mounts the sidecar ConfigMap.
pub const CONFIG_MOUNT_DIR: &str = "/etc/authrealm/config";
pub const CONFIG_FILE: &str = "/etc/authrealm/config/sidecar.json";
/// Where the injector mounts the Redis CA Secret's key (as `ca.crt`).
pub const REDIS_CA_MOUNT_DIR: &str = "/etc/authrealm/redis-ca";
pub const REDIS_CA_FILE: &str = "/etc/authrealm/redis-ca/ca.crt";

pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "authrealm-operator";
/// Label selector of every object the operator owns.
pub const OWNED_SELECTOR: &str = "app.kubernetes.io/managed-by=authrealm-operator";
pub const LABEL_REALM: &str = "authrealm.dev/realm";
pub const LABEL_COMPONENT: &str = "authrealm.dev/component";

pub fn signing_keys_name(realm: &str) -> String {
    format!("{realm}-signing-keys")
}
pub fn jwks_name(realm: &str) -> String {
    format!("{realm}-jwks")
}
pub fn sidecar_config_name(realm: &str) -> String {
    format!("{realm}-sidecar")
}

/// A spec the operator cannot use, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.{field}: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

fn spec_err(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError { field: field.into(), message: message.into() }
}

/// Where and how to reach the realm's Redis Cluster (no secrets: those are read separately).
#[derive(Clone, Debug, PartialEq)]
pub struct RedisTarget {
    /// Cluster (`CLUSTER INFO`, purge on every master) or standalone (`PING`/`INFO`, one node).
    pub mode: RedisMode,
    pub endpoints: Vec<String>,
    pub credentials: Option<RedisCredentials>,
    pub tls: Option<RedisTlsSpec>,
    pub key_prefix: String,
    pub connect_timeout_ms: u64,
    pub purge_on_delete: bool,
}

/// Everything derived from a valid spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub schedule: Schedule,
    pub config: SidecarConfig,
    /// None for stateless realms.
    pub redis: Option<RedisTarget>,
}

fn secs(field: &str, d: &GoDuration) -> Result<i64, SpecError> {
    d.seconds_ceil().map_err(|m| spec_err(field, m))
}
fn millis(field: &str, d: &GoDuration) -> Result<u64, SpecError> {
    d.millis_ceil().map_err(|m| spec_err(field, m))
}
fn port(field: &str, p: i32) -> Result<u16, SpecError> {
    u16::try_from(p).ok().filter(|p| *p > 0).ok_or_else(|| spec_err(field, format!("{p} is not a port (1-65535)")))
}

/// Checks a spec (repeating the CEL rules, so an object that bypassed them is still refused)
/// and derives the rotation schedule and the sidecar config.
pub fn resolve(name: &str, namespace: &str, spec: &AuthRealmSpec) -> Result<Resolved, SpecError> {
    if name.len() > crate::crd::MAX_REALM_NAME {
        return Err(spec_err("(metadata.name)", "AuthRealm names are at most 63 characters"));
    }
    let ttl = secs("tokenTtl", &spec.token_ttl)?;
    let max_ttl = match &spec.max_token_ttl {
        Some(d) => secs("maxTokenTtl", d)?,
        None => ttl,
    };
    let leeway = secs("clockLeeway", &spec.clock_leeway)?;
    let interval = secs("keyRotation.interval", &spec.key_rotation.interval)?;
    let propagation = secs("keyRotation.propagationDelay", &spec.key_rotation.propagation_delay)?;
    const YEAR: i64 = 366 * 24 * 3600;
    if !(1..=YEAR).contains(&ttl) {
        return Err(spec_err("tokenTtl", "must be between 1s and 8784h"));
    }
    if max_ttl < ttl || max_ttl > YEAR {
        return Err(spec_err("maxTokenTtl", "must be at least tokenTtl and at most 8784h"));
    }
    if leeway > 600 {
        return Err(spec_err("clockLeeway", "must be at most 10m"));
    }
    if !(1..=10 * 8760 * 3600).contains(&interval) {
        return Err(spec_err("keyRotation.interval", "must be between 1s and 87600h"));
    }
    if propagation < 1 {
        return Err(spec_err("keyRotation.propagationDelay", "must be longer than 0s"));
    }
    if propagation >= interval {
        return Err(spec_err("keyRotation.propagationDelay", "must be shorter than keyRotation.interval"));
    }
    if max_ttl > interval {
        return Err(spec_err("maxTokenTtl", "the token lifetime must not be longer than keyRotation.interval"));
    }
    if spec.audiences.is_empty() {
        return Err(spec_err("audiences", "at least one audience is required"));
    }
    if spec.audiences.len() > 64 {
        return Err(spec_err("audiences", "at most 64 audiences"));
    }

    let (redis_config, redis_target) = match (&spec.redis, spec.session_mode) {
        (None, SessionMode::Stateless) => (None, None),
        (None, _) => return Err(spec_err("redis", "required unless sessionMode is stateless")),
        (Some(r), _) => {
            let endpoints = match (&r.endpoints, &r.service) {
                (Some(e), None) => e.clone(),
                (None, Some(s)) => {
                    let ns = s.namespace.as_deref().unwrap_or(namespace);
                    vec![format!("{}.{ns}.svc:{}", s.name, port("redis.service.port", s.port)?)]
                }
                _ => return Err(spec_err("redis", "set exactly one of redis.endpoints and redis.service")),
            };
            if endpoints.is_empty() || endpoints.len() > 16 {
                return Err(spec_err("redis.endpoints", "list 1 to 16 host:port seeds"));
            }
            if r.mode == RedisMode::Standalone && endpoints.len() != 1 {
                return Err(spec_err("redis.endpoints", "mode standalone takes exactly one host:port (the server)"));
            }
            if let Some(t) = &r.tls
                && t.server_name.is_some()
            {
                return Err(spec_err(
                    "redis.tls.serverName",
                    "not supported by the sidecar's Redis client (it checks each node's certificate against the \
                     host it dials); use endpoint host names that match the servers' certificates",
                ));
            }
            // Realm names are unique only within a namespace while a Redis Cluster may be shared
            // across namespaces: the namespace is part of every key, so `team-a/app` and
            // `team-b/app` never see (or purge) each other's sessions.
            let key_prefix = format!("{}{namespace}:", r.key_prefix);
            let wait_replicas =
                u32::try_from(r.wait_replicas).map_err(|_| spec_err("redis.waitReplicas", "must be 0 to 5"))?;
            let connect_timeout_ms = millis("redis.connectTimeout", &r.connect_timeout)?;
            let cfg = RedisConfig {
                mode: r.mode,
                endpoints: endpoints.clone(),
                username_env: "AUTHREALM_REDIS_USERNAME".into(),
                password_env: "AUTHREALM_REDIS_PASSWORD".into(),
                tls: r.tls.as_ref().map(|t| RedisTls {
                    ca_file: t.ca_secret.as_ref().map(|_| REDIS_CA_FILE.to_owned()),
                    server_name: None,
                }),
                key_prefix: key_prefix.clone(),
                connect_timeout_ms,
                command_timeout_ms: millis("redis.commandTimeout", &r.command_timeout)?,
                wait_replicas,
                wait_timeout_ms: millis("redis.waitTimeout", &r.wait_timeout)?,
            };
            let target = RedisTarget {
                mode: r.mode,
                endpoints,
                credentials: r.credentials.clone(),
                tls: r.tls.clone(),
                key_prefix,
                connect_timeout_ms,
                purge_on_delete: r.purge_on_delete,
            };
            (Some(cfg), Some(target))
        }
    };

    let staleness_ms = millis("sessionCache.maxStaleness", &spec.session_cache.max_staleness)?;
    if !(100..=10_000).contains(&staleness_ms) {
        return Err(spec_err("sessionCache.maxStaleness", "must be between 100ms and 10s"));
    }
    let s = &spec.sidecar;
    let identity_headers = if s.claim_headers.is_empty() {
        default_identity_headers()
    } else {
        s.claim_headers
            .iter()
            .map(|(claim, header)| IdentityHeader { claim: claim.clone(), header: header.clone() })
            .collect()
    };
    let config = SidecarConfig {
        version: CONFIG_VERSION.into(),
        realm: name.into(),
        issuer: spec.issuer.clone(),
        audiences: spec.audiences.clone(),
        // The algorithms of the published keys: during an algorithm change both are accepted,
        // each only for its own keys.
        algorithms: vec![],
        key_set_file: KEY_SET_FILE.into(),
        token_ttl_seconds: ttl as u64,
        max_token_ttl_seconds: max_ttl as u64,
        leeway_seconds: leeway as u64,
        required_claims: spec.required_claims.clone(),
        session_mode: spec.session_mode,
        max_sessions_per_subject: 100,
        failure_policy: spec.failure_policy,
        session_cache: SessionCacheConfig {
            enabled: spec.session_cache.enabled,
            max_staleness_ms: staleness_ms,
            ..SessionCacheConfig::default()
        },
        redis: redis_config,
        listeners: Listeners {
            public: format!("0.0.0.0:{}", port("sidecar.ports.public", s.ports.public)?),
            issuer: format!("127.0.0.1:{}", port("sidecar.ports.issuer", s.ports.issuer)?),
            admin: format!("0.0.0.0:{}", port("sidecar.ports.admin", s.ports.admin)?),
        },
        upstream: Upstream {
            address: format!("127.0.0.1:{}", port("sidecar.upstreamPort", s.upstream_port)?),
            ..Upstream::default()
        },
        limits: Limits::default(),
        public_routes: s.public_routes.clone(),
        authorization: spec.authorization.clone(),
        identity_headers,
        key_reload_interval_ms: 2000,
        external_issuers: crate::issuers::render(&spec.external_issuers).map_err(|(f, m)| spec_err(f, m))?,
    };
    config.validate().map_err(|e| spec_err(format!("(sidecar config) {}", e.field), e.message))?;
    let schedule = Schedule { alg: spec.algorithm, interval, propagation, token_lifetime: max_ttl + leeway, leeway };
    Ok(Resolved { schedule, config, redis: redis_target })
}

fn labels(realm: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
        (LABEL_REALM.to_owned(), realm.to_owned()),
        (LABEL_COMPONENT.to_owned(), component.to_owned()),
    ])
}

fn meta(realm: &AuthRealm, name: String, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: realm.namespace(),
        labels: Some(labels(&realm.name_any(), component)),
        owner_references: realm.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// The keys Secret. `resource_version` makes the apply conditional on the version read.
pub fn signing_keys_secret(
    realm: &AuthRealm,
    set: &KeySet,
    lifetimes: &Lifetimes,
    incident: Option<&Incident>,
    resource_version: Option<String>,
) -> Secret {
    let (annotations, data) = crate::keys_secret::encode(set, lifetimes, incident);
    let mut m = meta(realm, signing_keys_name(&realm.name_any()), "signing-keys");
    m.resource_version = resource_version;
    m.annotations = Some(annotations);
    Secret { metadata: m, type_: Some("Opaque".into()), data: Some(data), ..Secret::default() }
}

/// The public-only key set and JWKS ConfigMap. Empty key lists for HMAC realms.
pub fn jwks_config_map(realm: &AuthRealm, set: &KeySet) -> ConfigMap {
    let public = set.public_only();
    ConfigMap {
        metadata: meta(realm, jwks_name(&realm.name_any()), "jwks"),
        data: Some(BTreeMap::from([
            (KEYSET_KEY.to_owned(), public.to_json_pretty()),
            (JWKS_KEY.to_owned(), serde_json::to_string_pretty(&set.jwks()).expect("jwks serialises")),
        ])),
        ..ConfigMap::default()
    }
}

/// The sidecar config ConfigMap.
pub fn sidecar_config_map(realm: &AuthRealm, config: &SidecarConfig) -> ConfigMap {
    ConfigMap {
        metadata: meta(realm, sidecar_config_name(&realm.name_any()), "sidecar-config"),
        data: Some(BTreeMap::from([(CONFIG_KEY.to_owned(), config.to_json_pretty())])),
        ..ConfigMap::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{RedisSpec, SidecarSpec};
    use authrealm_contract::Alg;
    use serde_json::json;

    fn spec(v: serde_json::Value) -> AuthRealmSpec {
        serde_json::from_value(v).unwrap()
    }

    fn base() -> serde_json::Value {
        json!({
            "issuer": "https://auth.example.com",
            "audiences": ["app", "admin"],
            "redis": {"endpoints": ["redis-0.redis:6379"], "credentials": {"secretName": "redis-auth"}},
        })
    }

    #[test]
    fn resolves_a_minimal_spec_into_a_valid_sidecar_config() {
        let r = resolve("shop", "prod", &spec(base())).unwrap();
        assert_eq!(
            r.schedule,
            Schedule { alg: Alg::ES256, interval: 720 * 3600, propagation: 120, token_lifetime: 930, leeway: 30 }
        );
        let c = &r.config;
        assert_eq!(c.realm, "shop");
        assert_eq!(c.key_set_file, KEY_SET_FILE);
        assert_eq!(c.token_ttl_seconds, 900);
        assert_eq!(c.max_token_ttl_seconds, 900);
        assert_eq!(c.listeners.issuer, "127.0.0.1:8444");
        assert_eq!(c.upstream.address, "127.0.0.1:8080");
        let redis = c.redis.as_ref().unwrap();
        assert_eq!(redis.password_env, "AUTHREALM_REDIS_PASSWORD");
        assert_eq!(redis.command_timeout_ms, 250);
        assert!(c.session_cache.enabled);
        assert_eq!(c.session_cache.max_staleness_ms, 1000);
        // Credentials are referenced, never copied.
        assert!(!c.to_json_pretty().contains("redis-auth"));
        assert_eq!(r.redis.unwrap().credentials.unwrap().password_key, "password");
        // Round trip through the sidecar's own parser.
        SidecarConfig::from_json(c.to_json_pretty().as_bytes()).unwrap();
    }

    #[test]
    fn same_named_realms_in_different_namespaces_use_disjoint_redis_keys() {
        let a = resolve("app", "team-a", &spec(base())).unwrap();
        let b = resolve("app", "team-b", &spec(base())).unwrap();
        let (ca, cb) = (a.config.redis.unwrap(), b.config.redis.unwrap());
        assert_eq!(ca.key_prefix, "ar:team-a:");
        assert_eq!(cb.key_prefix, "ar:team-b:");
        // The operator's purge (finalizer) scans with the same prefix the sidecars write with.
        assert_eq!(a.redis.unwrap().key_prefix, ca.key_prefix);
        assert_eq!(b.redis.unwrap().key_prefix, cb.key_prefix);
    }

    #[test]
    fn standalone_mode_reaches_the_sidecar_config_with_exactly_one_endpoint() {
        let mut v = base();
        v["redis"]["mode"] = json!("standalone");
        let r = resolve("shop", "prod", &spec(v.clone())).unwrap();
        let c = r.config.redis.as_ref().unwrap();
        assert_eq!(c.mode, RedisMode::Standalone);
        assert!(r.config.to_json_pretty().contains("\"mode\": \"standalone\""));
        assert_eq!(r.redis.unwrap().mode, RedisMode::Standalone);
        SidecarConfig::from_json(r.config.to_json_pretty().as_bytes()).unwrap();
        // A cluster realm's sidecar.json is unchanged by the field (older sidecars still read it).
        assert!(!resolve("shop", "prod", &spec(base())).unwrap().config.to_json_pretty().contains("\"mode\""));
        v["redis"]["endpoints"] = json!(["redis-0:6379", "redis-1:6379"]);
        assert!(resolve("shop", "prod", &spec(v)).unwrap_err().to_string().contains("redis.endpoints"));
    }

    #[test]
    fn session_cache_settings_reach_the_sidecar_config() {
        let mut v = base();
        v["sessionCache"] = json!({"enabled": false, "maxStaleness": "250ms"});
        let c = resolve("shop", "prod", &spec(v)).unwrap().config;
        assert!(!c.session_cache.enabled);
        assert_eq!(c.session_cache.max_staleness_ms, 250);
        SidecarConfig::from_json(c.to_json_pretty().as_bytes()).unwrap();
    }

    #[test]
    fn service_reference_and_claim_headers() {
        let mut v = base();
        v["redis"] = json!({"service": {"name": "redis", "port": 6379}});
        v["sidecar"] =
            json!({"claimHeaders": {"email": "X-Auth-Email", "ユーザー": "X-Auth-User"}, "upstreamPort": 3000});
        let r = resolve("shop", "prod", &spec(v)).unwrap();
        assert_eq!(r.config.redis.unwrap().endpoints, ["redis.prod.svc:6379"]);
        assert_eq!(r.config.upstream.address, "127.0.0.1:3000");
        let claims: Vec<_> = r.config.identity_headers.iter().map(|h| h.claim.as_str()).collect();
        assert_eq!(claims, ["email", "ユーザー"]);
    }

    #[test]
    fn rejects_what_cel_rejects_naming_the_field() {
        type Mutation = Box<dyn Fn(&mut AuthRealmSpec)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("tokenTtl", Box::new(|s| s.token_ttl = GoDuration::new("0s"))),
            ("tokenTtl", Box::new(|s| s.token_ttl = GoDuration::new("-5m"))),
            ("tokenTtl", Box::new(|s| s.token_ttl = GoDuration::new("5 minutes"))),
            ("maxTokenTtl", Box::new(|s| s.max_token_ttl = Some(GoDuration::new("1m")))),
            ("maxTokenTtl", Box::new(|s| s.key_rotation.interval = GoDuration::new("10m"))),
            ("keyRotation.propagationDelay", Box::new(|s| s.key_rotation.propagation_delay = GoDuration::new("800h"))),
            ("keyRotation.propagationDelay", Box::new(|s| s.key_rotation.propagation_delay = GoDuration::new("0s"))),
            ("clockLeeway", Box::new(|s| s.clock_leeway = GoDuration::new("1h"))),
            ("sessionCache.maxStaleness", Box::new(|s| s.session_cache.max_staleness = GoDuration::new("50ms"))),
            ("sessionCache.maxStaleness", Box::new(|s| s.session_cache.max_staleness = GoDuration::new("1m"))),
            ("audiences", Box::new(|s| s.audiences.clear())),
            ("audiences", Box::new(|s| s.audiences = (0..10_000).map(|i| format!("aud-{i}")).collect())),
            ("redis", Box::new(|s| s.redis = None)),
            (
                "redis",
                Box::new(|s| {
                    let r: &mut RedisSpec = s.redis.as_mut().unwrap();
                    r.service = Some(crate::crd::ServiceReference { name: "x".into(), namespace: None, port: 1 });
                }),
            ),
            (
                "redis.tls.serverName",
                Box::new(|s| {
                    s.redis.as_mut().unwrap().tls =
                        Some(RedisTlsSpec { ca_secret: None, server_name: Some("redis.example".into()) })
                }),
            ),
            ("sidecar.upstreamPort", Box::new(|s| s.sidecar.upstream_port = 70_000)),
            (
                "(sidecar config) redis.endpoints[0]",
                Box::new(|s| s.redis.as_mut().unwrap().endpoints = Some(vec!["no-port".into()])),
            ),
            (
                "(sidecar config) identityHeaders[0].header",
                Box::new(|s| {
                    s.sidecar = SidecarSpec {
                        claim_headers: BTreeMap::from([("sub".into(), "X Bad".into())]),
                        ..SidecarSpec::default()
                    }
                }),
            ),
        ];
        for (field, mutate) in cases {
            let mut s = spec(base());
            mutate(&mut s);
            let e = resolve("shop", "prod", &s).expect_err(field);
            assert_eq!(e.field, field, "{e}");
        }
        assert_eq!(resolve(&"a".repeat(64), "prod", &spec(base())).unwrap_err().field, "(metadata.name)");
    }

    #[test]
    fn secret_carries_digest_lifetimes_and_owner() {
        let realm = AuthRealm {
            metadata: ObjectMeta {
                name: Some("shop".into()),
                namespace: Some("prod".into()),
                uid: Some("uid-1".into()),
                ..ObjectMeta::default()
            },
            spec: spec(base()),
            status: None,
        };
        let set = KeySet {
            keys: vec![
                authrealm_contract::keygen::generate(Alg::ES256, "k1", 10, authrealm_contract::KeyState::Current)
                    .unwrap(),
            ],
            ..KeySet::empty()
        };
        let lifetimes = Lifetimes::from([("k1".to_owned(), 930)]);
        let s = signing_keys_secret(&realm, &set, &lifetimes, None, Some("42".into()));
        let bytes = &s.data.as_ref().unwrap()[KEYSET_KEY].0;
        let ann = s.metadata.annotations.as_ref().unwrap();
        assert_eq!(ann[ANN_KEYSET_SHA256], sha256_hex(bytes));
        assert_eq!(ann[ANN_TOKEN_LIFETIMES], r#"{"k1":930}"#);
        assert_eq!(s.metadata.resource_version.as_deref(), Some("42"));
        let owner = &s.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str(), owner.controller), ("AuthRealm", "uid-1", Some(true)));
        assert_eq!(s.metadata.labels.as_ref().unwrap()[LABEL_REALM], "shop");

        let cm = jwks_config_map(&realm, &set);
        let data = cm.data.unwrap();
        assert!(!data[KEYSET_KEY].contains("PRIVATE"));
        let public = KeySet::from_json(data[KEYSET_KEY].as_bytes()).unwrap();
        assert_eq!(public.keys[0].kid, "k1");
        let jwks: serde_json::Value = serde_json::from_str(&data[JWKS_KEY]).unwrap();
        assert_eq!(jwks["keys"][0]["kid"], "k1");
    }
}
