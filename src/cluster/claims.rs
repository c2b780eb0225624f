//! A client id is held by one node at a time. Each node subscribes to
//! `callbus.claim.<client id>` for the sessions it holds; a node where that client connects
//! asks there first, so only the holder hears it, ends its session and answers. With no holder
//! NATS answers "no responders" at once, so a connect after a node's death (whose
//! subscriptions died with its connection) does not wait.

use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Cluster, ACK_TIMEOUT};

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
        loop {
            let claim = tokio::select! {
                claim = claims.next() => claim,
                _ = done.cancelled() => return,
            };
            let Some(claim) = claim else { return };
            // A claim from this node is its hub's own business (it hands over by itself).
            if claim.payload.as_ref() != self.node_id.as_bytes() {
                debug!(client = %client_id, "claimed by another node");
                self.hub.release_client(&client_id);
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

impl crate::broker::Peers for Cluster {
    fn claim(&self, client_id: &str) -> BoxFuture<'_, ()> {
        let asked = self
            .client
            .request(subject(client_id), self.node_id.clone().into());
        Box::pin(async move {
            match tokio::time::timeout(ACK_TIMEOUT, asked).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {}
                Ok(Err(e)) => warn!(error = %e, "could not claim a client id"),
                Err(_) => warn!("the holder of a client id did not answer its claim"),
            }
        })
    }

    fn held(&self, client_id: &str, held: bool) {
        let _ = self.holding.send((client_id.to_owned(), held));
    }
}
