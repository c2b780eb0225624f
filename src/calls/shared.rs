//! The call service in cluster mode: calls live in PostgreSQL, and every change is made under
//! the call's lock ([`Locked`]), then taken by every node's in-memory copy, then announced, and
//! only then is the lock released. So each call's events leave in change order, once, from
//! whichever node made the change, and signaling that follows an event is checked (on any
//! node) against the state the event announced. Busy and glare are decided in the database
//! under both parties' locks; the ring timeout is armed by the node that created the call and
//! swept by every node (whichever gets there first applies it; the others find it missed).

use futures_util::future::BoxFuture;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

use super::live::Logged;
use super::{events, CallError, Calls, NewCall};
use crate::auth::Identity;
use crate::model::call::{now_ms, Action, Call, Status, TransitionError};
use crate::push;
use crate::store::pg::{Created, Locked, Outgoing, Pg, Versioned};
use crate::store::CallReplica;

/// What the call service needs of the cluster: the database, every node's in-memory copy of
/// live calls, and the other nodes (implemented by `crate::cluster`, which sits above the
/// broker; the call service sits below it).
pub struct Shared {
    pub pg: Arc<Pg>,
    replica: CallReplica,
    nodes: Arc<dyn Nodes>,
}

/// The other nodes, as the call service needs them.
pub trait Nodes: Send + Sync + 'static {
    /// Has every live node take `call` into its copy; resolves once they did (bounded).
    fn call_changed(&self, call: Versioned) -> BoxFuture<'_, ()>;
    /// How many live connections each of `users` has on the other nodes.
    fn remote_devices<'a>(&'a self, users: &'a [String]) -> BoxFuture<'a, Vec<usize>>;
    /// Tells every node that `by` sent an offer for call `id` (as the offer is relayed: an
    /// answer to it comes at least a round trip to a client later).
    fn offered(&self, id: u64, by: &str);
}

impl Shared {
    pub fn new(pg: Arc<Pg>, replica: CallReplica, nodes: Arc<dyn Nodes>) -> Self {
        Self { pg, replica, nodes }
    }

    /// The calls every node holds in memory.
    pub fn calls(&self) -> &CallReplica {
        &self.replica
    }

    pub async fn call_changed(&self, call: Versioned) {
        self.nodes.call_changed(call).await
    }

    pub async fn remote_devices(&self, users: &[String]) -> Vec<usize> {
        self.nodes.remote_devices(users).await
    }

    /// Records an offer here and on every node.
    pub fn offered(&self, id: u64, by: &str) {
        self.replica.set_offer(id, by);
        self.nodes.offered(id, by);
    }
}

/// How often each node looks for ringing calls whose deadline passed unanswered (their
/// creating node may be gone).
const SWEEP: Duration = Duration::from_millis(500);

/// Events older than this in the outbox were left by a node that died announcing them.
const STRANDED: Duration = Duration::from_secs(3);

impl Calls {
    pub(super) async fn initiate_shared(
        &self,
        cluster: &Shared,
        caller: &Identity,
        req: NewCall,
    ) -> Result<Call, CallError> {
        let now = now_ms();
        let ring = self.inner.limits.ring_timeout.as_millis() as u64;
        // The push job is written with the call (its receiver's devices counted first).
        let devices = match self.inner.push {
            Some(_) => Some(self.live_devices(&req.receiver_id).await),
            None => None,
        };
        let make = |id| {
            let call = super::new_call(id, caller, &req, now, self.inner.limits.ring_timeout);
            let incoming = events::incoming_call(&call, caller);
            let mut out = outgoing(vec![(call.receiver.id.clone(), incoming)]);
            // The ring: not rung once the call stopped ringing.
            for ring in &mut out {
                ring.expires_ms = Some(call.ring_deadline_ms);
            }
            let job = devices.map(|devices| push::ringing(&call, devices));
            (call, out, job)
        };
        let created = cluster
            .pg
            .create_call(caller.user_id(), &req.receiver_id, make)
            .await?;
        let (locked, call) = match created {
            Created::New(locked, call) => (locked, call),
            Created::Busy => {
                let event = events::busy(&req.receiver_id, &req.conversation_id);
                self.announce_now(caller.user_id(), &event).await?;
                return Err(CallError::Busy {
                    receiver_id: req.receiver_id,
                    conversation_id: req.conversation_id,
                });
            }
            Created::Glare(existing) => {
                let name = existing.caller.username.clone();
                return Err(CallError::Glare(name, Box::new(existing)));
            }
            Created::Calling(existing) => return Err(CallError::Calling(Box::new(existing))),
        };
        self.wake_push();
        let call = self.announce_shared(cluster, locked, call).await;
        crate::metrics::CALLS_INITIATED.inc();
        self.arm_ring_timer(call.id, ring);
        Ok(call)
    }

    pub(super) async fn transition_shared(
        &self,
        cluster: &Shared,
        id: u64,
        action: Action,
    ) -> Result<Call, CallError> {
        let (mut locked, current) = cluster.pg.lock_call(id).await?.ok_or(CallError::NotFound)?;
        let next = match current.call.apply(&action, now_ms()) {
            Ok(next) => Versioned {
                call: next,
                version: current.version + 1,
            },
            Err(e) => {
                locked.release().await;
                return Err(e.into());
            }
        };
        let out = outgoing(super::transition_events(&next.call));
        let job = match self.inner.push {
            Some(_) if current.call.status == Status::Ringing => {
                let devices = self.live_devices(&next.call.receiver.id).await;
                Some(push::stopped(&next.call, devices))
            }
            _ => None,
        };
        locked.update(&next, &out, job.as_ref()).await?;
        if job.is_some() {
            self.wake_push();
        }
        let call = self.announce_shared(cluster, locked, next).await;
        crate::metrics::CALL_TRANSITIONS.inc();
        Ok(call)
    }

    /// Every node takes the new state, then the call's pending events are published (any
    /// left by a node that died announcing, then this change's), then the lock goes.
    async fn announce_shared(&self, cluster: &Shared, locked: Locked<'_>, call: Versioned) -> Call {
        cluster.call_changed(call.clone()).await;
        let mut published = true;
        for event in locked.pending() {
            let logged = Logged {
                user_id: event.user_id.clone(),
                payload: event.payload.clone(),
                seq: None,
                expires_at_ms: event.expires_ms,
            };
            published = self.publish(&logged).await;
            if !published {
                break;
            }
        }
        // Events not stored by the bus stay in the outbox for the sweep to publish again.
        match published {
            true => locked.announced().await,
            false => locked.release().await,
        }
        call.call
    }

    /// Announces the events of calls whose announcer died (left in the outbox for longer than
    /// an announcement takes); a call someone holds is left to them.
    async fn sweep_stranded(&self, cluster: &Shared) {
        let stranded = match cluster.pg.stranded_calls(STRANDED.as_secs_f64()).await {
            Ok(ids) => ids,
            Err(e) => return warn!(error = %e, "cannot look for stranded events"),
        };
        for id in stranded {
            match cluster.pg.try_lock_call(id).await {
                Ok(Some((locked, call))) => {
                    info!(call = id, "announcing events a node left");
                    self.announce_shared(cluster, locked, call).await;
                }
                Ok(None) => {}
                Err(e) => warn!(call = id, error = %e, "cannot take a stranded call"),
            }
        }
    }

    /// Tells this node's push worker a job was queued (other nodes' workers look by
    /// themselves).
    fn wake_push(&self) {
        if let Some(push) = &self.inner.push {
            push.notify_one();
        }
    }
}

fn outgoing(events: Vec<(String, String)>) -> Vec<Outgoing> {
    let each = events.into_iter().map(|(user_id, payload)| Outgoing {
        user_id,
        payload,
        expires_ms: None,
    });
    each.collect()
}

/// Until shutdown: announces what nodes that died mid-announcement left in the outbox, and
/// times out ringing calls past their deadline, whichever node created them.
pub(super) async fn sweep(calls: Calls, cluster: Arc<Shared>) {
    let mut tick = tokio::time::interval(SWEEP);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = calls.inner.shutdown.cancelled() => return,
        }
        calls.sweep_stranded(&cluster).await;
        // A little after the deadline: the creating node's own timer usually got there first.
        let due = match cluster
            .pg
            .overdue_ringing(now_ms().saturating_sub(250))
            .await
        {
            Ok(due) => due,
            Err(e) => {
                warn!(error = %e, "cannot look for overdue calls");
                continue;
            }
        };
        for id in due {
            match calls.transition(id, Action::Timeout).await {
                Ok(_) => info!(call = id, "missed (swept)"),
                Err(CallError::Transition(TransitionError::WrongState(_))) => {}
                Err(e) => warn!(call = id, error = %e, "ring timeout failed"),
            }
        }
    }
}
