//! Sidecar injection through a real kube-apiserver: the API server calls the operator's webhook
//! (running in this process on 127.0.0.1, trusted through the caBundle it publishes itself) for
//! every Pod created in these tests.

mod webhook_support;

use std::time::{Duration, Instant};

use authrealm_operator::webhook::lookup::{Lookups, Source};
use authrealm_operator::webhook::metrics::Outcome;
use authrealm_operator::webhook::realm::{SidecarDefaults, default_resources};
use authrealm_operator::webhook::review::Reviewer;
use authrealm_operator::webhook::{STATUS_ANNOTATION, UnreadyRealmPolicy, WebhookMetrics};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};
use webhook_support::{Fixture, app_pod, eventually, keys_volume, mounted_secrets, sidecar_count};

fn status_message(body: &serde_json::Value) -> String {
    body["message"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelled_pods_get_the_sidecar_exactly_once_and_opt_outs_win() -> anyhow::Result<()> {
    let started = Instant::now();
    let fx = Fixture::start(|_| {}).await?;
    eprintln!("fixture ready after {:.1?}", started.elapsed());
    let ns = fx.namespace("inject").await?;
    fx.create_realm(&ns, "demo", None, true).await?;
    let pods = fx.pods(&ns);
    let pp = PostParams::default();

    // A labelled Pod comes back with the sidecar, once, as a native sidecar.
    let web = pods.create(&pp, &app_pod("web", "demo", &[])).await?;
    assert_eq!(sidecar_count(&web), 1, "labelled pod injected exactly once");
    let spec = web.spec.as_ref().unwrap();
    let sidecar = &spec.init_containers.as_ref().unwrap()[0];
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(sidecar.image.as_deref(), Some("authrealm-sidecar:test"));
    let ports: Vec<_> =
        sidecar.ports.iter().flatten().map(|p| (p.name.clone().unwrap_or_default(), p.container_port)).collect();
    assert!(ports.contains(&("authrealm".into(), 8443)), "public port named for Services: {ports:?}");
    let env = sidecar.env.as_ref().unwrap();
    let password = env.iter().find(|e| e.name == "AUTHREALM_REDIS_PASSWORD").expect("password env");
    let key_ref = password.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()).unwrap();
    assert_eq!((key_ref.name.as_str(), key_ref.key.as_str()), ("redis-auth", "password"));
    assert!(password.value.is_none(), "the password is never inlined");
    assert_eq!(spec.containers.len(), 1, "app containers untouched");
    let status = web.metadata.annotations.as_ref().and_then(|a| a.get(STATUS_ANNOTATION)).expect("status annotation");
    assert!(status.contains(r#""role":"verifier""#) && status.contains(r#""realm":"demo""#), "{status}");
    // Verify-only: the public key set, and no Secret at all.
    assert_eq!(keys_volume(&web), Some(("configMap", "demo-jwks".to_owned())));
    assert!(mounted_secrets(&web).is_empty(), "{:?}", mounted_secrets(&web));

    // An issuer Pod gets the private key set.
    let login = pods.create(&pp, &app_pod("login", "demo", &[("authrealm.dev/role", "issuer")])).await?;
    assert_eq!(sidecar_count(&login), 1);
    assert_eq!(keys_volume(&login), Some(("secret", "demo-signing-keys".to_owned())));

    // An HMAC realm has no public keys: every pod mounts the (secret) key set.
    fx.create_realm(&ns, "shared", Some("HS256"), true).await?;
    let hmac = pods.create(&pp, &app_pod("hmac", "shared", &[])).await?;
    assert_eq!(keys_volume(&hmac), Some(("secret", "shared-signing-keys".to_owned())));

    // An unlabelled Pod is untouched (the objectSelector keeps it away from the webhook).
    let plain_in = app_pod("plain", "", &[]);
    let plain = pods.create(&pp, &plain_in).await?;
    assert_eq!(sidecar_count(&plain), 0);
    assert!(plain.spec.as_ref().unwrap().init_containers.is_none());
    assert!(plain.metadata.annotations.as_ref().is_none_or(|a| !a.contains_key(STATUS_ANNOTATION)));

    // Opt-outs win: the pod annotation…
    let opted_out = pods.create(&pp, &app_pod("opted-out", "demo", &[("authrealm.dev/inject", "false")])).await?;
    assert_eq!(sidecar_count(&opted_out), 0);
    // …even with an invalid role annotation that would otherwise be refused…
    let opted_out2 = pods
        .create(
            &pp,
            &app_pod(
                "opted-out-2",
                "nonexistent",
                &[("authrealm.dev/inject", "false"), ("authrealm.dev/role", "admin")],
            ),
        )
        .await?;
    assert_eq!(sidecar_count(&opted_out2), 0);
    // …and the namespace label.
    let off_ns = fx.namespace_with("optout", &[("authrealm.dev/injection", "disabled")]).await?;
    fx.create_realm(&off_ns, "demo", None, true).await?;
    let off = fx.pods(&off_ns).create(&pp, &app_pod("web", "demo", &[])).await?;
    assert_eq!(sidecar_count(&off), 0);

    // Reinvocation: a Pod that already carries the sidecar goes through unchanged.
    let before = fx.metrics.admission(Outcome::Skipped, "AlreadyInjected");
    let mut again: Pod = web.clone();
    again.metadata = kube::api::ObjectMeta {
        name: Some("web-again".into()),
        labels: web.metadata.labels.clone(),
        annotations: web.metadata.annotations.clone(),
        ..Default::default()
    };
    let again = pods.create(&pp, &again).await?;
    assert_eq!(sidecar_count(&again), 1, "no second sidecar");
    assert_eq!(again.spec.as_ref().unwrap().init_containers, web.spec.as_ref().unwrap().init_containers);
    assert_eq!(again.spec.as_ref().unwrap().volumes, web.spec.as_ref().unwrap().volumes);
    assert_eq!(
        fx.metrics.admission(Outcome::Skipped, "AlreadyInjected"),
        before + 1,
        "the webhook was called and chose to change nothing"
    );

    // Only the status annotation (copied into a template from an injected pod): not an injection,
    // so the pod is refused instead of silently running without the sidecar.
    let mut copied = app_pod("copied", "demo", &[]);
    copied.metadata.annotations = web.metadata.annotations.clone();
    let r = fx.create_pod_raw(&ns, &copied).await?;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(status_message(&r.body).contains("without a complete authrealm sidecar"), "{}", r.body);
    assert!(pods.get_opt("copied").await?.is_none());

    // A realm that does not exist: refused, with a message naming it (default policy deny).
    let r = fx.create_pod_raw(&ns, &app_pod("lost", "nope", &[])).await?;
    assert_eq!(r.status, 403, "{}", r.body);
    let msg = status_message(&r.body);
    assert!(msg.contains(&format!("AuthRealm {ns}/nope does not exist")), "{msg}");
    assert!(pods.get_opt("lost").await?.is_none());

    // A realm without usable keys: refused, with the reason.
    fx.create_realm(&ns, "down", None, false).await?;
    let r = fx.create_pod_raw(&ns, &app_pod("down", "down", &[])).await?;
    assert_eq!(r.status, 403, "{}", r.body);
    let msg = status_message(&r.body);
    assert!(msg.contains("is not ready for pods") && msg.contains("KeysReady=False: NoSigningKey"), "{msg}");

    // The operator's Redis check failed (Ready=False) but keys and config are in place: a Redis
    // failover overlapping one check, or a network path only the pods have, refuses no pod.
    fx.create_realm(&ns, "flaky", None, true).await?;
    let realms: Api<authrealm_operator::crd::AuthRealm> = Api::namespaced(fx.client.clone(), &ns);
    let flaky = realms.get_status("flaky").await?;
    let mut conditions = flaky.status.unwrap().conditions;
    for c in conditions.iter_mut() {
        if c.type_ == "Ready" || c.type_ == "RedisReachable" {
            c.status = "False".into();
            c.reason = "Unreachable".into();
            c.message = "redis-0.redis:6379: connection refused".into();
        }
    }
    realms
        .patch_status(
            "flaky",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"status": {"conditions": conditions}})),
        )
        .await?;
    let during_failover = pods.create(&pp, &app_pod("during-failover", "flaky", &[])).await?;
    assert_eq!(sidecar_count(&during_failover), 1, "injected although the operator's Redis check failed");

    // A mistyped role: refused rather than silently verify-only.
    let r = fx.create_pod_raw(&ns, &app_pod("typo", "demo", &[("authrealm.dev/role", "Issuer")])).await?;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(status_message(&r.body).contains("authrealm.dev/role"), "{}", r.body);

    // hostNetwork: left alone, with a warning to the client.
    let mut host = app_pod("host", "demo", &[]);
    host.spec.as_mut().unwrap().host_network = Some(true);
    let r = fx.create_pod_raw(&ns, &host).await?;
    assert_eq!(r.status, 201, "{}", r.body);
    let created: Pod = serde_json::from_value(r.body)?;
    assert_eq!(sidecar_count(&created), 0);
    assert!(r.warnings.iter().any(|w| w.contains("hostNetwork") && w.contains("NOT protected")), "{:?}", r.warnings);

    // Metrics by outcome.
    assert!(fx.metrics.admission(Outcome::Injected, "verifier") >= 1);
    assert_eq!(fx.metrics.admission(Outcome::Injected, "issuer"), 2);
    assert_eq!(fx.metrics.admission(Outcome::Denied, "RealmNotFound"), 1);
    assert_eq!(fx.metrics.admission(Outcome::Denied, "RealmNotReady"), 1);
    let text = fx.metrics.encode();
    assert!(text.contains("authrealm_operator_webhook_admission_duration_seconds_count"), "{text}");

    // Events on the realm: Injected, and the denial.
    let events: Api<Event> = Api::namespaced(fx.client.clone(), &ns);
    let found = eventually("Injected and InjectionDenied events", Duration::from_secs(10), || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await?;
            let reasons: Vec<(String, String, String)> = list
                .items
                .iter()
                .map(|e| {
                    (
                        e.reason.clone().unwrap_or_default(),
                        e.regarding.as_ref().and_then(|r| r.kind.clone()).unwrap_or_default(),
                        e.note.clone().unwrap_or_default(),
                    )
                })
                .collect();
            let injected =
                reasons.iter().any(|(r, kind, note)| r == "Injected" && kind == "AuthRealm" && note.contains("/web"));
            let denied = reasons.iter().any(|(r, _, note)| r == "InjectionDenied" && note.contains("nope"));
            Ok((injected && denied).then_some(reasons))
        }
    })
    .await?;
    eprintln!("events: {found:?}");
    // One Event per realm and reason, its series counting the admissions — not one per pod:
    // three more pods of realm demo (after "web") add to the one Injected event about demo.
    for i in 1..=3 {
        let p = pods.create(&pp, &app_pod(&format!("series-{i}"), "demo", &[])).await?;
        assert_eq!(sidecar_count(&p), 1);
    }
    let series = eventually("one Injected event about realm demo counting 4 pods", Duration::from_secs(10), || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await?;
            let about_demo: Vec<i32> = list
                .items
                .iter()
                .filter(|e| e.reason.as_deref() == Some("Injected"))
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("demo"))
                .map(|e| e.series.as_ref().map_or(1, |s| s.count))
                .collect();
            Ok((about_demo.len() == 1 && about_demo[0] >= 4).then_some(about_demo))
        }
    })
    .await?;
    eprintln!("Injected events about demo (series counts): {series:?}");
    eprintln!("test took {:.1?}", started.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warn_policy_admits_a_pod_of_an_unknown_realm_unprotected_with_a_warning() -> anyhow::Result<()> {
    let fx = Fixture::start(|c| c.unready_realm_policy = UnreadyRealmPolicy::Warn).await?;
    let ns = fx.namespace("warn").await?;
    // A dry run gets the same answer and warning, but records no event (sideEffects: NoneOnDryRun).
    let dry = fx.create_pod_dry_run(&ns, &app_pod("ghost", "nope", &[])).await?;
    assert_eq!(dry.status, 201, "{}", dry.body);
    assert!(dry.warnings.iter().any(|w| w.contains("admitted WITHOUT the sidecar")), "{:?}", dry.warnings);
    let r = fx.create_pod_raw(&ns, &app_pod("lost", "nope", &[])).await?;
    assert_eq!(r.status, 201, "{}", r.body);
    let created: Pod = serde_json::from_value(r.body)?;
    assert_eq!(sidecar_count(&created), 0);
    assert!(
        r.warnings.iter().any(|w| w.contains("does not exist") && w.contains("admitted WITHOUT the sidecar")),
        "never silently unprotected: {:?}",
        r.warnings
    );
    assert_eq!(fx.metrics.admission(Outcome::Skipped, "RealmNotFound"), 2, "the dry run and the real create");
    let events: Api<Event> = Api::namespaced(fx.client.clone(), &ns);
    eventually("an InjectionSkipped warning event", Duration::from_secs(10), || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await?;
            Ok(list
                .items
                .iter()
                .any(|e| e.reason.as_deref() == Some("InjectionSkipped") && e.type_.as_deref() == Some("Warning"))
                .then_some(()))
        }
    })
    .await?;
    // The dry run's event would have been sent first; give a straggler time anyway.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let about: Vec<String> = events
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter_map(|e| e.regarding.as_ref()?.name.clone())
        .collect();
    assert_eq!(about, ["lost"], "events recorded only for the stored pod");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_pod_is_admitted_where_the_restricted_pod_security_standard_is_enforced() -> anyhow::Result<()> {
    let fx = Fixture::start(|_| {}).await?;
    let ns = fx
        .namespace_with(
            "restricted",
            &[
                ("pod-security.kubernetes.io/enforce", "restricted"),
                ("pod-security.kubernetes.io/enforce-version", "latest"),
            ],
        )
        .await?;
    fx.create_realm(&ns, "demo", None, true).await?;

    // Control: the namespace really enforces `restricted` (a pod without a securityContext is
    // refused).
    let mut loose = app_pod("loose", "", &[]);
    let spec = loose.spec.as_mut().unwrap();
    spec.security_context = None;
    spec.containers[0].security_context = None;
    let r = fx.create_pod_raw(&ns, &loose).await?;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(status_message(&r.body).contains("violates PodSecurity"), "{}", r.body);

    // The injected sidecar passes PodSecurity (which runs after the mutating webhooks), both as
    // verifier and as issuer.
    for (name, annotations) in [("web", vec![]), ("login", vec![("authrealm.dev/role", "issuer")])] {
        let r = fx.create_pod_raw(&ns, &app_pod(name, "demo", &annotations)).await?;
        assert_eq!(r.status, 201, "{name}: {}", r.body);
        assert!(r.warnings.is_empty(), "{name}: {:?}", r.warnings);
        let pod: Pod = serde_json::from_value(r.body)?;
        assert_eq!(sidecar_count(&pod), 1, "{name}");
    }
    Ok(())
}

/// What a user does: create a realm and, as soon as the operator reports its keys ready, create
/// pods. The webhook answers from its watch caches, which may not have seen the realm (or its
/// new status) yet; such a pod is still injected at once, never refused. A deleted realm's pods
/// are refused once the webhook's watch has seen the deletion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_created_right_after_their_realm_turns_ready_are_injected() -> anyhow::Result<()> {
    let fx = Fixture::start(|_| {}).await?;
    let ns = fx.namespace("fresh").await?;
    let pods = fx.pods(&ns);
    let dry = PostParams { dry_run: true, field_manager: None };
    // Created (with its status) a moment before the pod.
    for i in 0..10 {
        fx.create_realm(&ns, &format!("r{i}"), None, true).await?;
        let p = pods.create(&dry, &app_pod(&format!("p{i}"), &format!("r{i}"), &[])).await?;
        assert_eq!(sidecar_count(&p), 1, "pod of realm r{i}, created right after it");
    }
    // Not ready, then ready: the webhook's copy of the realm is the not-ready one (given time to
    // arrive) when the next pod comes.
    fx.create_realm(&ns, "late", None, false).await?;
    let r = fx.create_pod_dry_run(&ns, &app_pod("early", "late", &[])).await?;
    assert_eq!(r.status, 403, "{}", r.body);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let realms: Api<authrealm_operator::crd::AuthRealm> = Api::namespaced(fx.client.clone(), &ns);
    let ready = serde_json::json!({"status": {"conditions": [
        {"type": "KeysReady", "status": "True", "reason": "KeysCurrent", "message": "key k1 signs",
         "lastTransitionTime": "2026-01-01T00:00:01Z"},
    ]}});
    realms.patch_status("late", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(ready)).await?;
    let p = pods.create(&dry, &app_pod("on-time", "late", &[])).await?;
    assert_eq!(sidecar_count(&p), 1, "injected right after KeysReady turned True");

    // Deleted: refused once the webhook's watch has delivered the deletion.
    realms.delete("r0", &Default::default()).await?;
    eventually("a pod of the deleted realm to be refused", Duration::from_secs(10), || {
        let fx = &fx;
        let ns = ns.clone();
        async move {
            let r = fx.create_pod_dry_run(&ns, &app_pod("after-delete", "r0", &[])).await?;
            Ok((r.status == 403 && status_message(&r.body).contains("does not exist")).then_some(()))
        }
    })
    .await?;
    assert!(fx.metrics.lookups(Source::Cache) >= 1, "admissions are answered from the watch caches");
    Ok(())
}

/// The rule that makes the caches safe, made deterministic: a webhook whose caches have listed
/// but lag behind the API server (fed by hand here) injects every pod the API server's state says
/// to inject — a realm it has not seen, a realm it still has without usable keys, a namespace
/// whose opt-out label it still has — reading the API server only for those answers; an injection
/// from an up-to-date cache reads nothing; a refusal is confirmed on the API server first; and
/// before the caches have listed, the API server is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_behind_the_api_server_never_refuses_or_skips_a_pod_it_should_inject() -> anyhow::Result<()> {
    use authrealm_operator::crd::AuthRealm;
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::PartialObjectMeta;
    use kube::runtime::{reflector, watcher};

    let fx = Fixture::start(|_| {}).await?;
    let ns = fx.namespace("lag").await?;
    let opted_in_again = fx.namespace("lag-ns").await?;
    // The API server: every realm below ready, neither namespace opted out.
    let mut live = std::collections::BTreeMap::new();
    for (namespace, name) in [(&ns, "fresh"), (&ns, "turned-ready"), (&ns, "cached"), (&opted_in_again, "demo")] {
        live.insert((namespace.clone(), name), fx.create_realm(namespace, name, None, true).await?);
    }
    // The cache: listed; has not seen "fresh"; has "turned-ready" from before its keys were
    // ready; has "cached" and "demo" as they are; still sees `opted_in_again` labelled
    // authrealm.dev/injection=disabled.
    let (realms, mut realm_writer) = reflector::store::<AuthRealm>();
    let (namespaces, mut ns_writer) = reflector::store::<PartialObjectMeta<Namespace>>();
    let mut not_ready = live[&(ns.clone(), "turned-ready")].clone();
    not_ready.status.as_mut().unwrap().conditions.retain(|c| c.type_ != "KeysReady");
    realm_writer.apply_watcher_event(&watcher::Event::Init);
    for r in [not_ready, live[&(ns.clone(), "cached")].clone(), live[&(opted_in_again.clone(), "demo")].clone()] {
        realm_writer.apply_watcher_event(&watcher::Event::InitApply(r));
    }
    realm_writer.apply_watcher_event(&watcher::Event::InitDone);
    let ns_meta = |name: &str, labels: &[(&str, &str)]| -> PartialObjectMeta<Namespace> {
        let mut m = PartialObjectMeta::<Namespace>::default();
        m.metadata.name = Some(name.to_owned());
        m.metadata.labels = Some(labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect());
        m
    };
    ns_writer.apply_watcher_event(&watcher::Event::Init);
    ns_writer.apply_watcher_event(&watcher::Event::InitApply(ns_meta(&ns, &[])));
    ns_writer.apply_watcher_event(&watcher::Event::InitApply(ns_meta(
        &opted_in_again,
        &[("authrealm.dev/injection", "disabled")],
    )));
    ns_writer.apply_watcher_event(&watcher::Event::InitDone);

    let metrics = WebhookMetrics::new();
    let reviewer = |lookups: Lookups| {
        Reviewer::new(
            fx.client.clone(),
            lookups,
            SidecarDefaults {
                image: "authrealm-sidecar:test".into(),
                image_pull_policy: None,
                resources: default_resources(),
            },
            UnreadyRealmPolicy::Deny,
            metrics.clone(),
            "test".into(),
        )
    };
    let lagging = reviewer(Lookups::with_stores(fx.client.clone(), realms, namespaces));
    let counts = || [Source::Cache, Source::Confirm, Source::Unsynced].map(|s| metrics.lookups(s));

    for (namespace, realm) in [(&ns, "fresh"), (&ns, "turned-ready"), (&opted_in_again, "demo")] {
        let before = counts();
        let answer = admit(&lagging, namespace, realm).await?;
        assert!(injected(&answer), "{namespace}/{realm}: {}", answer["response"]["status"]);
        assert_eq!(counts(), [before[0], before[1] + 1, before[2]], "{namespace}/{realm}: confirmed on the API server");
    }
    // Up to date: from the cache alone.
    let before = counts();
    let answer = admit(&lagging, &ns, "cached").await?;
    assert!(injected(&answer), "{}", answer["response"]["status"]);
    assert_eq!(counts(), [before[0] + 1, before[1], before[2]]);
    // A realm that exists nowhere: refused, after the API server confirmed it.
    let answer = admit(&lagging, &ns, "nowhere").await?;
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    assert!(answer["response"]["status"]["message"].as_str().unwrap_or_default().contains("does not exist"));
    assert_eq!(counts(), [before[0] + 1, before[1] + 1, before[2]]);

    // Caches that have not listed yet: the API server answers.
    let (realms, _realm_writer) = reflector::store::<AuthRealm>();
    let (namespaces, _ns_writer) = reflector::store::<PartialObjectMeta<Namespace>>();
    let unsynced = reviewer(Lookups::with_stores(fx.client.clone(), realms, namespaces));
    let before = counts();
    let answer = admit(&unsynced, &ns, "fresh").await?;
    assert!(injected(&answer), "{}", answer["response"]["status"]);
    assert_eq!(counts(), [before[0], before[1], before[2] + 1]);
    Ok(())
}

/// One AdmissionReview (a dry-run CREATE of a pod labelled into `realm`) answered by `reviewer`.
async fn admit(reviewer: &Reviewer, ns: &str, realm: &str) -> anyhow::Result<serde_json::Value> {
    let review = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": format!("{ns}-{realm}"),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": ns, "name": "web", "operation": "CREATE", "userInfo": {"username": "test"},
            "object": app_pod("web", realm, &[]), "dryRun": true,
        },
    });
    Ok(serde_json::from_slice(&reviewer.review_json(&serde_json::to_vec(&review)?).await)?)
}

fn injected(answer: &serde_json::Value) -> bool {
    answer["response"]["allowed"] == true && !answer["response"]["patch"].is_null()
}
