//! A connection's life in the hub: attaching (a new session, a resumed one, or a takeover,
//! which waits for the older connection to hand the session back) and leaving (a clean session
//! goes; a persistent one is kept with what the connection had not finished).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::time::Instant;

use super::mailbox::{self, Event, Mailbox};
use super::stored::{Parting, Queued, Resumed, Stored};
use super::{Asked, Attached, Entry, Hub, Link, Registered, Registration, State};
use crate::auth::Identity;
use crate::broker::codec::QoS;
use crate::metrics;
use crate::sync::lock;
use tracing::info;

impl Hub {
    /// Attaches a connection of `identity` under its broker-side `client_id`. An older live
    /// connection with the same client id is told it was replaced and stops receiving at once.
    /// With `asked.resume` an existing session is resumed (what was queued for it is returned,
    /// checked against the ACL again); otherwise any stored session is discarded. A new
    /// session is kept after the connection with `asked.keep`. A persistent session still live
    /// on an older connection is handed over: with `handover` the caller is told to wait for
    /// the older connection to part, so nothing it had in flight is reordered; without, it is
    /// taken at once.
    pub(crate) fn register(
        self: &Arc<Self>,
        identity: Arc<Identity>,
        client_id: &Arc<str>,
        asked: Asked,
        handover: bool,
    ) -> Registered {
        let clean = !asked.resume;
        let (sender, mailbox) = mailbox::mailbox();
        let conn = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut state = lock(&self.state);
        if handover && !clean {
            if let Some(wait) = self.hand_over(&mut state, client_id) {
                return Registered::Handover(wait);
            }
        }
        if let Some(closed) = state.closed {
            sender.send(closed());
        }
        let resumable = match state.by_client.get(client_id).copied() {
            Some(old) if !clean && state.sessions.get(&old).is_some_and(Entry::resumable) => {
                Some(old)
            }
            Some(old) => {
                if let Some(entry) = state.remove(old) {
                    self.forget(&entry);
                    if let Link::Live { sender: old, .. } = entry.link {
                        old.send(Event::Replaced);
                    }
                }
                None
            }
            None => None,
        };
        // A session restored after a restart resumes with the durable events it missed.
        let logged = resumable
            .and_then(|sid| match state.sessions.get(&sid) {
                Some(Entry {
                    link: Link::Away(stored),
                    identity,
                    ..
                }) => stored.from_log.map(|through| {
                    let bounds = (through, stored.logged_before);
                    self.logged_since(&state, sid, identity.user_id(), bounds)
                }),
                _ => None,
            })
            .unwrap_or_default();
        let resumed_entry =
            resumable.and_then(|sid| state.sessions.get_mut(&sid).map(|e| (sid, e)));
        let (sid, mut resumed) = match resumed_entry {
            Some((sid, entry)) => {
                let previous = std::mem::replace(&mut entry.link, Link::Live { sender, conn });
                entry.identity = identity.clone();
                entry.attached_ms = crate::model::call::now_ms();
                let mut resumed = match previous {
                    Link::Live { sender: old, .. } => {
                        old.send(Event::Replaced);
                        Resumed::default()
                    }
                    Link::Away(stored) => stored.resume(logged),
                };
                resumed.no_local = entry.no_local.is_some();
                (sid, Some(resumed))
            }
            None => {
                if asked.keep {
                    self.evict_over_limit(&mut state, identity.user_id());
                }
                let link = Link::Live { sender, conn };
                let client_id = client_id.clone();
                let sid = self.add(&mut state, identity.clone(), client_id, asked.keep, link);
                self.save(&state, sid);
                (sid, None)
            }
        };
        drop(state);
        if let Some(resumed) = &mut resumed {
            // The ACL and membership are checked again on replay.
            resumed.inflight.retain(|m| self.replayable(&identity, m));
            resumed.queue.retain(|m| self.replayable(&identity, m));
        }
        let registration = Registration {
            hub: self.clone(),
            id: sid,
            conn,
            closed: false,
        };
        Registered::Attached(Attached {
            registration,
            mailbox,
            resumed,
        })
    }

    /// Tells the live connection of a persistent session to go and keeps the session for it
    /// to part into; returns what resolves once it has.
    pub(super) fn hand_over(
        &self,
        state: &mut State,
        client_id: &str,
    ) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let sid = state.by_client.get(client_id)?;
        let entry = state.sessions.get_mut(sid)?;
        let (done, wait) = tokio::sync::oneshot::channel();
        match &mut entry.link {
            Link::Live { sender, conn } if entry.persistent => {
                sender.send(Event::Replaced);
                let mut stored = Stored::new(*conn, Instant::now() + entry.expiry);
                stored.waiting.push(done);
                entry.link = Link::Away(Box::new(stored));
            }
            // Another connection is already waiting for the same parting.
            Link::Away(stored) if !stored.waiting.is_empty() => stored.waiting.push(done),
            _ => return None,
        }
        Some(wait)
    }

    /// Makes room for one more persistent session of `user`: while the user keeps
    /// `max_per_user` of them, the one whose client has been away longest is expired (live
    /// ones are bounded by the connection limit per user instead).
    fn evict_over_limit(&self, state: &mut State, user: &str) {
        let max = self.sessions.max_per_user;
        loop {
            let sids = state.by_user.get(user).map_or(&[][..], |s| s.as_slice());
            let kept = sids
                .iter()
                .filter_map(|sid| Some((*sid, state.sessions.get(sid)?)));
            let persistent: Vec<_> = kept.filter(|(_, e)| e.persistent).collect();
            if persistent.len() < max {
                return;
            }
            let away = persistent
                .iter()
                .filter(|(_, e)| matches!(e.link, Link::Away(_)))
                .min_by_key(|(_, e)| e.attached_ms)
                .map(|(sid, _)| *sid);
            let Some(entry) = away.and_then(|sid| state.remove(sid)) else {
                return;
            };
            info!(client = %entry.client_id, max, "stored session expired: its user keeps too many");
            self.forget(&entry);
            metrics::SESSIONS_EVICTED.inc();
        }
    }

    pub(super) fn add(
        &self,
        state: &mut State,
        identity: Arc<Identity>,
        client_id: Arc<str>,
        persistent: bool,
        link: Link,
    ) -> u64 {
        let sid = self.next_id.fetch_add(1, Ordering::Relaxed);
        state.by_client.insert(client_id.clone(), sid);
        if let Some(peers) = &state.peers {
            peers.held(&client_id, true);
        }
        let user = super::UserKey(identity.clone());
        state.by_user.entry(user).or_default().push(sid);
        let entry = Entry {
            identity,
            client_id,
            persistent,
            link,
            delivered_through: 0,
            attached_ms: crate::model::call::now_ms(),
            queues: (persistent && self.durable.get().is_some()).then(super::durable::Queues::new),
            expiry: self.sessions.expiry(),
            no_local: None,
        };
        state.sessions.insert(sid, entry);
        sid
    }

    pub(super) fn replayable(&self, who: &Identity, message: &Queued) -> bool {
        std::str::from_utf8(&message.topic).is_ok_and(|t| self.may_receive(who, t))
    }

    /// A connection ended. A clean session goes; a persistent one is kept with what the
    /// connection had not finished. A connection already taken over hands its leftovers to
    /// the newer one.
    pub(super) fn leave(&self, sid: u64, conn: u64, parting: Option<(Mailbox, Parting)>) {
        let mut state = lock(&self.state);
        let Some(entry) = state.sessions.get_mut(&sid) else {
            return;
        };
        let (unsent, parting) = match parting {
            Some((mut mailbox, mut parting)) => {
                let mut unsent = std::mem::take(&mut parting.unsent);
                unsent.extend(mailbox.drain());
                (unsent, Some(parting))
            }
            None => (Vec::new(), None),
        };
        match &mut entry.link {
            Link::Live { conn: c, .. } if *c == conn => {
                if !entry.persistent {
                    state.remove(sid);
                    return;
                }
                if entry.queues.is_some() {
                    self.part_durable(&mut state, sid);
                    return;
                }
                let mut stored = Stored::new(conn, Instant::now() + entry.expiry);
                if let Some(parting) = parting {
                    entry.delivered_through = entry.delivered_through.max(parting.acked_event);
                    stored.part(parting, unsent, &self.sessions);
                }
                entry.link = Link::Away(Box::new(stored));
                self.save(&state, sid);
            }
            Link::Live { sender, .. } => {
                let inflight = parting.map(|p| p.inflight).unwrap_or_default();
                for m in inflight.into_iter().chain(unsent) {
                    sender.deliver(Event::Deliver(QoS::AtLeastOnce, Queued { pkid: None, ..m }));
                }
            }
            Link::Away(stored) if stored.conn == conn => {
                if let Some(parting) = parting {
                    stored.part(parting, unsent, &self.sessions);
                }
            }
            Link::Away(_) => {}
        }
    }
}
