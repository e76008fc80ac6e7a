//! The `AuthRealm` custom resource (`authrealm.dev/v1alpha1`) — the single import surface for
//! its Rust types.
//!
//! `crds/authrealm.yaml` is generated from these types (`authrealm-operator crdgen`); field doc
//! comments become `kubectl explain` text, so they are written for a platform engineer.
//! Validation happens in three layers: the OpenAPI schema (types, lengths, patterns), CEL rules
//! (`x-kubernetes-validations`, cross-field checks with readable messages), and
//! [`AuthRealmSpec::resolve`] in the operator, which also runs the sidecar's own config checks.

use std::borrow::Cow;
use std::collections::BTreeMap;

use authrealm_contract::authz::Authorization;
use authrealm_contract::config::PublicRoute;
use authrealm_contract::{Alg, FailurePolicy, RedisMode, SessionMode};
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// API group of the AuthRealm resource.
pub const GROUP: &str = "authrealm.dev";
/// Longest AuthRealm name: the name is used as a label value (`authrealm.dev/realm` on app pods)
/// and inside derived object names.
pub const MAX_REALM_NAME: usize = 63;

/// A realm: one issuer, its audiences and rotating signing keys, the Redis Cluster holding its
/// sessions, and the settings of the sidecar injected into its pods.
///
/// From an AuthRealm `<name>` the operator maintains, in the same namespace and owned by it:
/// the Secret `<name>-signing-keys` (the private key set; mounted only into issuer pods), the
/// ConfigMap `<name>-jwks` (public keys only, for verify-only pods and JWKS consumers) and the
/// ConfigMap `<name>-sidecar` (the sidecar configuration file).
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "authrealm.dev",
    version = "v1alpha1",
    kind = "AuthRealm",
    plural = "authrealms",
    shortname = "ar",
    namespaced,
    status = "AuthRealmStatus",
    doc = "An AuthRealm: JWT authentication with immediate revocation for the pods labelled authrealm.dev/realm=<name>. The operator keeps its signing keys (Secret <name>-signing-keys), public JWKS (ConfigMap <name>-jwks) and sidecar configuration (ConfigMap <name>-sidecar).",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Algorithm","type":"string","jsonPath":".spec.algorithm"}"#,
    printcolumn = r#"{"name":"Current Key","type":"string","jsonPath":".status.currentKid"}"#,
    // `string`, not `date`: kubectl prints a `date` column as an age, and a time in the future
    // (every next rotation) as `<invalid>`.
    printcolumn = r#"{"name":"Next Rotation","type":"string","jsonPath":".status.nextRotationTime"}"#,
    printcolumn = r#"{"name":"Issuer Keys","type":"string","jsonPath":".status.conditions[?(@.type==\"IssuerKeysReady\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("size(self.metadata.name) <= 63")
        .message("AuthRealm names are at most 63 characters (the name is used as the authrealm.dev/realm label value on app pods)"),
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = spec_rules()))]
pub struct AuthRealmSpec {
    /// Exact `iss` claim every token must carry, and the `iss` of tokens minted by issuer pods,
    /// e.g. `https://auth.example.com`.
    #[schemars(length(min = 1, max = 2048))]
    pub issuer: String,

    /// Accepted `aud` values: a token must name at least one of them. The first one is the
    /// default audience of minted tokens. 1 to 64 distinct entries.
    #[schemars(length(max = 64), inner(length(min = 1, max = 512)), extend("x-kubernetes-list-type" = "set", "x-kubernetes-validations" = [{"rule": "size(self) > 0", "message": "at least one audience is required"}]))]
    pub audiences: Vec<String>,

    /// Signing algorithm of the realm's keys (default ES256). Every key carries its algorithm;
    /// a token's `alg` header never selects the verifier. Changing it starts a new key chain:
    /// a key of the new algorithm is published, signs after `keyRotation.propagationDelay`, and
    /// the old key is retired like any other. HMAC algorithms (HS*) have no public half: every
    /// pod of an HMAC realm, verifiers included, must mount the private key set. So a change
    /// between an HMAC and an asymmetric algorithm is refused: running verifier pods mount the
    /// other key object and would reject the new chain's tokens; create a new realm instead.
    #[serde(default = "default_alg")]
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "self.startsWith('HS') == oldSelf.startsWith('HS')",
         "message": "algorithm cannot change between HMAC (HS*) and asymmetric algorithms: running pods mount different key objects for each; create a new AuthRealm instead"}
    ]))]
    pub algorithm: Alg,

    /// Default lifetime of tokens minted by issuer pods, as a duration (`15m`, `1h`).
    /// Between 1s and 8784h. Default 15m.
    #[serde(default = "default_token_ttl")]
    pub token_ttl: GoDuration,

    /// Longest lifetime an issuer may grant on request. Defaults to `tokenTtl`; must not be
    /// shorter than it nor longer than `keyRotation.interval`. A retired key is kept until
    /// every token it can have signed has expired, which is measured with this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_token_ttl: Option<GoDuration>,

    /// Clock skew tolerated on `exp`, `nbf` and `iat` (at most 10m). Default 30s.
    #[serde(default = "default_leeway")]
    pub clock_leeway: GoDuration,

    /// When signing keys are replaced. See the rotation timeline in the README.
    #[serde(default)]
    pub key_rotation: KeyRotation,

    /// How sidecars consult Redis for each request: `single` (one active token per subject;
    /// default), `multi` (every minted token registered by jti), `denylist` (valid unless
    /// revoked), `stateless` (signature and claims only; no revocation, no Redis).
    #[serde(default)]
    pub session_mode: SessionMode,

    /// What sidecars do when Redis cannot answer in time: `closed` (503, never a 200 for a
    /// token whose state is unknown; default) or `open` (signature and claims only).
    #[serde(default)]
    pub failure_policy: FailurePolicy,

    /// Claims every token must carry besides `exp`, `iss`, `aud` (and `sub`, `jti` in stateful
    /// session modes, which are always required). Names may contain any Unicode character.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 256)), extend("x-kubernetes-list-type" = "set"))]
    pub required_claims: Vec<String>,

    /// The Redis holding session records: a Redis Cluster, or one server (`mode: standalone`).
    /// Required unless `sessionMode` is `stateless`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSpec>,

    /// The sidecars' local session cache (`single` and `multi` modes). On (the default), a sidecar
    /// remembers for at most `maxStaleness` that a session is active and forgets it as soon as
    /// Redis reports a change of its record: a revocation is refused by every sidecar once that
    /// report arrives (about a millisecond on a local network) and in any case no later than
    /// `maxStaleness` after it was written, even if reports are lost (connection dropped, master
    /// frozen or failed over, partition). Off: every request reads Redis, and a revocation is
    /// refused from the next request on.
    #[serde(default)]
    pub session_cache: SessionCacheSpec,

    /// Settings of the sidecar injected into the realm's pods.
    #[serde(default)]
    pub sidecar: SidecarSpec,

    /// Per-route authorization by claims: routes (path, match, methods, as in
    /// `sidecar.publicRoutes`) where a valid token must also carry scopes and claim values.
    /// A token that lacks them gets 403 (`insufficient_scope`) and never reaches the app. The
    /// most specific matching rule alone decides; a request matching no rule needs only a
    /// valid token. See "Authorize routes by claims" in the README.
    #[serde(default, skip_serializing_if = "Authorization::is_empty")]
    #[schemars(extend("x-kubernetes-validations" = authorization_rules()))]
    pub authorization: Authorization,
    /// OpenID Connect providers whose tokens the realm accepts besides its own (at most 16).
    /// Every sidecar fetches each provider's keys (discovery, JWKS) and refetches on an unknown
    /// `kid`; the operator reports whether they load (`IssuerKeysReady`). Only with
    /// `sessionMode` `denylist` (revocable by jti and subject) or `stateless`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub external_issuers: Vec<crate::issuers::ExternalIssuerSpec>,
}

/// Key rotation timing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "duration(self.interval) >= duration('1s') && duration(self.interval) <= duration('87600h')",
     "message": "keyRotation.interval must be between 1s and 87600h"},
    {"rule": "duration(self.propagationDelay) < duration(self.interval)",
     "message": "keyRotation.propagationDelay must be shorter than keyRotation.interval"},
    {"rule": "duration(self.propagationDelay) > duration('0s')",
     "message": "keyRotation.propagationDelay must be longer than 0s: a new key must reach every pod before it signs"}
]))]
pub struct KeyRotation {
    /// How long a key signs before its successor takes over. Default 720h (30 days).
    #[serde(default = "default_interval")]
    pub interval: GoDuration,
    /// How long a new key is published (in the JWKS and every pod's key set) before it signs
    /// anything, and how long a retired key may still sign in pods that have not yet seen its
    /// retirement. Mounted Secrets and ConfigMaps take up to about a minute (the kubelet sync
    /// period plus its cache TTL) to reach running pods, so the operator warns (an event) about a
    /// delay under 1m; it must be longer than 0s. Default 2m.
    #[serde(default = "default_propagation")]
    pub propagation_delay: GoDuration,
}

impl Default for KeyRotation {
    fn default() -> Self {
        KeyRotation { interval: default_interval(), propagation_delay: default_propagation() }
    }
}

/// The sidecars' local session cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "duration(self.maxStaleness) >= duration('100ms') && duration(self.maxStaleness) <= duration('10s')",
     "message": "sessionCache.maxStaleness must be between 100ms and 10s"}
]))]
pub struct SessionCacheSpec {
    /// Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The longest a revoked session can still be admitted by a sidecar that missed the
    /// revocation's invalidation, counted from the moment the revocation was written (100ms to
    /// 10s; default 1s). Shorter means more Redis reads: each sidecar reads an active session at
    /// least once per `maxStaleness`, and writes a heartbeat to every master four times per
    /// `maxStaleness`.
    #[serde(default = "default_max_staleness")]
    pub max_staleness: GoDuration,
}

impl Default for SessionCacheSpec {
    fn default() -> Self {
        SessionCacheSpec { enabled: true, max_staleness: default_max_staleness() }
    }
}

fn default_true() -> bool {
    true
}
fn default_max_staleness() -> GoDuration {
    GoDuration::new("1s")
}

/// Connection to the realm's Redis Cluster (or single Redis server).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = redis_rules()))]
pub struct RedisSpec {
    /// `cluster` (a Redis Cluster; default) or `standalone` (one Redis server, optionally with
    /// replicas that only count for `waitReplicas`). Key layout, revocation semantics, failure
    /// policy and metrics are the same; a standalone server has no failover: while it is down
    /// the failure policy applies, and what survives its restart is what its persistence
    /// (`appendonly`) kept. See "Single Redis" in the README.
    #[serde(default)]
    pub mode: RedisMode,

    /// Seed nodes as `host:port` (the client discovers the rest of the cluster); with
    /// `mode: standalone` exactly one, the server itself. Exactly one of `endpoints` and
    /// `service` must be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), inner(length(max = 262)), extend("x-kubernetes-validations" = endpoint_rules()))]
    pub endpoints: Option<Vec<String>>,

    /// A Service in front of the cluster nodes, used as the seed address
    /// `<name>.<namespace>.svc:<port>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceReference>,

    /// Secret (in the realm's namespace) holding the Redis password and, for ACL users, the
    /// user name. It is never copied: the injector references it from the sidecar's environment,
    /// and the operator reads it only to check the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<RedisCredentials>,

    /// TLS towards the cluster. When set, every connection uses TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RedisTlsSpec>,

    /// Prefix of every key the realm writes (default `ar:`); at most 128 bytes, no `{` or `}`.
    /// The realm's namespace is appended (`ar:<namespace>:`), so realms of the same name in
    /// different namespaces can share a Redis Cluster without seeing each other's sessions.
    #[serde(default = "default_key_prefix")]
    #[schemars(length(max = 128))]
    pub key_prefix: String,

    /// Time allowed to connect to a node (default 1s).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: GoDuration,

    /// Time allowed for one command on the request path, including redirects (default 250ms);
    /// when it elapses the failure policy applies.
    #[serde(default = "default_command_timeout")]
    pub command_timeout: GoDuration,

    /// Replicas that must confirm a revocation before it is reported done (`WAIT`), 0–5
    /// (default 1; 0 disables the wait).
    #[serde(default = "default_wait_replicas")]
    #[schemars(range(min = 0, max = 5))]
    pub wait_replicas: i32,

    /// How long to wait for those replicas (default 500ms).
    #[serde(default = "default_wait_timeout")]
    pub wait_timeout: GoDuration,

    /// Delete the realm's session records from Redis when the AuthRealm is deleted (a
    /// finalizer holds the deletion until it is done, for at most 5 minutes). Default false.
    #[serde(default)]
    pub purge_on_delete: bool,
}

/// A Service fronting the Redis Cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceReference {
    /// Service name.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Namespace of the Service; defaults to the realm's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
    /// Port of the Redis nodes.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

/// Where the Redis credentials live.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisCredentials {
    /// Name of a Secret in the realm's namespace. The operator uses it only when it is labelled
    /// `authrealm.dev/redis-credentials: "true"` (otherwise RedisReachable=False, reason
    /// CredentialsNotLabelled), so an AuthRealm cannot make the operator send an arbitrary Secret
    /// to the endpoints it names.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// Key of the password in that Secret (default `password`).
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = 253))]
    pub password_key: String,
    /// Key of the ACL user name in that Secret; absent means the default user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub username_key: Option<String>,
}

/// TLS settings for Redis.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.serverName)",
     "message": "redis.tls.serverName is not supported yet: the sidecar's Redis client verifies each node's certificate against the host it dials; use endpoint host names that match the certificates"}
]))]
pub struct RedisTlsSpec {
    /// Secret (in the realm's namespace) with the PEM CA certificate(s) that sign the Redis
    /// servers' certificates; absent means the system roots. Like the credentials Secret, it
    /// must be labelled `authrealm.dev/redis-credentials: "true"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<SecretKeyRef>,
    /// Reserved: a name to check the servers' certificates against. Not supported yet and
    /// refused at apply time — the sidecar's Redis client checks each node's certificate
    /// against the host it dials and cannot override it. Use endpoint host names that match
    /// the certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub server_name: Option<String>,
}

/// One key of a Secret.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret (default `ca.crt`).
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// The injected sidecar.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!(self.upstreamPort in [self.ports.public, self.ports.issuer, self.ports.admin])",
     "message": "sidecar.upstreamPort must differ from the sidecar's own ports"}
]))]
pub struct SidecarSpec {
    /// Container image of the sidecar; defaults to the image the operator was configured with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Ports the sidecar listens on.
    #[serde(default)]
    pub ports: SidecarPorts,
    /// Port of the app container; the sidecar forwards authenticated requests to
    /// `127.0.0.1:<upstreamPort>` (default 8080).
    #[serde(default = "default_upstream_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub upstream_port: i32,
    /// Routes that skip authentication (health checks, login pages, static assets).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-validations" = [
        {"rule": "self.all(r, r.path.startsWith('/') && size(r.path) <= 1024)",
         "message": "every publicRoutes path must start with '/' and be at most 1024 characters"}
    ]))]
    pub public_routes: Vec<PublicRoute>,
    /// Claims copied into request headers for the app: claim name → header name, e.g.
    /// `{sub: X-Auth-Subject, email: X-Auth-Email}`. Incoming headers with these names are
    /// stripped first, so clients cannot spoof them. Claim names may be any Unicode string;
    /// header names must be HTTP tokens. Default: `sub` → `X-Auth-Subject`, `jti` → `X-Auth-Jti`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend(
        "maxProperties" = 32,
        "additionalProperties" = {"type": "string", "maxLength": 128},
        "x-kubernetes-validations" = claim_header_rules()
    ))]
    pub claim_headers: BTreeMap<String, String>,
    /// CPU and memory of the sidecar container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl Default for SidecarSpec {
    fn default() -> Self {
        SidecarSpec {
            image: None,
            ports: SidecarPorts::default(),
            upstream_port: default_upstream_port(),
            public_routes: vec![],
            claim_headers: BTreeMap::new(),
            resources: None,
        }
    }
}

/// The sidecar's listeners.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.public != self.issuer && self.public != self.admin && self.issuer != self.admin",
     "message": "sidecar ports public, issuer and admin must be distinct"}
]))]
pub struct SidecarPorts {
    /// Proxied traffic and `/.well-known/jwks.json` (default 8443).
    #[serde(default = "default_public_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub public: i32,
    /// Issuer API, loopback only (default 8444).
    #[serde(default = "default_issuer_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub issuer: i32,
    /// Health, readiness and metrics (default 9901).
    #[serde(default = "default_admin_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub admin: i32,
}

impl Default for SidecarPorts {
    fn default() -> Self {
        SidecarPorts { public: default_public_port(), issuer: default_issuer_port(), admin: default_admin_port() }
    }
}

/// What the operator reports about a realm.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthRealmStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `KeysReady`, `RedisReachable`, `KeysIntact` and, for realms with external
    /// issuers, `IssuerKeysReady` (see the README).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Key id of the key that signs new tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_kid: Option<String>,
    /// When the current key is planned to stop signing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_time: Option<Time>,
    /// Number of keys in the published key set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_count: Option<i32>,
    /// Public facts about every key (no key material).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<KeyStatus>,
}

/// Public facts about one key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyStatus {
    pub kid: String,
    pub algorithm: Alg,
    /// `next` (published, not signing yet), `current` (signing) or `retired` (verifying only).
    pub state: String,
    pub created_at: Time,
    /// When it became, or is planned to become, current.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<Time>,
    /// For retired keys: when the key is removed (every token it can have signed has expired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_after: Option<Time>,
}

/// A duration in Go's `time.ParseDuration` format, as Kubernetes uses it (`90s`, `15m`,
/// `1h30m`, `720h`). Negative values, days and spaces are not accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GoDuration(pub String);

/// Anchored regular expression of [`GoDuration`] (also checked by the API server).
pub const DURATION_PATTERN: &str = r"^([0-9]{1,7}(\.[0-9]{1,9})?(ns|us|µs|ms|s|m|h))+$";

impl GoDuration {
    pub fn new(s: &str) -> Self {
        GoDuration(s.to_owned())
    }

    /// The duration, or why it is not one.
    pub fn parse(&self) -> Result<std::time::Duration, String> {
        if self.0.is_empty() {
            return Err("an empty string is not a duration".into());
        }
        if self.0.len() > 32 {
            return Err(format!("{:?} is longer than 32 characters", self.0));
        }
        let d: kube::core::Duration = self.0.parse().map_err(|e| format!("{:?} is not a duration: {e}", self.0))?;
        if d.is_negative() {
            return Err(format!("{:?} is negative", self.0));
        }
        Ok(d.into())
    }

    /// Whole seconds, rounded up (a 1.5s leeway tolerates 2s).
    pub fn seconds_ceil(&self) -> Result<i64, String> {
        let d = self.parse()?;
        let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        i64::try_from(s).map_err(|_| format!("{:?} is too long", self.0))
    }

    /// Whole milliseconds, rounded up.
    pub fn millis_ceil(&self) -> Result<u64, String> {
        let d = self.parse()?;
        Ok(d.as_millis().try_into().unwrap_or(u64::MAX) + u64::from(d.subsec_nanos() % 1_000_000 > 0))
    }
}

impl JsonSchema for GoDuration {
    fn schema_name() -> Cow<'static, str> {
        "GoDuration".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "maxLength": 32,
            "pattern": DURATION_PATTERN,
        })
    }
}

fn spec_rules() -> serde_json::Value {
    json!([
        {"rule": "duration(self.tokenTtl) >= duration('1s') && duration(self.tokenTtl) <= duration('8784h')",
         "message": "tokenTtl must be between 1s and 8784h"},
        {"rule": "!has(self.maxTokenTtl) || (duration(self.maxTokenTtl) >= duration(self.tokenTtl) && duration(self.maxTokenTtl) <= duration('8784h'))",
         "message": "maxTokenTtl must be at least tokenTtl and at most 8784h"},
        {"rule": "duration(has(self.maxTokenTtl) ? self.maxTokenTtl : self.tokenTtl) <= duration(self.keyRotation.interval)",
         "message": "the token lifetime (maxTokenTtl, or tokenTtl when it is unset) must not be longer than keyRotation.interval"},
        {"rule": "duration(self.clockLeeway) <= duration('10m')",
         "message": "clockLeeway must be at most 10m"},
        {"rule": "self.sessionMode == 'stateless' || has(self.redis)",
         "message": "redis is required unless sessionMode is stateless"},
        // Cheapest first (CEL cost is bounded per call): a public route can only cover the rule's
        // path when it is at most one character longer; methods are compared last.
        {"rule": "!has(self.authorization) || !has(self.sidecar) || !has(self.sidecar.publicRoutes) || self.authorization.rules.all(r, !self.sidecar.publicRoutes.exists(p, size(p.path) <= size(r.path) + 1 && (p.match == 'exact' ? (p.path.lowerAscii() == r.path.lowerAscii() || p.path.lowerAscii() == r.path.lowerAscii() + '/') : (r.path.lowerAscii() + '/').startsWith(p.path.endsWith('/') ? p.path.lowerAscii() : p.path.lowerAscii() + '/')) && (!has(p.methods) || size(p.methods) == 0 || size(r.methods) == 0 || p.methods.exists(m, m in r.methods || (m == 'HEAD' && 'GET' in r.methods)))))",
         "message": "an authorization rule's path is made public by sidecar.publicRoutes for one of its methods: public routes skip authentication, so the rule could never apply"},
    ])
    .as_array()
    .into_iter()
    .flatten()
    .chain(crate::issuers::spec_rules().as_array().into_iter().flatten())
    .cloned()
    .collect()
}

/// CEL on `spec.authorization`: no two rules may decide the same requests. The per-rule checks
/// (paths, non-empty requirements) are on the rule type in `authrealm_contract::authz`.
fn authorization_rules() -> serde_json::Value {
    json!([
        {"rule": "self.rules.all(a, self.rules.exists_one(b, b.path.lowerAscii() == a.path.lowerAscii() && b.match == a.match && ((size(a.methods) == 0 && size(b.methods) == 0) || a.methods.exists(m, m in b.methods))))",
         "message": "authorization.rules are ambiguous: two rules have the same path and match (compared case-insensitively) and share a method, or neither lists methods"},
    ])
}

fn redis_rules() -> serde_json::Value {
    json!([
        {"rule": "has(self.endpoints) != has(self.service)",
         "message": "set exactly one of redis.endpoints and redis.service"},
        {"rule": "self.mode != 'standalone' || !has(self.endpoints) || size(self.endpoints) == 1",
         "message": "redis.mode standalone takes exactly one endpoint (the Redis server)"},
        {"rule": "!self.keyPrefix.contains('{') && !self.keyPrefix.contains('}')",
         "message": "redis.keyPrefix must not contain '{' or '}' (they would break the cluster hash tags)"},
        {"rule": "duration(self.connectTimeout) > duration('0s') && duration(self.commandTimeout) > duration('0s') && duration(self.waitTimeout) > duration('0s')",
         "message": "redis timeouts must be longer than 0s"},
    ])
}

/// Host (DNS name, IPv4, or bracketed IPv6) and a port in 1..=65535.
pub const ENDPOINT_PATTERN: &str = concat!(
    r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)",
    r":([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$"
);

fn endpoint_rules() -> serde_json::Value {
    json!([
        {"rule": "size(self) > 0", "message": "redis.endpoints must list at least one host:port"},
        {"rule": format!("self.all(e, e.matches(r'{ENDPOINT_PATTERN}'))"),
         "message": "every redis endpoint must be host:port with a port between 1 and 65535, e.g. redis-0.redis:6379"},
    ])
}

/// RFC 9110 header-name characters; headers that would break HTTP or authentication are refused.
const HEADER_PATTERN: &str = r"^[-A-Za-z0-9!#$%&'*+.^_`|~]{1,128}$";

fn claim_header_rules() -> serde_json::Value {
    json!([
        {"rule": "self.all(c, size(c) <= 256)", "message": "claim names are at most 256 characters"},
        {"rule": format!("self.all(c, self[c].matches(r\"{HEADER_PATTERN}\"))"),
         "message": "claimHeaders values must be HTTP header names (letters, digits and !#$%&'*+-.^_`|~, at most 128)"},
        {"rule": "self.all(c, !(self[c].lowerAscii() in ['authorization', 'host', 'cookie', 'content-length', 'transfer-encoding', 'connection', 'upgrade', 'te', 'trailer', 'proxy-authorization']))",
         "message": "claimHeaders must not target Authorization, Host, Cookie or hop-by-hop headers"},
    ])
}

fn default_alg() -> Alg {
    Alg::ES256
}
fn default_token_ttl() -> GoDuration {
    GoDuration::new("15m")
}
fn default_leeway() -> GoDuration {
    GoDuration::new("30s")
}
fn default_interval() -> GoDuration {
    GoDuration::new("720h")
}
fn default_propagation() -> GoDuration {
    GoDuration::new("2m")
}
fn default_key_prefix() -> String {
    "ar:".into()
}
fn default_connect_timeout() -> GoDuration {
    GoDuration::new("1s")
}
fn default_command_timeout() -> GoDuration {
    GoDuration::new("250ms")
}
fn default_wait_replicas() -> i32 {
    1
}
fn default_wait_timeout() -> GoDuration {
    GoDuration::new("500ms")
}
fn default_password_key() -> String {
    "password".into()
}
fn default_ca_key() -> String {
    "ca.crt".into()
}
fn default_upstream_port() -> i32 {
    8080
}
fn default_public_port() -> i32 {
    8443
}
fn default_issuer_port() -> i32 {
    8444
}
fn default_admin_port() -> i32 {
    9901
}

/// The CRD as YAML, exactly as committed in `crds/authrealm.yaml`.
pub fn crd_yaml() -> String {
    let header = "# Generated from operator/src/crd.rs by `hack/crdgen.sh`; do not edit.\n";
    format!("{header}{}", serde_yaml_ng::to_string(&AuthRealm::crd()).expect("CRD serialises"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_crd_yaml_is_up_to_date() {
        // Two committed copies: `crds/` for `kubectl apply`, and the Helm chart's `crds/` (Helm cannot
        // reach outside the chart directory). Both must be exactly what the types generate.
        let generated = crd_yaml();
        for rel in ["/../crds/authrealm.yaml", "/../charts/authrealm/crds/authrealm.yaml"] {
            let path = format!("{}{rel}", env!("CARGO_MANIFEST_DIR"));
            if std::env::var_os("AUTHREALM_BLESS").is_some() {
                std::fs::write(&path, &generated).unwrap();
            }
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == generated,
                "{rel} is stale: run `hack/crdgen.sh` (or AUTHREALM_BLESS=1 cargo test -p authrealm-operator --lib crd)"
            );
        }
    }

    #[test]
    fn durations_parse_like_go() {
        for (s, secs) in [("15m", 900), ("1h30m", 5400), ("1.5s", 2), ("250ms", 1), ("0s", 0), ("720h", 2_592_000)] {
            assert_eq!(GoDuration::new(s).seconds_ceil(), Ok(secs), "{s}");
        }
        assert_eq!(GoDuration::new("250ms").millis_ceil(), Ok(250));
        for bad in ["", "5", "-5s", "5 minutes", "1d", "1y", "abc", &"9".repeat(40)] {
            assert!(GoDuration::new(bad).parse().is_err(), "{bad:?}");
        }
        let re_ok = |s: &str| {
            // The schema pattern and the Rust parser agree on the usual cases.
            s.len() <= 32 && GoDuration::new(s).parse().is_ok()
        };
        assert!(re_ok("90s") && re_ok("1h1m1s"));
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let spec: AuthRealmSpec = serde_json::from_value(json!({
            "issuer": "https://auth.example.com",
            "audiences": ["app"],
            "sessionMode": "stateless",
        }))
        .unwrap();
        assert_eq!(spec.algorithm, Alg::ES256);
        assert_eq!(spec.key_rotation.interval.0, "720h");
        assert_eq!(spec.sidecar.ports.public, 8443);
        assert!(spec.redis.is_none());
    }

    #[test]
    fn schema_carries_cel_rules_and_printer_columns() {
        let crd = serde_json::to_value(AuthRealm::crd()).unwrap();
        let text = crd.to_string();
        for needle in [
            "at least one audience is required",
            "must not be longer than keyRotation.interval",
            "every redis endpoint must be host:port",
            "redis.mode standalone takes exactly one endpoint",
            "size(self.metadata.name) <= 63",
            "Next Rotation",
        ] {
            assert!(text.contains(needle), "CRD lacks {needle:?}");
        }
        assert_eq!(crd["spec"]["names"]["shortNames"], json!(["ar"]));
        let columns = crd["spec"]["versions"][0]["additionalPrinterColumns"].as_array().unwrap();
        let next = columns.iter().find(|c| c["name"] == "Next Rotation").unwrap();
        assert_eq!(next["type"], "string", "a future time in a date column shows as <invalid> in kubectl");
    }
}
