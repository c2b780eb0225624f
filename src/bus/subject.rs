//! MQTT topics and filters as NATS subjects. A topic's levels become the subject's tokens under
//! a prefix; a byte NATS gives meaning to (`.`, `*`, `>`, whitespace, `%` itself and anything
//! outside `[A-Za-z0-9_-]`) is written `%XX`, and an empty level `%`, so every topic has exactly
//! one subject and no topic level can become a NATS wildcard. `+` becomes `*`; `#` becomes `>`
//! plus the parent itself (MQTT's `a/#` also matches `a`).

/// The subject of `topic` under `prefix`.
pub(crate) fn topic_subject(prefix: &str, topic: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + topic.len() + 8);
    out.push_str(prefix);
    for level in topic.split('/') {
        out.push('.');
        push_level(&mut out, level);
    }
    out
}

/// The subjects that together receive what `filter` matches (one, or two for a trailing `#`).
pub(crate) fn filter_subjects(prefix: &str, filter: &str) -> Vec<String> {
    let mut subject = String::from(prefix);
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level == "#" && levels.peek().is_none() {
            let all = format!("{subject}.>");
            // `#` alone matches every topic, which always has at least one level.
            return if subject == prefix {
                vec![all]
            } else {
                vec![subject, all]
            };
        }
        subject.push('.');
        if level == "+" {
            subject.push('*');
        } else {
            push_level(&mut subject, level);
        }
    }
    vec![subject]
}

/// The topic a subject under `prefix` stands for, if it is one of ours.
pub(crate) fn subject_topic(prefix: &str, subject: &str) -> Option<String> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let mut topic = Vec::with_capacity(rest.len());
    for (i, token) in rest.split('.').enumerate() {
        if i > 0 {
            topic.push(b'/');
        }
        if token == "%" {
            continue;
        }
        let bytes = token.as_bytes();
        let mut pos = 0;
        while pos < bytes.len() {
            if bytes[pos] == b'%' {
                let hex = std::str::from_utf8(bytes.get(pos + 1..pos + 3)?).ok()?;
                topic.push(u8::from_str_radix(hex, 16).ok()?);
                pos += 3;
            } else {
                topic.push(bytes[pos]);
                pos += 1;
            }
        }
    }
    String::from_utf8(topic).ok()
}

fn push_level(out: &mut String, level: &str) {
    if level.is_empty() {
        out.push('%');
        return;
    }
    for byte in level.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip_and_never_become_wildcards() {
        for topic in [
            "users/alice/notifications",
            "chat/c-1",
            "$SYS/broker/uptime",
            "a.b/*/>/ /%/é",
            "/leading//empty/",
        ] {
            let subject = topic_subject("cb", topic);
            assert!(subject.starts_with("cb."), "{subject}");
            let tokens: Vec<&str> = subject.split('.').collect();
            assert_eq!(tokens.len(), topic.split('/').count() + 1, "{subject}");
            assert!(tokens
                .iter()
                .all(|t| !t.is_empty() && *t != "*" && *t != ">"));
            assert!(!subject.contains(char::is_whitespace));
            assert_eq!(subject_topic("cb", &subject).as_deref(), Some(topic));
        }
        assert_eq!(
            topic_subject("cb", "users/alice/notifications"),
            "cb.users.alice.notifications"
        );
    }

    #[test]
    fn filters_become_nats_wildcards() {
        assert_eq!(filter_subjects("cb", "chat/c1"), ["cb.chat.c1"]);
        assert_eq!(
            filter_subjects("cb", "users/+/notifications"),
            ["cb.users.*.notifications"]
        );
        assert_eq!(
            filter_subjects("cb", "$SYS/#"),
            ["cb.%24SYS", "cb.%24SYS.>"]
        );
        assert_eq!(filter_subjects("cb", "#"), ["cb.>"]);
        assert_eq!(filter_subjects("cb", "+/#"), ["cb.*", "cb.*.>"]);
    }

    #[test]
    fn foreign_subjects_are_not_topics() {
        assert_eq!(subject_topic("cb", "other.chat.c1"), None);
        assert_eq!(subject_topic("cb", "cb.chat.%Z1"), None);
        assert_eq!(subject_topic("cb", "cb.chat.%4"), None);
    }
}
