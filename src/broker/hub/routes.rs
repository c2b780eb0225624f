//! Subscriptions by filter: exact filters in a hash map (every user subscription), wildcard
//! filters (admins only) per session. Matching a topic is one lookup plus the wildcard holders.
//! A bus that routes by interest is told when a filter gains its first holder and loses its
//! last one.

use std::collections::HashMap;
use std::sync::Arc;

use crate::broker::codec::QoS;
use crate::bus::Interest;
use crate::model::topic::{filter_matches, has_wildcard};

#[derive(Default)]
pub(super) struct Routes {
    /// Exact filter to the sessions holding it and their QoS.
    exact: HashMap<String, Vec<(u64, QoS)>>,
    /// Wildcard filters and their QoS, per session.
    wildcard: HashMap<u64, Vec<(String, QoS)>>,
    /// How many sessions hold each wildcard filter.
    wildcard_holders: HashMap<String, usize>,
    /// Exact filters per session, for teardown.
    held: HashMap<u64, Vec<String>>,
    interest: Option<Arc<dyn Interest>>,
}

impl Routes {
    /// Reports interest changes to `interest` from now on, starting with every filter held.
    pub(super) fn set_interest(&mut self, interest: Arc<dyn Interest>) {
        for filter in self.exact.keys().chain(self.wildcard_holders.keys()) {
            interest.add(filter);
        }
        self.interest = Some(interest);
    }

    /// Routes `filter` to `sid` (subscribing again replaces the QoS).
    pub(super) fn subscribe(&mut self, sid: u64, filter: &str, qos: QoS) {
        self.unsubscribe(sid, filter);
        if has_wildcard(filter) {
            self.wildcard
                .entry(sid)
                .or_default()
                .push((filter.to_owned(), qos));
            let holders = self.wildcard_holders.entry(filter.to_owned()).or_default();
            *holders += 1;
            if *holders == 1 {
                self.interest_changed(filter, true);
            }
        } else {
            self.held.entry(sid).or_default().push(filter.to_owned());
            let sids = self.exact.entry(filter.to_owned()).or_default();
            sids.push((sid, qos));
            if sids.len() == 1 {
                self.interest_changed(filter, true);
            }
        }
    }

    fn interest_changed(&self, filter: &str, held: bool) {
        match &self.interest {
            Some(interest) if held => interest.add(filter),
            Some(interest) => interest.remove(filter),
            None => {}
        }
    }

    fn drop_wildcard(&mut self, filter: &str) {
        if let Some(holders) = self.wildcard_holders.get_mut(filter) {
            *holders -= 1;
            if *holders == 0 {
                self.wildcard_holders.remove(filter);
                self.interest_changed(filter, false);
            }
        }
    }

    pub(super) fn unsubscribe(&mut self, sid: u64, filter: &str) {
        if let Some(filters) = self.wildcard.get_mut(&sid) {
            let before = filters.len();
            filters.retain(|(f, _)| f != filter);
            let dropped = filters.len() < before;
            if filters.is_empty() {
                self.wildcard.remove(&sid);
            }
            if dropped {
                self.drop_wildcard(filter);
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
                self.interest_changed(filter, false);
            }
        }
    }

    pub(super) fn remove_session(&mut self, sid: u64) {
        for (filter, _) in self.wildcard.remove(&sid).unwrap_or_default() {
            self.drop_wildcard(&filter);
        }
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

    /// The sessions holding exactly `filter`, with their QoS.
    pub(super) fn holders(&self, filter: &str) -> Vec<(u64, QoS)> {
        if !has_wildcard(filter) {
            return self.exact.get(filter).cloned().unwrap_or_default();
        }
        let holding = self.wildcard.iter().filter_map(|(sid, filters)| {
            let (_, qos) = filters.iter().find(|(f, _)| f == filter)?;
            Some((*sid, *qos))
        });
        holding.collect()
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

    #[derive(Default)]
    struct Recorded(std::sync::Mutex<Vec<String>>);

    impl Interest for Recorded {
        fn add(&self, filter: &str) {
            crate::sync::lock(&self.0).push(format!("+{filter}"));
        }
        fn remove(&self, filter: &str) {
            crate::sync::lock(&self.0).push(format!("-{filter}"));
        }
    }

    #[test]
    fn interest_follows_the_first_and_last_holder() {
        let mut r = Routes::default();
        r.subscribe(1, "chat/c1", QoS::AtLeastOnce);
        let recorded = Arc::new(Recorded::default());
        r.set_interest(recorded.clone());
        r.subscribe(2, "chat/c1", QoS::AtMostOnce);
        r.subscribe(2, "#", QoS::AtLeastOnce);
        r.subscribe(3, "#", QoS::AtLeastOnce);
        assert_eq!(r.holders("chat/c1").len(), 2);
        assert_eq!(r.holders("#").len(), 2);
        r.unsubscribe(1, "chat/c1");
        r.remove_session(2);
        r.unsubscribe(3, "#");
        r.remove_session(3);
        let log = crate::sync::lock(&recorded.0).clone();
        assert_eq!(log, ["+chat/c1", "+#", "-chat/c1", "-#"]);
    }
}
