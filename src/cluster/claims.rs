//! A client id is held by one node at a time. Each node subscribes to
//! `callbus.claim.<client id>` for the sessions it holds; a node where that client connects
//! asks there first, so only the holder hears it, ends its session and answers. With no holder
//! NATS answers "no responders" at once, so a connect after a node's death (whose
//! subscriptions died with its connection) does not wait. Since a holder's subscription reaches
//! the other NATS servers a little after its session starts, a claim that found no holder is
//! also announced to every node (`callbus.ctl.claim`, not waited for): a holder still too new
//! to be found ends its session then, unless it is newer than the claim.

use futures_util::future::BoxFuture;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{next, Cluster, ACK_TIMEOUT};
use crate::model::call::now_ms;

/// Where claims that found no holder are announced to every node.
pub(super) const CLAIMS: &str = "callbus.ctl.claim";

/// A claim announced to every node.
#[derive(serde::Serialize, serde::Deserialize)]
struct Claim {
    node: String,
    client_id: String,
    /// When it was made (Unix ms): a session attached after that is newer and stays.
    at_ms: u64,
}

fn subject(client_id: &str) -> String {
    // Broker-side client ids are `<user>.<client>`, both [A-Za-z0-9_-]: valid subject tokens.
    format!("callbus.claim.{client_id}")
}

impl Cluster {
    /// Subscribes to the claims of the client ids this node holds, in the order the hub
    /// reported them.
    pub(super) async fn hold_claims(
        self: Arc<Self>,
        mut held: UnboundedReceiver<(String, bool)>,
        stop: CancellationToken,
    ) {
        let mut holding: HashMap<String, CancellationToken> = HashMap::new();
        loop {
            let change = tokio::select! {
                change = held.recv() => change,
                _ = stop.cancelled() => return,
            };
            let Some((client_id, hold)) = change else {
                return;
            };
            if !hold {
                if let Some(done) = holding.remove(&client_id) {
                    done.cancel();
                }
                continue;
            }
            if holding.contains_key(&client_id) {
                continue;
            }
            match self.client.subscribe(subject(&client_id)).await {
                Ok(claims) => {
                    let done = stop.child_token();
                    holding.insert(client_id.clone(), done.clone());
                    tokio::spawn(self.clone().answer_claims(client_id, claims, done));
                }
                Err(e) => warn!(client = %client_id, error = %e, "cannot hold a client id"),
            }
        }
    }

    async fn answer_claims(
        self: Arc<Self>,
        client_id: String,
        mut claims: async_nats::Subscriber,
        done: CancellationToken,
    ) {
        while let Some(claim) = next(&mut claims, &done).await {
            // A claim from this node is its hub's own business (it hands over by itself).
            if claim.payload.as_ref() != self.node_id.as_bytes() {
                debug!(client = %client_id, "claimed by another node");
                self.hub.release_client(&client_id, None);
            }
            if let Some(reply) = claim.reply {
                let id = self.node_id.clone().into();
                if let Err(e) = self.client.publish(reply, id).await {
                    warn!(error = %e, "cannot answer a claim");
                }
            }
        }
    }
}

impl Cluster {
    /// Ends local sessions claimed by announcements from other nodes.
    pub(super) async fn hear_claims(
        self: Arc<Self>,
        mut claims: async_nats::Subscriber,
        stop: CancellationToken,
    ) {
        while let Some(heard) = next(&mut claims, &stop).await {
            let Ok(claim) = serde_json::from_slice::<Claim>(&heard.payload) else {
                continue;
            };
            if claim.node != self.node_id {
                self.hub.release_client(&claim.client_id, Some(claim.at_ms));
            }
        }
    }
}

impl crate::broker::Peers for Cluster {
    fn claim(&self, client_id: &str) -> BoxFuture<'_, ()> {
        let claim = Claim {
            node: self.node_id.clone(),
            client_id: client_id.to_owned(),
            at_ms: now_ms(),
        };
        let asked = self
            .client
            .request(subject(client_id), self.node_id.clone().into());
        Box::pin(async move {
            match tokio::time::timeout(ACK_TIMEOUT, asked).await {
                Ok(Ok(_)) => return,
                Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {}
                Ok(Err(e)) => warn!(error = %e, "could not claim a client id"),
                Err(_) => warn!("the holder of a client id did not answer its claim"),
            }
            let Ok(payload) = serde_json::to_vec(&claim) else {
                return;
            };
            if let Err(e) = self.client.publish(CLAIMS, payload.into()).await {
                warn!(error = %e, "could not announce a claim");
            }
        })
    }

    fn held(&self, client_id: &str, held: bool) {
        let _ = self.holding.send((client_id.to_owned(), held));
    }
}
