//! The sidecar patch: a pure function from (Pod, [`SidecarPlan`]) to an RFC 6902 JSON patch.
//!
//! What [`mutate`] adds to a Pod (and nothing else — app containers are never touched):
//!
//! * the sidecar as a **native sidecar**: an init container with `restartPolicy: Always`
//!   (Kubernetes ≥ 1.29), appended after the Pod's own init containers, so it starts before the
//!   app containers and stops after them. Its `startupProbe` on the admin port holds the app
//!   containers back until it serves;
//! * its ports: the public listener named `authrealm` (point a Service's `targetPort` at it) and
//!   the admin listener named `authrealm-admin` (`/healthz`, `/readyz`, `/metrics`); the issuer API
//!   stays on loopback and is not declared;
//! * volume `authrealm-config` (ConfigMap `<realm>-sidecar`, mounted at `/etc/authrealm/config`) and
//!   volume `authrealm-keys` at `/etc/authrealm/keys`: ConfigMap `<realm>-jwks` (public keys only)
//!   for verifiers, Secret `<realm>-signing-keys` (private key set) for issuers;
//! * the Redis password / ACL user as `secretKeyRef` environment variables from the Secret the
//!   realm references (the value never passes through the operator);
//! * liveness (`/healthz`) and readiness (`/readyz`) probes, resources, and a securityContext that
//!   meets the `restricted` Pod Security Standard on its own (non-root, read-only root file system,
//!   no privilege escalation, all capabilities dropped, RuntimeDefault seccomp);
//! * the annotation `authrealm.dev/sidecar-status` recording what was injected, which (with the
//!   sidecar init container) marks the Pod as injected: a reinvocation is skipped by
//!   [`super::decide::decide`] (row 5) before any patch is made.
//!
//! Ports, mount paths and environment names come from the [`SidecarPlan`], which
//! [`super::realm`] derives from the sidecar config the operator rendered for the realm — the
//! same file the sidecar reads — never from a second reading of the spec.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, ResourceRequirements};
use serde_json::{Value, json};

use super::decide::{Injected, Role};
use super::{SIDECAR_CONTAINER, STATUS_ANNOTATION};
use crate::render::{CONFIG_FILE, CONFIG_MOUNT_DIR, jwks_name, sidecar_config_name, signing_keys_name};

/// Name of the volume holding the sidecar config.
pub const CONFIG_VOLUME: &str = "authrealm-config";
/// Name of the volume holding the key set.
pub const KEYS_VOLUME: &str = "authrealm-keys";
/// Name of the volume holding the Redis CA certificate (realms with `redis.tls.caSecret`).
pub const REDIS_CA_VOLUME: &str = "authrealm-redis-ca";
/// Name of the sidecar's public (proxy) port; Services target it.
pub const PUBLIC_PORT_NAME: &str = "authrealm";
/// Name of the sidecar's admin port.
pub const ADMIN_PORT_NAME: &str = "authrealm-admin";
/// UID and GID the sidecar runs as (distroless `nonroot`).
pub const SIDECAR_UID: i64 = 65532;

/// Where the sidecar finds its Redis credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisCredentialRefs {
    /// Secret in the Pod's namespace.
    pub secret_name: String,
    pub password_key: String,
    pub username_key: Option<String>,
    /// Environment variable names the sidecar config names (`redis.passwordEnv`/`usernameEnv`).
    pub password_env: String,
    pub username_env: String,
}

/// The Redis CA certificate: key `key` of Secret `secret`, mounted as `file` in `mount_dir` (the
/// path the sidecar config's `redis.tls.caFile` names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisCaRef {
    pub secret: String,
    pub key: String,
    pub mount_dir: String,
    pub file: String,
}

/// Everything about the sidecar that does not come from the Pod.
#[derive(Clone, Debug, PartialEq)]
pub struct SidecarPlan {
    pub realm: String,
    pub role: Role,
    pub image: String,
    pub image_pull_policy: Option<String>,
    pub public_port: u16,
    pub issuer_port: u16,
    pub admin_port: u16,
    /// Where the key set is mounted (the directory of the config's `keySetFile`).
    pub keys_mount_dir: String,
    pub resources: ResourceRequirements,
    pub redis: Option<RedisCredentialRefs>,
    pub redis_ca: Option<RedisCaRef>,
    /// External issuers' CA bundles: (issuer index, ConfigMap, key), projected into one volume
    /// as `<index>.crt` under [`crate::issuers::ISSUER_CA_MOUNT_DIR`].
    pub issuer_cas: Vec<(usize, String, String)>,
}

/// A Pod the sidecar cannot be added to; the message is shown to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MutateError {
    #[error("container {container:?} already declares port {port}, which the authrealm sidecar listens on")]
    PortConflict { container: String, port: u16 },
    #[error("the pod already has a {what} named {name:?}, which the authrealm sidecar needs")]
    NameConflict { what: &'static str, name: String },
}

/// The annotation value recording an injection (JSON).
pub fn status_annotation(plan: &SidecarPlan) -> String {
    json!({
        "injector": env!("CARGO_PKG_VERSION"),
        "realm": plan.realm,
        "role": plan.role.as_str(),
        "image": plan.image,
        "container": SIDECAR_CONTAINER,
        "volumes": sidecar_volumes(plan).iter().map(|v| v["name"].clone()).collect::<Vec<_>>(),
    })
    .to_string()
}

/// What the Pod already carries of an injection: complete only with the status annotation
/// **and** the sidecar init container. Either alone (a copied annotation, a container of that
/// name) is not an injection: treating it as one would admit the Pod unprotected.
pub fn injection(pod: &Pod) -> Injected {
    let annotated = pod.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(STATUS_ANNOTATION));
    let spec = pod.spec.as_ref();
    let init = spec.is_some_and(|s| s.init_containers.iter().flatten().any(|c| c.name == SIDECAR_CONTAINER));
    let regular = spec.is_some_and(|s| s.containers.iter().any(|c| c.name == SIDECAR_CONTAINER));
    match (annotated, init, regular) {
        (false, false, false) => Injected::No,
        (true, true, false) => Injected::Yes,
        (_, _, true) => Injected::Partly(format!("a regular container named {SIDECAR_CONTAINER:?}")),
        (true, false, false) => {
            Injected::Partly(format!("the annotation {STATUS_ANNOTATION} but no {SIDECAR_CONTAINER:?} init container"))
        }
        (false, true, false) => Injected::Partly(format!(
            "an init container named {SIDECAR_CONTAINER:?} but not the annotation {STATUS_ANNOTATION}"
        )),
    }
}

/// The sidecar container (JSON, as it appears in the Pod).
pub fn sidecar_container(plan: &SidecarPlan) -> Value {
    let mut env = Vec::new();
    if let Some(redis) = &plan.redis {
        env.push(json!({
            "name": redis.password_env,
            "valueFrom": {"secretKeyRef": {"name": redis.secret_name, "key": redis.password_key}},
        }));
        if let Some(user_key) = &redis.username_key {
            env.push(json!({
                "name": redis.username_env,
                "valueFrom": {"secretKeyRef": {"name": redis.secret_name, "key": user_key}},
            }));
        }
    }
    env.push(json!({"name": "AUTHREALM_LOG_FORMAT", "value": "json"}));
    let probe = |path: &str, period: u32, failures: u32| {
        json!({
            "httpGet": {"path": path, "port": plan.admin_port},
            "periodSeconds": period,
            "timeoutSeconds": 1,
            "failureThreshold": failures,
        })
    };
    let mut container = json!({
        "name": SIDECAR_CONTAINER,
        "image": plan.image,
        "args": ["run", "--config", CONFIG_FILE],
        "restartPolicy": "Always",
        "ports": [
            {"name": PUBLIC_PORT_NAME, "containerPort": plan.public_port, "protocol": "TCP"},
            {"name": ADMIN_PORT_NAME, "containerPort": plan.admin_port, "protocol": "TCP"},
        ],
        "env": env,
        "volumeMounts": [
            {"name": CONFIG_VOLUME, "mountPath": CONFIG_MOUNT_DIR, "readOnly": true},
            {"name": KEYS_VOLUME, "mountPath": plan.keys_mount_dir, "readOnly": true},
        ],
        "startupProbe": probe("/healthz", 1, 60),
        "livenessProbe": probe("/healthz", 10, 3),
        "readinessProbe": probe("/readyz", 5, 2),
        "resources": serde_json::to_value(&plan.resources).expect("resources serialise"),
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    });
    if let Some(ca) = &plan.redis_ca {
        container["volumeMounts"]
            .as_array_mut()
            .expect("array")
            .push(json!({"name": REDIS_CA_VOLUME, "mountPath": ca.mount_dir, "readOnly": true}));
    }
    if !plan.issuer_cas.is_empty() {
        container["volumeMounts"].as_array_mut().expect("array").push(json!({
            "name": crate::issuers::ISSUER_CA_VOLUME,
            "mountPath": crate::issuers::ISSUER_CA_MOUNT_DIR,
            "readOnly": true,
        }));
    }
    if let Some(policy) = &plan.image_pull_policy {
        container["imagePullPolicy"] = json!(policy);
    }
    container
}

/// The sidecar's volumes (JSON): config, keys, and the Redis CA when the realm has one.
pub fn sidecar_volumes(plan: &SidecarPlan) -> Vec<Value> {
    let keys = match plan.role {
        Role::Issuer => json!({"name": KEYS_VOLUME, "secret": {"secretName": signing_keys_name(&plan.realm)}}),
        Role::Verifier => json!({"name": KEYS_VOLUME, "configMap": {"name": jwks_name(&plan.realm)}}),
    };
    let mut volumes =
        vec![json!({"name": CONFIG_VOLUME, "configMap": {"name": sidecar_config_name(&plan.realm)}}), keys];
    if let Some(ca) = &plan.redis_ca {
        volumes.push(json!({
            "name": REDIS_CA_VOLUME,
            "secret": {"secretName": ca.secret, "items": [{"key": ca.key, "path": ca.file}]},
        }));
    }
    if !plan.issuer_cas.is_empty() {
        let sources: Vec<Value> = plan
            .issuer_cas
            .iter()
            // Optional: a missing bundle fails only that issuer's fetches (IssuerKeysReady says
            // which ConfigMap), never the pod; the sidecar reads the file on every fetch.
            .map(|(i, cm, key)| {
                json!({"configMap": {"name": cm, "optional": true, "items": [{"key": key, "path": format!("{i}.crt")}]}})
            })
            .collect();
        volumes.push(json!({"name": crate::issuers::ISSUER_CA_VOLUME, "projected": {"sources": sources}}));
    }
    volumes
}

/// JSON-pointer escaping of one path segment (RFC 6901).
fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// The patch that adds the sidecar to `pod`, which carries no trace of an injection
/// ([`injection`] is [`Injected::No`]: [`super::decide::decide`] skips or refuses any other Pod).
pub fn mutate(pod: &Pod, plan: &SidecarPlan) -> Result<json_patch::Patch, MutateError> {
    let spec = pod.spec.clone().unwrap_or_default();
    for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
        for p in c.ports.iter().flatten() {
            if let Ok(port) = u16::try_from(p.container_port)
                && [plan.public_port, plan.issuer_port, plan.admin_port].contains(&port)
            {
                return Err(MutateError::PortConflict { container: c.name.clone(), port });
            }
        }
    }
    for v in spec.volumes.iter().flatten() {
        if [CONFIG_VOLUME, KEYS_VOLUME, REDIS_CA_VOLUME, crate::issuers::ISSUER_CA_VOLUME].contains(&v.name.as_str()) {
            return Err(MutateError::NameConflict { what: "volume", name: v.name.clone() });
        }
    }

    let mut ops: Vec<Value> = Vec::new();
    let container = sidecar_container(plan);
    if spec.init_containers.as_ref().is_some_and(|c| !c.is_empty()) {
        ops.push(json!({"op": "add", "path": "/spec/initContainers/-", "value": container}));
    } else {
        ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [container]}));
    }
    let volumes = sidecar_volumes(plan);
    if spec.volumes.as_ref().is_some_and(|v| !v.is_empty()) {
        for v in volumes {
            ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": v}));
        }
    } else {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": volumes}));
    }
    let status = status_annotation(plan);
    if pod.metadata.annotations.is_some() {
        ops.push(json!({
            "op": "add",
            "path": format!("/metadata/annotations/{}", escape(STATUS_ANNOTATION)),
            "value": status,
        }));
    } else {
        ops.push(json!({
            "op": "add",
            "path": "/metadata/annotations",
            "value": BTreeMap::from([(STATUS_ANNOTATION, status)]),
        }));
    }
    Ok(serde_json::from_value(Value::Array(ops)).expect("well-formed JSON patch"))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    use super::*;

    fn plan(role: Role) -> SidecarPlan {
        SidecarPlan {
            realm: "demo".into(),
            role,
            image: "ghcr.io/authrealm/sidecar:0.1.0".into(),
            image_pull_policy: Some("IfNotPresent".into()),
            public_port: 8443,
            issuer_port: 8444,
            admin_port: 9901,
            keys_mount_dir: "/etc/authrealm/keys".into(),
            resources: ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".into(), Quantity("50m".into())),
                    ("memory".into(), Quantity("32Mi".into())),
                ])),
                limits: Some(BTreeMap::from([("memory".into(), Quantity("128Mi".into()))])),
                ..Default::default()
            },
            redis: Some(RedisCredentialRefs {
                secret_name: "redis-auth".into(),
                password_key: "password".into(),
                username_key: None,
                password_env: "AUTHREALM_REDIS_PASSWORD".into(),
                username_env: "AUTHREALM_REDIS_USERNAME".into(),
            }),
            redis_ca: None,
            issuer_cas: vec![],
        }
    }

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn minimal_pod() -> Pod {
        pod(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "labels": {"authrealm.dev/realm": "demo"}},
            "spec": {"containers": [{"name": "app", "image": "example/app:1"}]},
        }))
    }

    fn busy_pod() -> Pod {
        pod(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "login",
                "labels": {"authrealm.dev/realm": "demo"},
                "annotations": {"authrealm.dev/role": "issuer", "team": "a"},
            },
            "spec": {
                "initContainers": [{"name": "migrate", "image": "example/migrate:1"}],
                "containers": [{"name": "app", "image": "example/app:1", "ports": [{"containerPort": 8080}]}],
                "volumes": [{"name": "scratch", "emptyDir": {}}],
            },
        }))
    }

    /// Golden cases: (file stem, pod, plan).
    fn golden_cases() -> Vec<(&'static str, Pod, SidecarPlan)> {
        let mut stateless = plan(Role::Verifier);
        stateless.redis = None;
        let mut acl = plan(Role::Issuer);
        if let Some(r) = acl.redis.as_mut() {
            r.username_key = Some("username".into());
        }
        acl.public_port = 10443;
        acl.admin_port = 10901;
        acl.image_pull_policy = None;
        acl.redis_ca = Some(RedisCaRef {
            secret: "redis-tls".into(),
            key: "ca.pem".into(),
            mount_dir: "/etc/authrealm/redis-ca".into(),
            file: "ca.crt".into(),
        });
        vec![
            ("verifier-minimal-pod", minimal_pod(), plan(Role::Verifier)),
            ("issuer-pod-with-init-containers-volumes-annotations", busy_pod(), plan(Role::Issuer)),
            ("stateless-realm-no-redis-credentials", minimal_pod(), stateless),
            ("acl-user-redis-tls-custom-ports", minimal_pod(), acl),
        ]
    }

    fn golden_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/webhook")
    }

    /// The JSON patches match `operator/tests/golden/webhook/*.patch.json`, and applying them gives
    /// `*.pod.json`. Regenerate with `AUTHREALM_BLESS=1 cargo test -p authrealm-operator --lib webhook`.
    #[test]
    fn golden_patches() {
        let bless = std::env::var_os("AUTHREALM_BLESS").is_some();
        let mut stale = Vec::new();
        for (stem, pod, plan) in golden_cases() {
            let patch = mutate(&pod, &plan).unwrap();
            let mut doc = serde_json::to_value(&pod).unwrap();
            json_patch::patch(&mut doc, &patch).unwrap();
            for (suffix, value) in [("patch", serde_json::to_value(&patch).unwrap()), ("pod", doc)] {
                let path = golden_dir().join(format!("{stem}.{suffix}.json"));
                let text = serde_json::to_string_pretty(&value).unwrap() + "\n";
                if bless {
                    std::fs::create_dir_all(golden_dir()).unwrap();
                    std::fs::write(&path, &text).unwrap();
                }
                if std::fs::read_to_string(&path).unwrap_or_default() != text {
                    stale.push(path.display().to_string());
                }
            }
        }
        assert!(
            stale.is_empty(),
            "golden files differ: {stale:?}\nregenerate with AUTHREALM_BLESS=1 cargo test -p authrealm-operator --lib webhook"
        );
    }

    #[test]
    fn a_patched_pod_counts_as_injected_with_one_sidecar_after_its_own_init_containers() {
        for (stem, pod, plan) in golden_cases() {
            let patch = mutate(&pod, &plan).unwrap();
            let mut doc = serde_json::to_value(&pod).unwrap();
            json_patch::patch(&mut doc, &patch).unwrap();
            let injected: Pod = serde_json::from_value(doc).unwrap();
            assert_eq!(injection(&injected), Injected::Yes, "{stem}: a reinvocation is skipped (decide, row 5)");
            let spec = injected.spec.as_ref().unwrap();
            let sidecars: Vec<_> =
                spec.init_containers.iter().flatten().filter(|c| c.name == SIDECAR_CONTAINER).collect();
            assert_eq!(sidecars.len(), 1, "{stem}");
            let sidecar = sidecars[0];
            assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"), "{stem}");
            // The sidecar comes after the pod's own init containers.
            assert_eq!(spec.init_containers.as_ref().unwrap().last().unwrap().name, SIDECAR_CONTAINER, "{stem}");
            // App containers untouched.
            assert_eq!(spec.containers, pod.spec.as_ref().unwrap().containers, "{stem}");
        }
    }

    #[test]
    fn verifiers_never_mount_private_keys_and_issuers_do() {
        let volumes = |role| serde_json::to_string(&sidecar_volumes(&plan(role))).unwrap();
        let verifier = volumes(Role::Verifier);
        assert!(verifier.contains("demo-jwks") && !verifier.contains("signing-keys") && !verifier.contains("secret"));
        let issuer = volumes(Role::Issuer);
        assert!(issuer.contains(r#""secretName":"demo-signing-keys""#) && !issuer.contains("demo-jwks"));
    }

    #[test]
    fn external_issuer_ca_bundles_are_projected_where_the_config_names_them() {
        let mut p = plan(Role::Verifier);
        assert!(!serde_json::to_string(&sidecar_volumes(&p)).unwrap().contains("issuer-ca"));
        p.issuer_cas = vec![(0, "dex-ca".into(), "ca.crt".into()), (2, "kc-ca".into(), "bundle.pem".into())];
        let volumes = serde_json::to_value(sidecar_volumes(&p)).unwrap();
        let v = volumes.as_array().unwrap().iter().find(|v| v["name"] == "authrealm-issuer-ca").unwrap();
        assert_eq!(
            v["projected"]["sources"],
            json!([
                {"configMap": {"name": "dex-ca", "optional": true, "items": [{"key": "ca.crt", "path": "0.crt"}]}},
                {"configMap": {"name": "kc-ca", "optional": true, "items": [{"key": "bundle.pem", "path": "2.crt"}]}},
            ])
        );
        let c = sidecar_container(&p);
        let mount = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == "authrealm-issuer-ca").unwrap();
        // The rendered sidecar.json names crate::issuers::ca_file(i) under this directory.
        assert_eq!(mount["mountPath"], "/etc/authrealm/issuer-ca");
        assert!(crate::issuers::ca_file(2).starts_with("/etc/authrealm/issuer-ca/"));
    }

    #[test]
    fn security_context_meets_restricted() {
        let c = sidecar_container(&plan(Role::Verifier));
        let sc = &c["securityContext"];
        assert_eq!(sc["runAsNonRoot"], json!(true));
        assert_eq!(sc["allowPrivilegeEscalation"], json!(false));
        assert_eq!(sc["readOnlyRootFilesystem"], json!(true));
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(sc["seccompProfile"]["type"], json!("RuntimeDefault"));
        assert!(sc["capabilities"].get("add").is_none());
    }

    #[test]
    fn conflicts_are_refused_with_a_message() {
        let mut p = minimal_pod();
        p.spec.as_mut().unwrap().containers[0].ports =
            Some(vec![serde_json::from_value(json!({"containerPort": 9901})).unwrap()]);
        let err = mutate(&p, &plan(Role::Verifier)).unwrap_err();
        assert_eq!(err, MutateError::PortConflict { container: "app".into(), port: 9901 });
        assert!(err.to_string().contains("port 9901"));

        let mut p = minimal_pod();
        p.spec.as_mut().unwrap().volumes =
            Some(vec![serde_json::from_value(json!({"name": "authrealm-keys", "emptyDir": {}})).unwrap()]);
        assert!(matches!(mutate(&p, &plan(Role::Verifier)), Err(MutateError::NameConflict { what: "volume", .. })));
    }

    #[test]
    fn only_annotation_and_init_container_together_count_as_injected() {
        let injected = {
            let p = minimal_pod();
            let mut doc = serde_json::to_value(&p).unwrap();
            json_patch::patch(&mut doc, &mutate(&p, &plan(Role::Verifier)).unwrap()).unwrap();
            serde_json::from_value::<Pod>(doc).unwrap()
        };
        assert_eq!(injection(&injected), Injected::Yes);
        assert_eq!(injection(&minimal_pod()), Injected::No);
        // The annotation copied into a template, without the sidecar.
        let mut copied = minimal_pod();
        copied.metadata.annotations = injected.metadata.annotations.clone();
        assert!(
            matches!(injection(&copied), Injected::Partly(w) if w.contains("no \"authrealm-sidecar\" init container"))
        );
        // The init container without the annotation.
        let mut bare = injected.clone();
        bare.metadata.annotations = None;
        assert!(matches!(injection(&bare), Injected::Partly(w) if w.contains("not the annotation")));
        // An app container that happens to use the sidecar's name, annotated or not.
        let mut named = minimal_pod();
        named.spec.as_mut().unwrap().containers[0].name = SIDECAR_CONTAINER.into();
        assert!(matches!(injection(&named), Injected::Partly(w) if w.contains("regular container")));
        named.metadata.annotations = injected.metadata.annotations.clone();
        assert!(matches!(injection(&named), Injected::Partly(_)));
    }

    #[test]
    fn annotation_keys_with_slashes_are_escaped() {
        let patch = mutate(&busy_pod(), &plan(Role::Issuer)).unwrap();
        let text = serde_json::to_string(&patch).unwrap();
        assert!(text.contains("/metadata/annotations/authrealm.dev~1sidecar-status"), "{text}");
    }
}
