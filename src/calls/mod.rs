//! The call service: the one place call state changes. Each change is written to sled under one
//! lock (so the busy check and the write are atomic), made durable by a group commit, and only
//! then announced, through an outbox that publishes events in the order the changes were made.

mod announce;
pub mod events;
mod live;
mod reaper;
mod retention;
mod shared;

use live::{Live, Logged, Outbox};
pub use shared::{Nodes, Shared};

use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::auth::Identity;
use crate::bus::Publisher;
use crate::model::call::{now_ms, Action, Call, CallType, Party, Status, TransitionError};
use crate::push;
use crate::store::{Store, StoreError};
use crate::sync::lock;

/// How long after a restart the calls missed while down are announced.
pub const RECONNECT_GRACE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("call not found")]
    NotFound,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Transition(#[from] TransitionError),
    #[error("the receiver is busy in another call")]
    Busy {
        receiver_id: String,
        conversation_id: String,
    },
    #[error("{0} is already calling you: accept that call instead")]
    Glare(String, Box<Call>),
    #[error("you are already calling: end that call first")]
    Calling(Box<Call>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How long calls may last in each state.
#[derive(Debug, Clone, Copy)]
pub struct CallLimits {
    /// A ringing call is missed after this.
    pub ring_timeout: Duration,
    /// An active call neither of whose parties has had a live connection for this long ends
    /// (`connection_lost`): long enough for a phone to come back on another network.
    pub lost_grace: Duration,
    /// No call stays active longer than this (`max_duration`).
    pub max_duration: Duration,
    /// Ended calls leave the embedded store this long after they ended (None: never).
    pub keep_ended: Option<Duration>,
}

impl Default for CallLimits {
    fn default() -> Self {
        Self {
            ring_timeout: Duration::from_secs(60),
            lost_grace: Duration::from_secs(120),
            max_duration: Duration::from_secs(4 * 3600),
            keep_ended: None,
        }
    }
}

/// Whether a user has a live connection (on any device); the broker's hub answers.
pub trait Presence: Send + Sync + 'static {
    /// How many live connections (devices) the user has.
    fn live_devices(&self, user_id: &str) -> usize;

    fn online(&self, user_id: &str) -> bool {
        self.live_devices(user_id) > 0
    }

    /// Whether the user has a persistent session (connected or away), which a restart must
    /// not make miss an event.
    fn keeps_sessions(&self, user_id: &str) -> bool;
}

/// A new ringing call from `caller`, made at `now` (Unix ms).
fn new_call(id: u64, caller: &Identity, req: &NewCall, now: u64, ring: Duration) -> Call {
    Call {
        id,
        caller: Party {
            id: caller.user_id().to_owned(),
            username: caller.username().to_owned(),
            first_name: caller.first_name().to_owned(),
            last_name: caller.last_name().to_owned(),
        },
        receiver: Party {
            id: req.receiver_id.clone(),
            username: req.receiver_id.clone(),
            first_name: String::new(),
            last_name: String::new(),
        },
        call_type: req.call_type,
        conversation_id: req.conversation_id.clone(),
        status: Status::Ringing,
        created_ms: now,
        ring_deadline_ms: now + ring.as_millis() as u64,
        accepted_ms: None,
        ended_ms: None,
        end_reason: None,
        hangup_reason: None,
        accepted_device: None,
    }
}

/// What a transition to `next` announces, to whom.
fn transition_events(next: &Call) -> Vec<(String, String)> {
    let both = |event: String| {
        vec![
            (next.caller.id.clone(), event.clone()),
            (next.receiver.id.clone(), event),
        ]
    };
    let mut out = match next.status {
        Status::Active => both(events::accepted(next)),
        _ => both(events::ended(next)),
    };
    if next.status == Status::Missed {
        out.push((next.receiver.id.clone(), events::missed_call(next)));
    }
    out
}

/// A new call's request, already validated for shape.
pub struct NewCall {
    pub receiver_id: String,
    pub call_type: CallType,
    pub conversation_id: String,
}

struct Inner {
    store: Store,
    publisher: Publisher,
    presence: Arc<dyn Presence>,
    limits: CallLimits,
    /// Wakes the push worker when jobs were queued (None: no webhook configured).
    push: Option<Arc<tokio::sync::Notify>>,
    live: Mutex<Live>,
    /// The ring timer of each ringing call, stopped when the call stops ringing (a timer per
    /// call ever started would hold memory for the whole ring timeout).
    ring_timers: Mutex<std::collections::HashMap<u64, tokio::task::AbortHandle>>,
    outbox: Mutex<Outbox>,
    /// Held while publishing from the outbox, so events leave in change order even though
    /// publishing may wait for the bus.
    announcing: tokio::sync::Mutex<()>,
    /// Cluster mode: calls live in PostgreSQL ([`shared`]); `live` and `outbox` stay empty.
    cluster: Option<Arc<Shared>>,
    shutdown: CancellationToken,
}

/// The call service.
#[derive(Clone)]
pub struct Calls {
    inner: Arc<Inner>,
}

impl Calls {
    /// Loads live calls, marks those whose ring timeout passed while callbus was down as missed
    /// (announcing it), and re-arms the timers of the others.
    pub async fn start(
        store: Store,
        publisher: Publisher,
        presence: Arc<dyn Presence>,
        limits: CallLimits,
        push: Option<Arc<tokio::sync::Notify>>,
        cluster: Option<Arc<Shared>>,
        shutdown: CancellationToken,
    ) -> Result<Self, StoreError> {
        let calls = Calls {
            inner: Arc::new(Inner {
                store,
                publisher,
                presence,
                limits,
                push,
                live: Mutex::default(),
                ring_timers: Mutex::default(),
                outbox: Mutex::default(),
                announcing: tokio::sync::Mutex::new(()),
                cluster,
                shutdown,
            }),
        };
        if let Some(cluster) = &calls.inner.cluster {
            tokio::spawn(shared::sweep(calls.clone(), cluster.clone()));
            tokio::spawn(reaper::run(calls.clone()));
            return Ok(calls);
        }
        let live = calls.inner.store.calls.live()?;
        let now = now_ms();
        let mut missed = Vec::new();
        for call in live {
            if call.status == Status::Ringing && call.ring_deadline_ms <= now {
                info!(call = call.id, "ring timeout passed while down: missed");
                let Ok(next) = call.apply(&Action::Timeout, now) else {
                    continue; // only ringing calls get here
                };
                calls.inner.store.calls.update(&next)?;
                let end = events::ended(&next);
                missed.push(calls.log(&next.caller.id, &end)?);
                missed.push(calls.log(&next.receiver.id, &end)?);
                missed.push(calls.log(&next.receiver.id, &events::missed_call(&next))?);
                continue;
            }
            lock(&calls.inner.live).add(&call);
            if call.status == Status::Ringing {
                calls.arm_ring_timer(call.id, call.ring_deadline_ms - now);
            }
        }
        calls.inner.store.flush().await?;
        if !missed.is_empty() {
            calls.announce_after_restart(missed);
        }
        tokio::spawn(reaper::run(calls.clone()));
        if let Some(keep) = calls.inner.limits.keep_ended {
            tokio::spawn(retention::run(calls.clone(), keep));
        }
        Ok(calls)
    }

    /// Announces calls that became missed while callbus was down. Nobody is connected at
    /// startup, so the events wait for [`RECONNECT_GRACE`], long enough for clients'
    /// automatic reconnects; the calls themselves are already `missed` in the store and the API.
    fn announce_after_restart(&self, missed: Vec<Logged>) {
        let calls = self.clone();
        let shutdown = self.inner.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(RECONNECT_GRACE) => {}
                _ = shutdown.cancelled() => return,
            }
            for event in &missed {
                calls.publish(event).await;
            }
        });
    }

    /// Runs `f` on a call as this node knows it without waiting, and on who sent its latest
    /// offer if known. A live call is looked at in place, under the lock its changes take, so
    /// `f` should be short; in cluster mode it sees the in-memory copy of live and recently
    /// ended calls, which every change reaches before it is announced.
    pub fn with_call<R>(
        &self,
        id: u64,
        f: impl FnOnce(Option<&Call>, Option<&str>) -> R,
    ) -> Result<R, StoreError> {
        if let Some(cluster) = &self.inner.cluster {
            let replica = cluster.calls();
            let (call, offered_by) = (replica.get(id), replica.offered_by(id));
            return Ok(f(call.as_ref(), offered_by.as_deref()));
        }
        let live = lock(&self.inner.live);
        if let Some(call) = live.call(id) {
            let offered_by = live.last_offer_by.get(&id).map(String::as_str);
            return Ok(f(Some(call), offered_by));
        }
        drop(live);
        // Not live: ended (or never was); no offer of it is remembered.
        let call = self.inner.store.calls.get(id)?;
        Ok(f(call.as_ref(), None))
    }

    /// A call as last written: live ones from memory, others from the store. Takes the live
    /// lock's guard, under which records are written.
    fn current(&self, live: &Live, id: u64) -> Result<Option<Call>, StoreError> {
        match live.call(id) {
            Some(call) => Ok(Some(call.clone())),
            None => self.inner.store.calls.get(id),
        }
    }

    /// A call, ended long ago or not.
    pub async fn fetch(&self, id: u64) -> Result<Option<Call>, StoreError> {
        match &self.inner.cluster {
            Some(cluster) => Ok(cluster.pg.call(id).await?.map(|v| v.call)),
            None => self.inner.store.calls.get(id),
        }
    }

    /// Every ringing or active call.
    fn live_calls(&self) -> Vec<Call> {
        if let Some(cluster) = &self.inner.cluster {
            return cluster.calls().live();
        }
        lock(&self.inner.live).calls()
    }

    /// How many calls are ringing and how many active.
    pub fn live_counts(&self) -> (usize, usize) {
        let statuses = self.live_calls().into_iter();
        statuses.fold((0, 0), |(r, a), call| match call.status {
            Status::Ringing => (r + 1, a),
            Status::Active => (r, a + 1),
            _ => (r, a),
        })
    }

    /// How many live connections (devices) `user_id` has, on every node.
    pub async fn live_devices(&self, user_id: &str) -> usize {
        let here = self.inner.presence.live_devices(user_id);
        match &self.inner.cluster {
            Some(cluster) => here + cluster.remote_devices(&[user_id.to_owned()]).await[0],
            None => here,
        }
    }

    /// Whether calls are handed to a push webhook.
    pub fn pushes(&self) -> bool {
        self.inner.push.is_some()
    }

    /// Records that `by` sent an offer for call `id`, if the call is still live (in cluster
    /// mode on every node).
    pub fn record_offer(&self, id: u64, by: &str) {
        if let Some(cluster) = &self.inner.cluster {
            return cluster.offered(id, by);
        }
        let mut live = lock(&self.inner.live);
        if live.call(id).is_some() {
            live.last_offer_by.insert(id, by.to_owned());
        }
    }

    pub async fn history(
        &self,
        uid: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<Call>, StoreError> {
        match &self.inner.cluster {
            Some(cluster) => cluster.pg.call_history(uid, before, limit).await,
            None => self.inner.store.calls.history(uid, before, limit),
        }
    }

    /// Starts a call from `caller`. Membership is checked by the caller of this function.
    pub async fn initiate(&self, caller: &Identity, req: NewCall) -> Result<Call, CallError> {
        if let Some(cluster) = &self.inner.cluster {
            return self.initiate_shared(cluster, caller, req).await;
        }
        let (seq, call) = match self.create(caller, req) {
            Err(CallError::Busy {
                receiver_id,
                conversation_id,
            }) => {
                let event = events::busy(&receiver_id, &conversation_id);
                self.announce_now(caller.user_id(), &event).await?;
                return Err(CallError::Busy {
                    receiver_id,
                    conversation_id,
                });
            }
            other => other?,
        };
        self.commit_and_announce(seq).await?;
        crate::metrics::CALLS_INITIATED.inc();
        self.arm_ring_timer(call.id, self.inner.limits.ring_timeout.as_millis() as u64);
        Ok(call)
    }

    /// Writes a new ringing call, unless the receiver is busy or already calling the caller
    /// (glare), all under the live lock so that two racing initiates cannot both win.
    fn create(&self, caller: &Identity, req: NewCall) -> Result<(u64, Call), CallError> {
        let now = now_ms();
        let mut live = lock(&self.inner.live);
        // Glare: the receiver is already ringing the caller. The first call wins; the second
        // caller is pointed at it.
        // One outgoing ring at a time, as on a phone (ringing several people at once would
        // make each of them busy to everyone else).
        for id in live.calls_of(caller.user_id()) {
            if let Some(existing) = live.call(*id).cloned() {
                if existing.status != Status::Ringing {
                    continue;
                }
                if existing.caller.id == req.receiver_id && existing.receiver.id == caller.user_id()
                {
                    return Err(CallError::Glare(
                        existing.caller.username.clone(),
                        Box::new(existing),
                    ));
                }
                if existing.caller.id == caller.user_id() {
                    return Err(CallError::Calling(Box::new(existing)));
                }
            }
        }
        if !live.calls_of(&req.receiver_id).is_empty() {
            return Err(CallError::Busy {
                receiver_id: req.receiver_id,
                conversation_id: req.conversation_id,
            });
        }
        let call = new_call(
            self.inner.store.calls.next_id()?,
            caller,
            &req,
            now,
            self.inner.limits.ring_timeout,
        );
        self.inner.store.calls.create(&call)?;
        if self.inner.push.is_some() {
            let devices = self.inner.presence.live_devices(&call.receiver.id);
            self.inner
                .store
                .push
                .enqueue(&push::ringing(&call, devices))?;
        }
        live.add(&call);
        // The ring: not rung once the call stopped ringing (MQTT 5 clients are told when).
        let event = events::incoming_call(&call, caller);
        let ring = Some(call.ring_deadline_ms);
        let seq = self.enqueue_expiring(vec![(call.receiver.id.clone(), event)], ring)?;
        Ok((seq, call))
    }

    /// Applies an action to a call; the new record once durable.
    pub async fn transition(&self, id: u64, action: Action) -> Result<Call, CallError> {
        let call = self.transition_inner(id, action).await?;
        if call.status != Status::Ringing {
            if let Some(timer) = lock(&self.inner.ring_timers).remove(&id) {
                timer.abort();
            }
        }
        Ok(call)
    }

    async fn transition_inner(&self, id: u64, action: Action) -> Result<Call, CallError> {
        if let Some(cluster) = &self.inner.cluster {
            return self.transition_shared(cluster, id, action).await;
        }
        let (seq, call) = {
            let mut live = lock(&self.inner.live);
            let current = self.current(&live, id)?.ok_or(CallError::NotFound)?;
            let next = current.apply(&action, now_ms())?;
            self.inner.store.calls.update(&next)?;
            if current.status == Status::Ringing && self.inner.push.is_some() {
                let devices = self.inner.presence.live_devices(&next.receiver.id);
                self.inner
                    .store
                    .push
                    .enqueue(&push::stopped(&next, devices))?;
            }
            if next.status.is_terminal() {
                live.remove(&next);
            } else {
                live.add(&next);
            }
            (self.enqueue(transition_events(&next))?, next)
        };
        self.commit_and_announce(seq).await?;
        crate::metrics::CALL_TRANSITIONS.inc();
        Ok(call)
    }

    /// Publishes `notification.created` with the main app's own payload, once it is in the
    /// durable event log.
    /// Returns the event's `id`.
    pub async fn notify(&self, user_id: &str, payload: &Value) -> Result<String, StoreError> {
        let (id, event) = events::notification_created(payload);
        self.announce_now(user_id, &event).await?;
        Ok(id)
    }

    fn arm_ring_timer(&self, id: u64, after_ms: u64) {
        let calls = self.clone();
        let shutdown = self.inner.shutdown.clone();
        let mut timers = lock(&self.inner.ring_timers);
        let timer = tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(after_ms)) => {}
                _ = shutdown.cancelled() => return,
            }
            lock(&calls.inner.ring_timers).remove(&id);
            match calls.transition(id, Action::Timeout).await {
                Ok(_) => info!(call = id, "missed"),
                Err(CallError::Transition(TransitionError::WrongState(_))) => {}
                Err(e) => warn!(call = id, error = %e, "ring timeout failed"),
            }
        });
        if let Some(old) = timers.insert(id, timer.abort_handle()) {
            old.abort();
        }
    }
}
