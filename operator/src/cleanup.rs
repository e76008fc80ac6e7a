//! A realm's deletion: the finalizer (only on realms that ask for their sessions to be purged),
//! the purge itself, and letting the realm go. Owned objects are removed by the garbage collector
//! through their owner references.

use std::time::Duration;

use kube::ResourceExt as _;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use serde_json::json;

use crate::controller::{Context, Error, now_millis};
use crate::crd::AuthRealm;
use crate::events::{self, Severity};
use crate::redis_check;
use crate::render;

/// Finalizer present only on realms that ask for their sessions to be purged on deletion.
pub const FINALIZER: &str = "authrealm.dev/purge-sessions";

/// Adds or removes [`FINALIZER`] (conditionally on the realm's resourceVersion).
pub async fn set_finalizer(api: &Api<AuthRealm>, realm: &AuthRealm, want: bool) -> Result<(), Error> {
    let has = realm.finalizers().iter().any(|f| f == FINALIZER);
    if has == want {
        return Ok(());
    }
    let mut finalizers: Vec<String> = realm.finalizers().iter().filter(|f| *f != FINALIZER).cloned().collect();
    if want {
        finalizers.push(FINALIZER.to_owned());
    }
    let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": realm.resource_version()}});
    api.patch(&realm.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await.map_err(|source| {
        Error::Finalizer { namespace: realm.namespace().unwrap_or_default(), name: realm.name_any(), source }
    })?;
    Ok(())
}

/// Deletion: purge the realm's session records if asked (retried until `purge_timeout` after
/// the deletion, then given up with a Warning event), then remove the finalizer.
pub async fn cleanup(realm: &AuthRealm, api: &Api<AuthRealm>, ctx: &Context) -> Result<Action, Error> {
    ctx.forget_keys(realm, "being deleted");
    if !realm.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let name = realm.name_any();
    let ns = realm.namespace().unwrap_or_default();
    let target = render::resolve(&name, &ns, &realm.spec).ok().and_then(|r| r.redis).filter(|r| r.purge_on_delete);
    if let Some(target) = target {
        ctx.term.check()?;
        let result = async {
            let c = ctx.redis.connect_params(&target, &ns).await?;
            redis_check::purge_realm(&c, &target.key_prefix, &name).await
        }
        .await;
        match result {
            Ok(n) => {
                ctx.events
                    .publish(
                        realm,
                        Severity::Normal,
                        events::reason::SESSIONS_PURGED,
                        "PurgeSessions",
                        format!("deleted {n} Redis key(s) of the realm"),
                    )
                    .await;
            }
            Err(e) => {
                let deleting_since = realm.metadata.deletion_timestamp.as_ref().map(|t| t.0.as_second()).unwrap_or(0);
                let waited = Duration::from_secs((now_millis() / 1000 - deleting_since).max(0) as u64);
                if waited < ctx.settings.purge_timeout {
                    return Err(Error::Purge { namespace: ns, name, source: e });
                }
                ctx.events
                    .publish(
                        realm,
                        Severity::Warning,
                        events::reason::PURGE_FAILED,
                        "PurgeSessions",
                        format!("gave up purging the realm's sessions after {waited:?}: {e}"),
                    )
                    .await;
            }
        }
    }
    set_finalizer(api, realm, false).await?;
    Ok(Action::await_change())
}
