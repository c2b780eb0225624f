//! Policy between clients and the router: identity, topic ACL, payload validation and sender
//! stamping. The gateway asks the [`Bridge`] about every CONNECT, SUBSCRIBE filter, PUBLISH and
//! delivery; the decisions themselves are plain functions in [`acl`] and [`message`].

pub mod acl;
pub mod message;
pub mod signaling;

use crate::auth::{AuthError, Authenticator, Identity};
use crate::store::Store;
use message::{ErrorCode, ErrorRef};
use std::sync::Arc;

/// What to do with a client's PUBLISH.
#[derive(Debug)]
pub enum PublishOutcome {
    /// Publish these messages (topic, payload), in order, on the sender's own link.
    Deliver(Vec<(String, Vec<u8>)>),
    /// Deliver nothing; tell the sender why with an `error` event.
    Refuse {
        code: ErrorCode,
        detail: String,
        about: ErrorRef,
    },
}

/// Why a CONNECT was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnectRefused {
    #[error(transparent)]
    Token(#[from] AuthError),
    #[error("MQTT username must be empty or equal the token's sub")]
    UsernameMismatch,
}

/// The policy the gateway consults.
#[derive(Clone)]
pub struct Bridge {
    auth: Authenticator,
    store: Store,
    offers: Arc<signaling::OfferLog>,
}

impl Bridge {
    pub fn new(auth: Authenticator, store: Store) -> Self {
        Self {
            auth,
            store,
            offers: Arc::default(),
        }
    }

    /// Authenticates an MQTT CONNECT: the JWT is the password; the username is empty or `sub`.
    pub fn authenticate(
        &self,
        username: Option<&str>,
        password: Option<&str>,
    ) -> Result<Identity, ConnectRefused> {
        let identity = self.auth.verify(password.unwrap_or(""))?;
        match username {
            None | Some("") => Ok(identity),
            Some(u) if u == identity.user_id => Ok(identity),
            Some(_) => Err(ConnectRefused::UsernameMismatch),
        }
    }

    fn is_member<'a>(&'a self, who: &'a Identity) -> impl Fn(&str) -> bool + 'a {
        move |cid| self.store.conversations.is_member(cid, &who.user_id)
    }

    /// Decides one SUBSCRIBE filter.
    pub fn may_subscribe(&self, who: &Identity, filter: &str) -> bool {
        acl::authorize_subscribe(who, filter, self.is_member(who)).is_ok()
    }

    /// Whether a message on `topic` may still be delivered to `who`: membership can change, and
    /// the `chat/{cid}` copy of call signaling is for the call's two parties only.
    pub fn may_receive(&self, who: &Identity, topic: &str, payload: &[u8]) -> bool {
        if !acl::may_receive(who, topic, self.is_member(who)) {
            return false;
        }
        if who.role == crate::auth::Role::Admin {
            return true;
        }
        match (acl::classify(topic), signaling::signaled_call(payload)) {
            (acl::TopicKind::Chat(_), Some(call)) => matches!(
                self.store.calls.get(call),
                Ok(Some(call)) if call.is_party(&who.user_id)
            ),
            _ => true,
        }
    }

    /// Decides a PUBLISH and turns it into what the router should carry.
    pub fn on_publish(&self, who: &Identity, topic: &str, payload: &[u8]) -> PublishOutcome {
        let refuse = |code, detail: String| PublishOutcome::Refuse {
            code,
            detail,
            about: message::describe(payload, topic),
        };
        let cid = match acl::authorize_publish(who, topic, self.is_member(who)) {
            Ok(cid) => cid,
            Err(denied) => return refuse(ErrorCode::Forbidden, denied.to_string()),
        };
        let msg = match message::parse_chat(payload) {
            Ok(msg) => msg,
            Err(bad) => return refuse(ErrorCode::BadPayload, bad.to_string()),
        };
        if msg.is_signaling() {
            let Some(kind) = signaling::Kind::parse(&msg.kind) else {
                return refuse(
                    ErrorCode::BadPayload,
                    format!("unknown signaling type {}", msg.kind),
                );
            };
            let relayed = signaling::call_id(&msg).and_then(|id| {
                let call = self
                    .store
                    .calls
                    .get(id)
                    .map_err(|e| (ErrorCode::CallNotFound, e.to_string()))?;
                signaling::relay(who, cid, kind, &msg, call, &self.offers)
            });
            return match relayed {
                Ok(copies) => PublishOutcome::Deliver(copies),
                Err((code, detail)) => refuse(code, detail),
            };
        }
        PublishOutcome::Deliver(vec![(acl::chat_topic(cid), message::stamp(msg, who))])
    }
}
