//! The topics callbus carries and MQTT filter matching: what the ACL, the hub and the services
//! all need to name and recognise a topic.

use crate::ids::is_valid_id;

/// A topic name or filter, classified by the ACL's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind<'a> {
    /// `users/{uid}/notifications`
    Notifications(&'a str),
    /// `chat/{cid}`
    Chat(&'a str),
    /// Anything else, including `$SYS/...` and wildcard filters.
    Other,
}

/// Classifies a concrete topic or an exact filter.
pub fn classify(topic: &str) -> TopicKind<'_> {
    let mut levels = topic.split('/');
    match (levels.next(), levels.next(), levels.next(), levels.next()) {
        (Some("users"), Some(uid), Some("notifications"), None) if is_valid_id(uid) => {
            TopicKind::Notifications(uid)
        }
        (Some("chat"), Some(cid), None, None) if is_valid_id(cid) => TopicKind::Chat(cid),
        _ => TopicKind::Other,
    }
}

/// The notifications topic of a user.
pub fn notifications_topic(uid: &str) -> String {
    format!("users/{uid}/notifications")
}

/// The chat topic of a conversation.
pub fn chat_topic(cid: &str) -> String {
    format!("chat/{cid}")
}

/// Whether `filter` is a syntactically valid MQTT filter callbus is willing to route.
/// Shared subscriptions (`$share/...`) are refused outright: they would let a subscriber divert
/// messages away from the others in its group, which no callbus client needs.
pub fn is_valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') || filter.starts_with("$share/") {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| {
        if level.contains('#') {
            *level == "#" && i == last
        } else {
            !level.contains('+') || *level == "+"
        }
    })
}

/// Whether a filter contains a wildcard.
pub fn has_wildcard(filter: &str) -> bool {
    filter.contains('+') || filter.contains('#')
}

/// MQTT topic matching (`+` one level, `#` the rest); `$`-topics only match filters that start
/// with a `$` level themselves.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && !filter.starts_with('$') {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching() {
        assert!(filter_matches("#", "chat/1"));
        assert!(filter_matches("chat/+", "chat/1"));
        assert!(!filter_matches("chat/+", "chat/1/x"));
        assert!(filter_matches(
            "users/+/notifications",
            "users/a/notifications"
        ));
        assert!(!filter_matches("#", "$SYS/uptime"));
        assert!(filter_matches("$SYS/#", "$SYS/uptime"));
        assert!(filter_matches("chat/1", "chat/1"));
        assert!(!filter_matches("chat/1", "chat/2"));
    }

    #[test]
    fn classify_rejects_bad_ids() {
        assert_eq!(classify("chat/a.b"), TopicKind::Other);
        assert_eq!(classify("users//notifications"), TopicKind::Other);
        assert_eq!(
            classify("users/7/notifications"),
            TopicKind::Notifications("7")
        );
    }
}
