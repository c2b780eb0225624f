//! Topic ACL (DESIGN "Topics and ACL") as plain functions: the gateway asks, these answer.
//!
//! | topic                       | subscribe                          | publish                   |
//! |-----------------------------|------------------------------------|---------------------------|
//! | `users/{uid}/notifications` | user `uid` (exact filter); admin   | callbus only              |
//! | `chat/{cid}`                | members of `cid`; admin            | members of `cid`          |
//! | `$SYS/#`                    | admin                              | nobody                    |
//! | anything else, wildcards    | admin                              | nobody                    |

use crate::auth::{Identity, Role};
use crate::model::topic::{classify, has_wildcard, is_valid_filter, TopicKind};

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("not allowed to subscribe to this filter")]
    Subscribe,
    #[error("not a member of this conversation")]
    NotMember,
    #[error("only callbus publishes to this topic")]
    ReadOnlyTopic,
    #[error("admin tokens are read-only")]
    ReadOnlyRole,
    #[error("malformed topic or filter")]
    Malformed,
}

/// Decides a SUBSCRIBE filter. `is_member(cid)` answers membership from the store.
pub fn authorize_subscribe(
    who: &Identity,
    filter: &str,
    is_member: impl FnOnce(&str) -> bool,
) -> Result<(), Denied> {
    if !is_valid_filter(filter) {
        return Err(Denied::Malformed);
    }
    if who.role == Role::Admin {
        return Ok(());
    }
    if has_wildcard(filter) {
        return Err(Denied::Subscribe);
    }
    match classify(filter) {
        TopicKind::Notifications(uid) if uid == who.user_id() => Ok(()),
        TopicKind::Chat(cid) if is_member(cid) => Ok(()),
        TopicKind::Chat(_) => Err(Denied::NotMember),
        _ => Err(Denied::Subscribe),
    }
}

/// Decides a PUBLISH. On success returns the conversation id: clients publish only to chat.
pub fn authorize_publish<'t>(
    who: &Identity,
    topic: &'t str,
    is_member: impl FnOnce(&str) -> bool,
) -> Result<&'t str, Denied> {
    if topic.is_empty() || has_wildcard(topic) || topic.contains('\0') {
        return Err(Denied::Malformed);
    }
    if who.role == Role::Admin {
        return Err(Denied::ReadOnlyRole);
    }
    match classify(topic) {
        TopicKind::Chat(cid) if is_member(cid) => Ok(cid),
        TopicKind::Chat(_) => Err(Denied::NotMember),
        _ => Err(Denied::ReadOnlyTopic),
    }
}

/// Whether a delivered topic still passes the subscriber's ACL. Run on every delivery so that a
/// membership change takes effect at once, existing subscriptions included.
pub fn may_receive(who: &Identity, topic: &str, is_member: impl FnOnce(&str) -> bool) -> bool {
    if who.role == Role::Admin {
        return true;
    }
    match classify(topic) {
        TopicKind::Notifications(uid) => uid == who.user_id(),
        TopicKind::Chat(cid) => is_member(cid),
        TopicKind::Other => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(uid: &str, role: Role) -> Identity {
        Identity::new(uid, uid, "", "", role)
    }
    fn member(cid: &str) -> bool {
        cid == "c1"
    }

    #[test]
    fn own_notifications_only() {
        let alice = who("alice", Role::User);
        assert_eq!(
            authorize_subscribe(&alice, "users/alice/notifications", member),
            Ok(())
        );
        assert_eq!(
            authorize_subscribe(&alice, "users/bob/notifications", member),
            Err(Denied::Subscribe)
        );
    }

    #[test]
    fn chat_members_only() {
        let alice = who("alice", Role::User);
        assert_eq!(authorize_subscribe(&alice, "chat/c1", member), Ok(()));
        assert_eq!(
            authorize_subscribe(&alice, "chat/c2", member),
            Err(Denied::NotMember)
        );
        assert_eq!(authorize_publish(&alice, "chat/c1", member), Ok("c1"));
        assert_eq!(
            authorize_publish(&alice, "chat/c2", member),
            Err(Denied::NotMember)
        );
    }

    #[test]
    fn wildcards_and_other_topics() {
        let alice = who("alice", Role::User);
        for f in [
            "#",
            "users/+/notifications",
            "chat/#",
            "$SYS/#",
            "other",
            "chat/c1/x",
        ] {
            assert!(authorize_subscribe(&alice, f, member).is_err(), "{f}");
        }
        let admin = who("ops", Role::Admin);
        for f in ["#", "users/+/notifications", "chat/#", "$SYS/#", "other"] {
            assert_eq!(authorize_subscribe(&admin, f, member), Ok(()), "{f}");
        }
        assert_eq!(
            authorize_subscribe(&admin, "$share/g/#", member),
            Err(Denied::Malformed)
        );
        assert_eq!(
            authorize_subscribe(&admin, "a/#/b", member),
            Err(Denied::Malformed)
        );
        assert_eq!(
            authorize_subscribe(&admin, "a/b+", member),
            Err(Denied::Malformed)
        );
    }

    #[test]
    fn nobody_publishes_to_notifications_sys_or_other() {
        let alice = who("alice", Role::User);
        let service = who("app", Role::Service);
        for t in [
            "users/alice/notifications",
            "users/bob/notifications",
            "$SYS/x",
            "other",
        ] {
            assert_eq!(
                authorize_publish(&alice, t, member),
                Err(Denied::ReadOnlyTopic),
                "{t}"
            );
            assert_eq!(
                authorize_publish(&service, t, member),
                Err(Denied::ReadOnlyTopic)
            );
        }
        assert_eq!(
            authorize_publish(&alice, "chat/+", member),
            Err(Denied::Malformed)
        );
    }

    #[test]
    fn admin_is_read_only() {
        let admin = who("ops", Role::Admin);
        assert_eq!(
            authorize_publish(&admin, "chat/c1", member),
            Err(Denied::ReadOnlyRole)
        );
        assert!(may_receive(&admin, "chat/c9", member));
    }

    #[test]
    fn delivery_rechecks_membership() {
        let alice = who("alice", Role::User);
        assert!(may_receive(&alice, "chat/c1", member));
        assert!(!may_receive(&alice, "chat/c2", member));
        assert!(may_receive(&alice, "users/alice/notifications", member));
        assert!(!may_receive(&alice, "users/bob/notifications", member));
    }
}
