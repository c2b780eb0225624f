//! Policy between clients and the router: identity, topic ACL, payload validation and sender
//! stamping. The gateway asks the [`Bridge`] about every CONNECT, SUBSCRIBE filter, PUBLISH and
//! delivery; the decisions themselves are plain functions in [`acl`] and [`message`].

pub mod acl;
pub mod message;

use crate::auth::{AuthError, Authenticator, Identity};
use crate::store::Store;
use message::{ErrorCode, ErrorRef};

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
}

impl Bridge {
    pub fn new(auth: Authenticator, store: Store) -> Self {
        Self { auth, store }
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

    /// Whether a message on `topic` may still be delivered to `who` (membership can change).
    pub fn may_receive(&self, who: &Identity, topic: &str) -> bool {
        acl::may_receive(who, topic, self.is_member(who))
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
            // Call signaling must name a call this sender is a party to; until the call bridge
            // knows the call, nothing is relayed.
            return refuse(
                ErrorCode::CallNotFound,
                "no such call in this conversation".into(),
            );
        }
        PublishOutcome::Deliver(vec![(acl::chat_topic(cid), message::stamp(msg, who))])
    }
}
