//! Policy between clients and the router: identity, topic ACL, payload validation and sender
//! stamping. Sessions ask the [`Bridge`] about every CONNECT, SUBSCRIBE filter and PUBLISH; the
//! hub applies [`acl::may_receive`] to every delivery. The decisions themselves are plain
//! functions in [`acl`], [`message`] and [`signaling`].

pub mod acl;
pub mod message;
mod scan;
pub mod signaling;

use crate::auth::{AuthError, Authenticator, Identity};
use crate::bus::Message;
use crate::calls::Calls;
use crate::model::topic::chat_topic;
use crate::store::Store;
use message::{ErrorCode, ErrorRef};

/// What to do with a client's PUBLISH.
#[derive(Debug)]
pub enum PublishOutcome {
    /// Publish these messages on the bus, in order.
    Deliver(Vec<Message>),
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
    calls: Calls,
}

impl Bridge {
    pub fn new(auth: Authenticator, store: Store, calls: Calls) -> Self {
        Self { auth, store, calls }
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
            Some(u) if u == identity.user_id() => Ok(identity),
            Some(_) => Err(ConnectRefused::UsernameMismatch),
        }
    }

    fn is_member<'a>(&'a self, who: &'a Identity) -> impl Fn(&str) -> bool + 'a {
        move |cid| self.store.conversations.is_member(cid, who.user_id())
    }

    /// Decides one SUBSCRIBE filter.
    pub fn may_subscribe(&self, who: &Identity, filter: &str) -> Result<(), acl::Denied> {
        acl::authorize_subscribe(who, filter, self.is_member(who))
    }

    /// Decides a CONNECT's Last Will: it must be a publish the client could make itself (chat
    /// of a conversation it is a member of, a valid payload, no call signaling) and not
    /// retained. Its publishing, when the connection drops, goes through [`Bridge::on_publish`]
    /// and is stamped then.
    pub fn check_will(
        &self,
        who: &Identity,
        topic: &str,
        payload: &[u8],
        retain: bool,
    ) -> Result<(), String> {
        if retain {
            return Err("retained wills are not supported".into());
        }
        acl::authorize_publish(who, topic, self.is_member(who)).map_err(|e| e.to_string())?;
        let msg = message::parse_chat(payload).map_err(|e| e.to_string())?;
        if msg.is_signaling() {
            return Err("a will cannot be call signaling".into());
        }
        Ok(())
    }

    /// Decides a PUBLISH from `who`'s device `device` (its MQTT client id) and turns it into
    /// what the bus should carry.
    pub fn on_publish(
        &self,
        who: &Identity,
        device: &str,
        topic: &str,
        payload: &[u8],
    ) -> PublishOutcome {
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
                let sender = signaling::Sender { who, device };
                let copies = self
                    .calls
                    .with_call(id, |call, offered_by| {
                        signaling::relay(&sender, cid, kind, &msg, call, offered_by)
                    })
                    .map_err(|e| (ErrorCode::CallNotFound, e.to_string()))??;
                if kind == signaling::Kind::Offer {
                    self.calls.record_offer(id, who.user_id());
                }
                Ok(copies)
            });
            return match relayed {
                Ok(copies) => PublishOutcome::Deliver(copies),
                Err((code, detail)) => refuse(code, detail),
            };
        }
        let stamped = message::stamp(&msg, who);
        PublishOutcome::Deliver(vec![Message::new(chat_topic(cid), stamped)])
    }
}
