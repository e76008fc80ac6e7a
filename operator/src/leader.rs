//! Leader election with a `coordination.k8s.io/v1` Lease, so that of several replicas only one
//! runs the controller (and so only one ever rotates keys), and a fence so that a deposed leader
//! cannot write after another replica may have taken over.
//!
//! # Election
//!
//! The algorithm is client-go's: the holder renews `renewTime` every retry period; another
//! replica takes the lease over only after it has seen the same lease record, unchanged, for a
//! full lease duration on its own clock (so clock skew between replicas does not matter). Every
//! write is a replace conditional on the resourceVersion read, so two candidates can never both
//! succeed. On graceful shutdown the lease is released at once.
//!
//! # Terms and the write fence
//!
//! Election alone does not stop a leader that is slow to notice it was deposed: a process paused
//! (SIGSTOP, a stalled node, a debugger) past the lease duration wakes up with reconciles
//! in flight and timers due, and used to write before its renew loop found out. So each
//! leadership period is a [`Term`] with a deadline on this process's monotonic clock:
//!
//! * **The rule.** A term is valid until `t_send + renew_deadline`, where `t_send` is when the
//!   last *successful* create/renew request of the Lease was sent (taken before sending, so the
//!   server's `renewTime` of that record is later still). A follower can take over only after it
//!   observed that record unchanged for `leaseDurationSeconds` (≥ `--lease-duration`, rounded up
//!   to whole seconds) on its own clock, i.e. not before `t_send + lease_duration`. The
//!   difference `lease_duration − renew_deadline` (5 s with the defaults) is the safety margin
//!   for clock-rate differences and for requests already on the wire.
//! * **Checked before every write that matters.** The controller's Kubernetes client carries a
//!   [`FenceLayer`]: every mutating request (POST, PUT, PATCH, DELETE — keys Secret, JWKS and
//!   sidecar ConfigMaps, status, finalizers, events) is refused with [`TermError`] unless the
//!   term is valid *when the request is dispatched*: checked when the client's dispatch worker
//!   hands the request to the HTTP stack, and again when that stack first runs, right before
//!   the request goes out (so no call site can forget it, and a reconcile that was in flight
//!   when the process was paused is stopped at its next write). The controller also checks
//!   before its Redis session purge, and before each write of a keys Secret it re-reads the
//!   Lease and requires that it still names this replica with the `leaseTransitions` of this
//!   term ([`Term::verify_lease`]) — a check that does not depend on clocks at all (it also
//!   catches a deleted and re-created Lease, and a suspended machine whose monotonic clock stood
//!   still). The client used by the controller does not retry failed writes by itself (a retry
//!   would bypass the check); the reconcile is retried instead.
//! * **Expiry is final.** Once the deadline has passed, the term is over for good, even if a
//!   later renewal would still succeed: the renew loop stops the controller and the process
//!   exits, to be restarted as a follower with an empty key cache. A process resumed after a
//!   pause that outlasted its term therefore finds its monotonic clock past the deadline before
//!   it sends any write.
//!
//! What remains: a process paused between the last check and the moment the request bytes are
//! written to the socket (a few instructions, or a connection set-up) sends that one request
//! late. No client-side rule can close that gap (only the API server could, and Kubernetes has
//! no fencing tokens for arbitrary objects); keys Secret updates are in addition conditional on
//! the resourceVersion read, so such a late write fails if the new leader has written the
//! Secret since. Also, Rust's monotonic clock (`CLOCK_MONOTONIC`) does not advance while the
//! whole machine is suspended; the Lease re-read covers key writes in that case, other writes
//! rely on the renew loop, which finds the Lease taken on waking and stops. The Redis session
//! purge of a deleted realm is checked once before it starts (it is idempotent).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
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

impl LeaseSettings {
    /// `leaseDurationSeconds` as written: the lease duration rounded *up* to whole seconds, so
    /// that followers never wait less than configured.
    pub fn lease_seconds(&self) -> i32 {
        let d = self.lease_duration;
        let secs = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0)).max(1);
        i32::try_from(secs).unwrap_or(i32::MAX)
    }
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

/// Why a write was refused: this replica's leadership term is over (or cannot be confirmed).
#[derive(Debug, Clone, thiserror::Error)]
pub enum TermError {
    #[error("not the leader: the leadership term expired (no successful lease renewal for the renew deadline)")]
    Expired,
    #[error("not the leader: the leadership term has ended")]
    Ended,
    #[error("not the leader: the Lease {lease} is held by {holder:?} (transitions {transitions:?}), not by this term")]
    LeaseChanged { lease: String, holder: Option<String>, transitions: Option<i32> },
    #[error("cannot confirm leadership: reading the Lease {lease} failed: {message}")]
    LeaseUnreadable { lease: String, message: String },
}

/// The Lease record that identifies one term: holder and `leaseTransitions`.
#[derive(Clone, Debug)]
struct LeaseFence {
    namespace: String,
    name: String,
    identity: String,
    transitions: i32,
}

#[derive(Debug)]
struct TermState {
    /// `None`: no deadline (no leader election; the term lasts until ended).
    until: Mutex<Option<Instant>>,
    ended: AtomicBool,
    fence: Option<LeaseFence>,
}

/// One leadership period of this replica (see the module docs). Cheap to clone; every clone
/// sees the same state.
#[derive(Clone, Debug)]
pub struct Term(Arc<TermState>);

impl Term {
    /// A term without leader election: valid until [`Term::end`] is called.
    pub fn unbounded() -> Term {
        Term(Arc::new(TermState { until: Mutex::new(None), ended: AtomicBool::new(false), fence: None }))
    }

    fn elected(s: &LeaseSettings, transitions: i32, until: Instant) -> Term {
        Term(Arc::new(TermState {
            until: Mutex::new(Some(until)),
            ended: AtomicBool::new(false),
            fence: Some(LeaseFence {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                identity: s.identity.clone(),
                transitions,
            }),
        }))
    }

    fn until(&self) -> Option<Instant> {
        *self.0.until.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Ok` while this replica may write; once it fails it fails for good.
    pub fn check(&self) -> Result<(), TermError> {
        if self.0.ended.load(Ordering::SeqCst) {
            return Err(TermError::Ended);
        }
        match self.until() {
            Some(until) if Instant::now() >= until => {
                self.0.ended.store(true, Ordering::SeqCst);
                Err(TermError::Expired)
            }
            _ => Ok(()),
        }
    }

    pub fn is_current(&self) -> bool {
        self.check().is_ok()
    }

    /// Ends the term: every later check fails.
    pub fn end(&self) {
        self.0.ended.store(true, Ordering::SeqCst);
    }

    /// Moves the deadline to `until` after a successful renewal (never backwards, never after
    /// the term has ended or expired).
    fn extend(&self, until: Instant) {
        if self.check().is_err() {
            return;
        }
        let mut u = self.0.until.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = *u
            && until > old
        {
            *u = Some(until);
        }
    }

    /// The deadline, if any.
    pub fn deadline(&self) -> Option<Instant> {
        self.until()
    }

    /// Re-reads the Lease and fails unless it still names this replica with this term's
    /// `leaseTransitions`, and the term is still valid by the clock. Used right before writes of
    /// key material. Always `Ok` (apart from [`Term::check`]) without leader election.
    pub async fn verify_lease(&self, client: &Client) -> Result<(), TermError> {
        self.check()?;
        let Some(f) = &self.0.fence else { return Ok(()) };
        let lease = format!("{}/{}", f.namespace, f.name);
        let api: Api<Lease> = Api::namespaced(client.clone(), &f.namespace);
        let got = api
            .get_opt(&f.name)
            .await
            .map_err(|e| TermError::LeaseUnreadable { lease: lease.clone(), message: e.to_string() })?;
        let spec = got.and_then(|l| l.spec).unwrap_or_default();
        let holder = spec.holder_identity.filter(|h| !h.is_empty());
        let transitions = spec.lease_transitions;
        if holder.as_deref() != Some(f.identity.as_str()) || transitions.unwrap_or(0) != f.transitions {
            self.end();
            return Err(TermError::LeaseChanged { lease, holder, transitions });
        }
        self.check()
    }
}

/// A tower layer for the controller's Kubernetes client: mutating requests (anything but GET,
/// HEAD and OPTIONS) fail with [`TermError`] unless the [`Term`] is valid when the request is
/// dispatched. Reads and watches pass.
#[derive(Clone, Debug)]
pub struct FenceLayer {
    term: Term,
}

impl FenceLayer {
    pub fn new(term: Term) -> Self {
        FenceLayer { term }
    }
}

impl<S> tower::Layer<S> for FenceLayer {
    type Service = Fenced<S>;
    fn layer(&self, inner: S) -> Fenced<S> {
        Fenced { inner, term: self.term.clone() }
    }
}

/// The service of [`FenceLayer`].
#[derive(Clone, Debug)]
pub struct Fenced<S> {
    inner: S,
    term: Term,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B> tower::Service<http::Request<B>> for Fenced<S>
where
    S: tower::Service<http::Request<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let guarded = !matches!(*req.method(), http::Method::GET | http::Method::HEAD | http::Method::OPTIONS);
        let term = self.term.clone();
        if guarded && let Err(e) = term.check() {
            tracing::warn!(method = %req.method(), path = %req.uri().path(), "write refused: {e}");
            return Box::pin(std::future::ready(Err(e.into())));
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            // Again at the first poll, which is when the request starts going out.
            if guarded {
                term.check()?;
            }
            fut.await.map_err(Into::into)
        })
    }
}

/// A client for the controller of one term: `config` with a [`FenceLayer`] for `term`, and
/// without the client's own retries of failed requests (a retry would not pass the fence).
pub fn fenced_client(mut config: kube::Config, term: &Term) -> Result<Client, kube::Error> {
    config.default_retry = false;
    Ok(kube::client::ClientBuilder::try_from(config)?.with_layer(&FenceLayer::new(term.clone())).build())
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
    /// The Lease as this replica last wrote it while holding it. A renewal replaces it directly
    /// (its resourceVersion makes the write conditional), so a leader at rest costs one API
    /// request per renewal instead of a GET and a PUT; a 409 falls back to reading the Lease.
    held: Option<Lease>,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Elector {
    pub fn new(client: Client, s: LeaseSettings) -> Self {
        Elector { api: Api::namespaced(client, &s.namespace), s, observed: None, held: None }
    }

    /// One attempt to take or renew the lease; `Ok(true)` when this replica holds it now.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        Ok(self.attempt(None).await?.is_some())
    }

    /// One attempt; `Some(leaseTransitions)` when this replica holds the lease now. With
    /// `renew_only = Some(t)`, only a lease this replica still holds with transitions `t` is
    /// renewed (never taken over).
    async fn attempt(&mut self, renew_only: Option<i32>) -> Result<Option<i32>, kube::Error> {
        if let Some(renewed) = self.renew_held(renew_only).await? {
            return Ok(Some(renewed));
        }
        let now = MicroTime(Timestamp::now());
        let duration_secs = self.s.lease_seconds();
        let Some(mut lease) = self.api.get_opt(&self.s.name).await? else {
            if renew_only.is_some() {
                return Ok(None);
            }
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
                Ok(l) => Ok(Some(self.wrote(l))),
                Err(e) if is_conflict(&e) => Ok(None),
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
        if let Some(t) = renew_only
            && (!mine || spec.lease_transitions.unwrap_or(0) != t)
        {
            return Ok(None);
        }
        let expired = holder.is_none() || self.observed.as_ref().is_some_and(|o| o.at.elapsed() >= held_for);
        if !mine && !expired {
            return Ok(None);
        }
        if !mine {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
            tracing::info!(lease = %self.s.name, previous = ?holder, "taking over the leader lease");
        }
        spec.holder_identity = Some(self.s.identity.clone());
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(duration_secs);
        lease.spec = Some(spec);
        match self.api.replace(&self.s.name, &PostParams::default(), &lease).await {
            Ok(l) => Ok(Some(self.wrote(l))),
            Err(e) if is_conflict(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Renews from the Lease this replica last wrote, without reading it first. `Ok(None)` when
    /// there is nothing to renew from or the Lease changed since (409): the caller then reads it.
    async fn renew_held(&mut self, renew_only: Option<i32>) -> Result<Option<i32>, kube::Error> {
        let Some(mut lease) = self.held.take() else { return Ok(None) };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if renew_only.is_some_and(|t| spec.lease_transitions.unwrap_or(0) != t)
            || spec.holder_identity.as_deref() != Some(self.s.identity.as_str())
        {
            return Ok(None);
        }
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        spec.lease_duration_seconds = Some(self.s.lease_seconds());
        lease.spec = Some(spec);
        match self.api.replace(&self.s.name, &PostParams::default(), &lease).await {
            Ok(l) => Ok(Some(self.wrote(l))),
            Err(e) if is_conflict(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Records a Lease this replica just wrote as holder; returns its transitions.
    fn wrote(&mut self, l: Lease) -> i32 {
        let spec = l.spec.clone().unwrap_or_default();
        self.observed = Some(Observed { record: (spec.holder_identity, spec.renew_time), at: Instant::now() });
        self.held = Some(l);
        spec.lease_transitions.unwrap_or(0)
    }

    /// Gives the lease up (if held) so another replica can take over without waiting.
    pub async fn release(&mut self) {
        self.held = None;
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
/// lease is lost or the term expires (returning [`LeaderError::Lost`]; the caller should exit).
/// `work` receives the [`Term`] (for the write fence) and a receiver that fires when it must
/// stop.
pub async fn run_elected<F, Fut>(
    client: Client,
    s: LeaseSettings,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()>,
    work: F,
) -> Result<(), LeaderError>
where
    F: FnOnce(Term, oneshot::Receiver<()>) -> Fut,
    Fut: std::future::Future<Output = Result<(), crate::controller::Error>> + Send + 'static,
{
    let mut elector = Elector::new(client, s.clone());
    tokio::pin!(shutdown);
    tracing::info!(lease = %format!("{}/{}", s.namespace, s.name), identity = %s.identity, "waiting for leadership");
    let term = loop {
        let sent = Instant::now();
        match elector.attempt(None).await {
            Ok(Some(transitions)) => break Term::elected(&s, transitions, sent + s.renew_deadline),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
        }
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(s.retry_period) => {}
        }
    };
    let transitions = term.0.fence.as_ref().map_or(0, |f| f.transitions);
    tracing::info!(identity = %s.identity, transitions, "became the leader");
    metrics.leader.set(1);
    let (stop_tx, stop_rx) = oneshot::channel();
    let mut task = tokio::spawn(work(term.clone(), stop_rx));
    let ending = loop {
        let deadline = term.deadline().unwrap_or_else(Instant::now);
        tokio::select! {
            _ = &mut shutdown => break Ending::Shutdown,
            r = &mut task => break Ending::Ended(r),
            _ = tokio::time::sleep(s.retry_period) => {}
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
        // First, before any request: a process that was paused finds its clock past the deadline.
        if let Err(e) = term.check() {
            tracing::error!("{e}; the process may have been paused");
            break Ending::Lost;
        }
        let sent = Instant::now();
        match tokio::time::timeout(s.retry_period.max(Duration::from_secs(1)), elector.attempt(Some(transitions))).await
        {
            Ok(Ok(Some(_))) => term.extend(sent + s.renew_deadline),
            Ok(Ok(None)) => break Ending::Lost,
            Ok(Err(e)) => tracing::warn!(error = %e, "failed to renew the leader lease"),
            Err(_) => tracing::warn!("renewing the leader lease timed out"),
        }
        if let Err(e) = term.check() {
            tracing::error!("{e}");
            break Ending::Lost;
        }
    };
    let result = match ending {
        Ending::Shutdown => {
            let _ = stop_tx.send(());
            // In-flight reconciles finish (bounded; their writes are still fenced by the term),
            // then the lease is handed over.
            if tokio::time::timeout(s.renew_deadline, &mut task).await.is_err() {
                task.abort();
            }
            term.end();
            elector.release().await;
            Ok(())
        }
        Ending::Lost => {
            term.end();
            tracing::error!("lost the leader lease; stopping the controller");
            let _ = stop_tx.send(());
            if tokio::time::timeout(Duration::from_secs(1), &mut task).await.is_err() {
                task.abort();
            }
            Err(LeaderError::Lost { namespace: s.namespace.clone(), name: s.name.clone() })
        }
        Ending::Ended(r) => {
            term.end();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(lease: Duration) -> LeaseSettings {
        LeaseSettings {
            namespace: "ns".into(),
            name: "l".into(),
            identity: "me".into(),
            lease_duration: lease,
            renew_deadline: Duration::from_secs(1),
            retry_period: Duration::from_millis(200),
        }
    }

    #[test]
    fn the_written_lease_duration_never_undercuts_the_configured_one() {
        assert_eq!(settings(Duration::from_secs(4)).lease_seconds(), 4);
        assert_eq!(settings(Duration::from_millis(4500)).lease_seconds(), 5);
        assert_eq!(settings(Duration::from_millis(300)).lease_seconds(), 1);
        assert_eq!(settings(Duration::from_secs(u64::MAX)).lease_seconds(), i32::MAX);
    }

    #[test]
    fn a_term_ends_for_good_at_its_deadline() {
        let s = settings(Duration::from_secs(4));
        let now = Instant::now();
        let term = Term::elected(&s, 3, now + Duration::from_secs(60));
        assert!(term.check().is_ok());
        term.extend(now + Duration::from_secs(120));
        assert_eq!(term.deadline(), Some(now + Duration::from_secs(120)));
        term.extend(now + Duration::from_secs(90));
        assert_eq!(term.deadline(), Some(now + Duration::from_secs(120)), "a deadline never moves back");

        let past = Term::elected(&s, 3, now);
        assert!(matches!(past.check(), Err(TermError::Expired)));
        past.extend(now + Duration::from_secs(60));
        assert!(past.check().is_err(), "a renewal cannot revive an expired term");

        let unbounded = Term::unbounded();
        assert!(unbounded.check().is_ok());
        unbounded.end();
        assert!(matches!(unbounded.check(), Err(TermError::Ended)));
    }

    #[tokio::test]
    async fn the_fence_refuses_writes_but_not_reads_after_the_term() {
        use tower::{Layer, Service, ServiceExt};
        let term = Term::unbounded();
        let inner = tower::service_fn(|_req: http::Request<()>| async { Ok::<_, BoxError>("sent") });
        let mut svc = FenceLayer::new(term.clone()).layer(inner);
        let req = |m: http::Method| http::Request::builder().method(m).uri("/x").body(()).unwrap();
        assert_eq!(svc.ready().await.unwrap().call(req(http::Method::PATCH)).await.unwrap(), "sent");
        // Dispatched while valid, first polled after the term ended: refused.
        let pending = svc.ready().await.unwrap().call(req(http::Method::PUT));
        term.end();
        assert!(pending.await.is_err());
        for m in [http::Method::POST, http::Method::PATCH, http::Method::PUT, http::Method::DELETE] {
            let e = svc.ready().await.unwrap().call(req(m.clone())).await.unwrap_err();
            assert!(e.to_string().contains("not the leader"), "{m}: {e}");
        }
        assert_eq!(svc.ready().await.unwrap().call(req(http::Method::GET)).await.unwrap(), "sent");
    }
}
