//! Subscriptions by filter: exact filters in a hash map (every user subscription), wildcard
//! filters (admins only) per session. Matching a topic is one lookup plus the wildcard holders.

use std::collections::HashMap;

use crate::broker::codec::QoS;
use crate::model::topic::{filter_matches, has_wildcard};

#[derive(Default)]
pub(super) struct Routes {
    /// Exact filter to the sessions holding it and their QoS.
    exact: HashMap<String, Vec<(u64, QoS)>>,
    /// Wildcard filters and their QoS, per session.
    wildcard: HashMap<u64, Vec<(String, QoS)>>,
    /// Exact filters per session, for teardown.
    held: HashMap<u64, Vec<String>>,
}

impl Routes {
    /// Routes `filter` to `sid` (subscribing again replaces the QoS).
    pub(super) fn subscribe(&mut self, sid: u64, filter: &str, qos: QoS) {
        self.unsubscribe(sid, filter);
        if has_wildcard(filter) {
            self.wildcard
                .entry(sid)
                .or_default()
                .push((filter.to_owned(), qos));
        } else {
            self.held.entry(sid).or_default().push(filter.to_owned());
            self.exact
                .entry(filter.to_owned())
                .or_default()
                .push((sid, qos));
        }
    }

    pub(super) fn unsubscribe(&mut self, sid: u64, filter: &str) {
        if let Some(filters) = self.wildcard.get_mut(&sid) {
            filters.retain(|(f, _)| f != filter);
            if filters.is_empty() {
                self.wildcard.remove(&sid);
            }
        }
        if let Some(filters) = self.held.get_mut(&sid) {
            filters.retain(|f| f != filter);
            if filters.is_empty() {
                self.held.remove(&sid);
            }
        }
        self.drop_exact(sid, filter);
    }

    fn drop_exact(&mut self, sid: u64, filter: &str) {
        if let Some(sids) = self.exact.get_mut(filter) {
            sids.retain(|(s, _)| *s != sid);
            if sids.is_empty() {
                self.exact.remove(filter);
            }
        }
    }

    pub(super) fn remove_session(&mut self, sid: u64) {
        self.wildcard.remove(&sid);
        for filter in self.held.remove(&sid).unwrap_or_default() {
            self.drop_exact(sid, &filter);
        }
    }

    /// A session's filters and their QoS.
    pub(super) fn filters_of(&self, sid: u64) -> Vec<(String, QoS)> {
        let mut out: Vec<(String, QoS)> = self.wildcard.get(&sid).cloned().unwrap_or_default();
        for filter in self.held.get(&sid).map(Vec::as_slice).unwrap_or(&[]) {
            let qos = self
                .exact
                .get(filter)
                .and_then(|sids| sids.iter().find(|(s, _)| *s == sid).map(|(_, q)| *q));
            out.push((filter.clone(), qos.unwrap_or(QoS::AtMostOnce)));
        }
        out
    }

    /// The sessions `topic` reaches, each with the highest QoS of its matching filters.
    pub(super) fn matches(&self, topic: &str) -> Vec<(u64, QoS)> {
        let mut targets = self.exact.get(topic).cloned().unwrap_or_default();
        for (sid, filters) in &self.wildcard {
            let qos = filters
                .iter()
                .filter(|(f, _)| filter_matches(f, topic))
                .map(|(_, q)| *q)
                .max_by_key(|q| *q as u8);
            let Some(qos) = qos else { continue };
            match targets.iter_mut().find(|(s, _)| s == sid) {
                Some((_, q)) if (*q as u8) < (qos as u8) => *q = qos,
                Some(_) => {}
                None => targets.push((*sid, qos)),
            }
        }
        targets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_wildcard_routes() {
        let mut r = Routes::default();
        r.subscribe(1, "chat/c1", QoS::AtLeastOnce);
        r.subscribe(2, "chat/+", QoS::AtMostOnce);
        r.subscribe(2, "#", QoS::AtLeastOnce);
        let mut m = r.matches("chat/c1");
        m.sort_by_key(|(s, _)| *s);
        assert_eq!(m, vec![(1, QoS::AtLeastOnce), (2, QoS::AtLeastOnce)]);
        r.unsubscribe(1, "chat/c1");
        assert_eq!(r.matches("chat/c1"), vec![(2, QoS::AtLeastOnce)]);
        r.remove_session(2);
        assert!(r.matches("chat/c1").is_empty());
        assert!(r.exact.is_empty() && r.wildcard.is_empty() && r.held.is_empty());
    }
}
