//! Which objects the operator may write for a realm: never one that merely has the name of one
//! of the realm's objects (taking it over would, through the owner reference, later let the
//! garbage collector delete it), and an owned object is rewritten when our labels, annotations
//! or owner reference are missing from it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt as _;

use crate::controller::{Context, Error};
use crate::crd::AuthRealm;
use crate::owned::controlled_by;
use crate::render;

/// True when `have` carries every label, annotation and owner reference of `want`.
pub fn metadata_matches(have: &ObjectMeta, want: &ObjectMeta) -> bool {
    let subset = |h: &Option<std::collections::BTreeMap<String, String>>,
                  w: &Option<std::collections::BTreeMap<String, String>>| {
        w.iter().flatten().all(|(k, v)| h.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    let owners_ok = want
        .owner_references
        .iter()
        .flatten()
        .all(|w| have.owner_references.iter().flatten().any(|h| h.uid == w.uid && h.controller == w.controller));
    subset(&have.labels, &want.labels) && subset(&have.annotations, &want.annotations) && owners_ok
}

/// The realm's object names (`Secret ns/name`, …) taken by objects the realm does not control.
pub async fn foreign_objects(realm: &AuthRealm, ctx: &Context) -> Result<Vec<String>, Error> {
    let name = realm.name_any();
    let ns = realm.namespace().unwrap_or_default();
    let uid = realm.uid().unwrap_or_default();
    let read_err = |kind: &'static str, n: &str| {
        let (ns, n) = (ns.clone(), n.to_owned());
        move |source| Error::Read { kind, namespace: ns, name: n, source }
    };
    let mut foreign = Vec::new();
    let secret_name = render::signing_keys_name(&name);
    if let Some(meta) = ctx.owned.secret_metadata(&ns, &secret_name).await.map_err(read_err("Secret", &secret_name))?
        && !controlled_by(&meta, &uid)
    {
        foreign.push(format!("Secret {ns}/{secret_name}"));
    }
    for cm_name in [render::jwks_name(&name), render::sidecar_config_name(&name)] {
        if let Some(meta) =
            ctx.owned.config_map_metadata(&ns, &cm_name).await.map_err(read_err("ConfigMap", &cm_name))?
            && !controlled_by(&meta, &uid)
        {
            foreign.push(format!("ConfigMap {ns}/{cm_name}"));
        }
    }
    Ok(foreign)
}

/// What the realm's status and event say about `foreign` objects.
pub fn conflict_message(realm: &AuthRealm, foreign: &[String]) -> String {
    format!(
        "{} already exist(s) and {} not controlled by this AuthRealm (uid {}); the operator does not write \
         any of the realm's objects until they are deleted or renamed (or carry a controller ownerReference to \
         this AuthRealm)",
        foreign.join(", "),
        if foreign.len() == 1 { "is" } else { "are" },
        realm.uid().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use std::collections::BTreeMap;

    #[test]
    fn metadata_matches_when_ours_is_a_subset_of_theirs() {
        let owner = |uid: &str| OwnerReference { uid: uid.into(), controller: Some(true), ..OwnerReference::default() };
        let want = ObjectMeta {
            labels: Some(BTreeMap::from([("a".into(), "1".into())])),
            owner_references: Some(vec![owner("u")]),
            ..ObjectMeta::default()
        };
        let mut have = want.clone();
        have.labels.as_mut().unwrap().insert("extra".into(), "x".into());
        assert!(metadata_matches(&have, &want));
        have.labels.as_mut().unwrap().insert("a".into(), "2".into());
        assert!(!metadata_matches(&have, &want), "a changed label");
        let mut have = want.clone();
        have.owner_references = Some(vec![owner("other")]);
        assert!(!metadata_matches(&have, &want), "another owner");
        assert!(!metadata_matches(&ObjectMeta::default(), &want));
    }
}
