//! Leader election with a `coordination.k8s.io/v1` Lease, so that of several replicas only one
//! runs the controller (and so only one ever rotates keys).
//!
//! The algorithm is client-go's: the holder renews `renewTime` every retry period; another
//! replica takes the lease over only after it has seen the same lease record, unchanged, for a
//! full lease duration on its own clock (so clock skew between replicas does not matter). Every
//! write is a replace conditional on the resourceVersion read, so two candidates can never both
//! succeed. A leader that cannot renew for `renew_deadline` (shorter than the lease duration)
//! stops its controller before anyone else may take over, and the process exits so that it
//! restarts as a follower. On graceful shutdown the lease is released at once.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::oneshot;

use crate::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// Unique per replica (the pod name); a restarted process with the same identity resumes
    /// its own lease at once.
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lost the leader lease {namespace}/{name}")]
    Lost { namespace: String, name: String },
    #[error(transparent)]
    Controller(#[from] crate::controller::Error),
    #[error("the controller task failed: {0}")]
    Task(String),
}

struct Observed {
    record: (Option<String>, Option<MicroTime>),
    at: Instant,
}

/// One candidate.
pub struct Elector {
    api: Api<Lease>,
    s: LeaseSettings,
    observed: Option<Observed>,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Elector {
    pub fn new(client: Client, s: LeaseSettings) -> Self {
        Elector { api: Api::namespaced(client, &s.namespace), s, observed: None }
    }

    /// One attempt to take or renew the lease; `Ok(true)` when this replica holds it now.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let duration_secs = self.s.lease_duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.api.get_opt(&self.s.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.s.name.clone()), ..ObjectMeta::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.s.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let record = (holder.clone(), spec.renew_time.clone());
        if self.observed.as_ref().is_none_or(|o| o.record != record) {
            self.observed = Some(Observed { record, at: Instant::now() });
        }
        let held_for = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(duration_secs).max(1) as u64);
        let mine = holder.as_deref() == Some(self.s.identity.as_str());
        let expired = holder.is_none() || self.observed.as_ref().is_some_and(|o| o.at.elapsed() >= held_for);
        if !mine && !expired {
            return Ok(false);
        }
        if !mine {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            tracing::info!(lease = %self.s.name, previous = ?holder, "taking over the leader lease");
        }
        spec.holder_identity = Some(self.s.identity.clone());
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(duration_secs);
        lease.spec = Some(spec);
        match self.api.replace(&self.s.name, &PostParams::default(), &lease).await {
            Ok(l) => {
                let spec = l.spec.unwrap_or_default();
                self.observed = Some(Observed { record: (spec.holder_identity, spec.renew_time), at: Instant::now() });
                Ok(true)
            }
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up (if held) so another replica can take over without waiting.
    pub async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.s.name).await else { return };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.s.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.spec = Some(spec);
        match self.api.replace(&self.s.name, &PostParams::default(), &lease).await {
            Ok(_) => tracing::info!(lease = %self.s.name, "released the leader lease"),
            Err(e) => tracing::warn!(lease = %self.s.name, error = %e, "failed to release the leader lease"),
        }
    }
}

enum Ending {
    Shutdown,
    Lost,
    Ended(Result<Result<(), crate::controller::Error>, tokio::task::JoinError>),
}

/// Waits for leadership, then runs `work` until shutdown (releasing the lease) or until the
/// lease is lost (returning [`LeaderError::Lost`]; the caller should exit). `work` receives a
/// receiver that fires when it must stop.
pub async fn run_elected<F, Fut>(
    client: Client,
    s: LeaseSettings,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()>,
    work: F,
) -> Result<(), LeaderError>
where
    F: FnOnce(oneshot::Receiver<()>) -> Fut,
    Fut: std::future::Future<Output = Result<(), crate::controller::Error>> + Send + 'static,
{
    let mut elector = Elector::new(client, s.clone());
    tokio::pin!(shutdown);
    tracing::info!(lease = %format!("{}/{}", s.namespace, s.name), identity = %s.identity, "waiting for leadership");
    loop {
        match elector.try_acquire_or_renew().await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
        }
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(s.retry_period) => {}
        }
    }
    tracing::info!(identity = %s.identity, "became the leader");
    metrics.leader.set(1);
    let (stop_tx, stop_rx) = oneshot::channel();
    let mut task = tokio::spawn(work(stop_rx));
    let mut last_renew = Instant::now();
    let ending = loop {
        tokio::select! {
            _ = &mut shutdown => break Ending::Shutdown,
            r = &mut task => break Ending::Ended(r),
            _ = tokio::time::sleep(s.retry_period) => {}
        }
        match tokio::time::timeout(s.retry_period.max(Duration::from_secs(1)), elector.try_acquire_or_renew()).await {
            Ok(Ok(true)) => last_renew = Instant::now(),
            Ok(Ok(false)) => break Ending::Lost,
            Ok(Err(e)) => tracing::warn!(error = %e, "failed to renew the leader lease"),
            Err(_) => tracing::warn!("renewing the leader lease timed out"),
        }
        if last_renew.elapsed() >= s.renew_deadline {
            break Ending::Lost;
        }
    };
    let result = match ending {
        Ending::Shutdown => {
            let _ = stop_tx.send(());
            // In-flight reconciles finish (bounded), then the lease is handed over.
            if tokio::time::timeout(s.renew_deadline, &mut task).await.is_err() {
                task.abort();
            }
            elector.release().await;
            Ok(())
        }
        Ending::Lost => {
            tracing::error!("lost the leader lease; stopping the controller");
            let _ = stop_tx.send(());
            if tokio::time::timeout(Duration::from_secs(1), &mut task).await.is_err() {
                task.abort();
            }
            Err(LeaderError::Lost { namespace: s.namespace.clone(), name: s.name.clone() })
        }
        Ending::Ended(r) => {
            elector.release().await;
            match r {
                Ok(r) => r.map_err(LeaderError::from),
                Err(e) => Err(LeaderError::Task(e.to_string())),
            }
        }
    };
    metrics.leader.set(0);
    result
}
