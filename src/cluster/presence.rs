//! Questions to the other nodes and their answers: who is connected where (presence).

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{next, Cluster, PRESENCE, PRESENCE_TIMEOUT};
use crate::sync::lock;

/// Answers to this node's questions (change confirmations, presence) arrive on one
/// subscription, `callbus.reply.<node>.<n>`, and go to whoever asked question `n`: no
/// subscription per question (each would be announced to every NATS server of the cluster).
#[derive(Default)]
pub(super) struct Replies {
    next: std::sync::atomic::AtomicU64,
    waiting: Mutex<HashMap<u64, tokio::sync::mpsc::UnboundedSender<bytes::Bytes>>>,
}

/// A question waiting for its answers; forgotten when dropped.
pub(super) struct Asking<'a> {
    replies: &'a Replies,
    n: u64,
    pub subject: String,
    pub answers: tokio::sync::mpsc::UnboundedReceiver<bytes::Bytes>,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        lock(&self.replies.waiting).remove(&self.n);
    }
}

impl Replies {
    pub(super) fn ask(&self, node: &str) -> Asking<'_> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, answers) = tokio::sync::mpsc::unbounded_channel();
        lock(&self.waiting).insert(n, tx);
        Asking {
            replies: self,
            n,
            subject: format!("callbus.reply.{node}.{n}"),
            answers,
        }
    }

    fn answer(&self, subject: &str, payload: bytes::Bytes) {
        let n = subject.rsplit('.').next().and_then(|n| n.parse().ok());
        if let Some(tx) = n.and_then(|n| lock(&self.waiting).get(&n).cloned()) {
            let _ = tx.send(payload);
        }
    }
}

/// How many live connections each of `users` has on the answering node.
#[derive(Serialize, Deserialize)]
struct PresenceReply {
    node: String,
    devices: Vec<usize>,
}

impl Cluster {
    pub(super) async fn hear_replies(
        self: Arc<Self>,
        mut replies: async_nats::Subscriber,
        stop: CancellationToken,
    ) {
        while let Some(heard) = next(&mut replies, &stop).await {
            self.replies.answer(heard.subject.as_str(), heard.payload);
        }
    }

    pub(super) async fn answer_presence(
        self: Arc<Self>,
        mut questions: async_nats::Subscriber,
        stop: CancellationToken,
    ) {
        while let Some(asked) = next(&mut questions, &stop).await {
            let (Some(reply), Ok(users)) = (
                asked.reply,
                serde_json::from_slice::<Vec<String>>(&asked.payload),
            ) else {
                continue;
            };
            let answer = PresenceReply {
                node: self.node_id.clone(),
                devices: users.iter().map(|u| self.hub.live_devices(u)).collect(),
            };
            let Ok(payload) = serde_json::to_vec(&answer) else {
                continue;
            };
            if let Err(e) = self.client.publish(reply, payload.into()).await {
                warn!(error = %e, "cannot answer a presence question");
            }
        }
    }

    /// How many live connections each of `users` has on the other nodes (those that answer
    /// within [`PRESENCE_TIMEOUT`]).
    pub async fn remote_devices(&self, users: &[String]) -> Vec<usize> {
        let mut devices = vec![0; users.len()];
        if let Err(e) = self.ask_presence(users, &mut devices).await {
            warn!(error = %e, "cannot ask the other nodes who is connected");
        }
        devices
    }

    async fn ask_presence(&self, users: &[String], devices: &mut [usize]) -> anyhow::Result<()> {
        let mut waiting = self.live_peers();
        if waiting.is_empty() {
            return Ok(());
        }
        let mut asking = self.replies.ask(&self.node_id);
        let question = serde_json::to_vec(users)?;
        (self.client)
            .publish_with_reply(PRESENCE, asking.subject.clone(), question.into())
            .await?;
        let deadline = Instant::now() + PRESENCE_TIMEOUT;
        while !waiting.is_empty() {
            let answer = tokio::time::timeout_at(deadline, asking.answers.recv()).await;
            let Ok(Some(reply)) = answer else {
                break;
            };
            let Ok(reply) = serde_json::from_slice::<PresenceReply>(&reply) else {
                continue;
            };
            if waiting.remove(&reply.node) {
                for (total, n) in devices.iter_mut().zip(reply.devices) {
                    *total += n;
                }
            }
        }
        Ok(())
    }
}
