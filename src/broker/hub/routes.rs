//! Subscriptions by filter: exact filters in a hash map (every user subscription), wildcard
//! filters (admins only) per session. Matching a topic is one lookup plus the wildcard holders.
//! A bus that routes by interest is told when a filter gains its first holder and loses its
//! last one.
//!
//! Sized for one subscription per connection (a user's notifications topic): the filter's text
//! is kept once, shared by the map from filter to holders and the session's list of what it
//! holds, and both lists keep their first entry inline (a `Vec` allocated room for four).

use smallvec::SmallVec;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::broker::codec::QoS;
use crate::bus::Interest;
use crate::model::topic::{filter_matches, has_wildcard};

/// The sessions holding one exact filter, and their QoS.
type Holders = SmallVec<[(u64, QoS); 1]>;

#[derive(Default)]
pub(super) struct Routes {
    /// Exact filter to the sessions holding it and their QoS.
    exact: HashMap<Arc<str>, Holders>,
    /// Wildcard filters and their QoS, per session.
    wildcard: HashMap<u64, Vec<(String, QoS)>>,
    /// Exact filters per session (the keys of `exact`), for teardown.
    held: HashMap<u64, SmallVec<[Arc<str>; 1]>>,
    /// How many subscriptions of each filter the bus must carry here: all but those fed by
    /// their session's own queue (cluster mode's persistent sessions). Counted only for a bus
    /// that routes by interest (a copy of every filter: 90 bytes a connection otherwise).
    carried: HashMap<String, usize>,
    /// Subscriptions (session, filter) fed by their session's queue.
    fed: HashSet<(u64, String)>,
    interest: Option<Arc<dyn Interest>>,
}

impl Routes {
    /// Reports interest changes to `interest` from now on, starting with every filter held.
    pub(super) fn set_interest(&mut self, interest: Arc<dyn Interest>) {
        let exact = self
            .exact
            .iter()
            .flat_map(|(filter, sids)| sids.iter().map(move |(sid, _)| (*sid, &**filter)));
        let wildcard = (self.wildcard.iter())
            .flat_map(|(sid, filters)| filters.iter().map(move |(f, _)| (*sid, f.as_str())));
        let mut carried: HashMap<String, usize> = HashMap::new();
        for (sid, filter) in exact.chain(wildcard) {
            if !self.fed.contains(&(sid, filter.to_owned())) {
                *carried.entry(filter.to_owned()).or_default() += 1;
            }
        }
        for filter in carried.keys() {
            interest.add(filter);
        }
        self.carried = carried;
        self.interest = Some(interest);
    }

    /// Routes `filter` to `sid` (subscribing again replaces the QoS). With `fed`, the
    /// session's own queue brings it what matches, so the bus need not.
    pub(super) fn subscribe(&mut self, sid: u64, filter: &str, qos: QoS, fed: bool) {
        self.unsubscribe(sid, filter);
        if has_wildcard(filter) {
            self.wildcard
                .entry(sid)
                .or_default()
                .push((filter.to_owned(), qos));
        } else {
            let key = match self.exact.get_key_value(filter) {
                Some((key, _)) => key.clone(),
                None => Arc::from(filter),
            };
            self.held.entry(sid).or_default().push(key.clone());
            self.exact.entry(key).or_default().push((sid, qos));
        }
        if fed {
            self.fed.insert((sid, filter.to_owned()));
            return;
        }
        let Some(interest) = &self.interest else {
            return;
        };
        let carried = self.carried.entry(filter.to_owned()).or_default();
        *carried += 1;
        if *carried == 1 {
            interest.add(filter);
        }
    }

    /// `sid` no longer holds `filter`.
    fn released(&mut self, sid: u64, filter: &str) {
        if self.fed.remove(&(sid, filter.to_owned())) {
            return;
        }
        if let Some(carried) = self.carried.get_mut(filter) {
            *carried -= 1;
            if *carried == 0 {
                self.carried.remove(filter);
                if let Some(interest) = &self.interest {
                    interest.remove(filter);
                }
            }
        }
    }

    /// Drops `sid`'s subscription to exactly `filter`; whether it had one (held ones too).
    pub(super) fn unsubscribe(&mut self, sid: u64, filter: &str) -> bool {
        let mut dropped = false;
        let mut held = false;
        if let Some(filters) = self.wildcard.get_mut(&sid) {
            let before = filters.len();
            filters.retain(|(f, _)| f != filter);
            dropped = filters.len() < before;
            if filters.is_empty() {
                self.wildcard.remove(&sid);
            }
        }
        if let Some(filters) = self.held.get_mut(&sid) {
            let before = filters.len();
            filters.retain(|f| &**f != filter);
            held = filters.len() < before;
            if filters.is_empty() {
                self.held.remove(&sid);
            }
        }
        dropped |= self.drop_exact(sid, filter);
        if dropped {
            self.released(sid, filter);
        }
        dropped || held
    }

    /// Whether `sid` held exactly `filter`.
    fn drop_exact(&mut self, sid: u64, filter: &str) -> bool {
        let Some(sids) = self.exact.get_mut(filter) else {
            return false;
        };
        let before = sids.len();
        sids.retain(|(s, _)| *s != sid);
        let dropped = sids.len() < before;
        if sids.is_empty() {
            self.exact.remove(filter);
        }
        dropped
    }

    pub(super) fn remove_session(&mut self, sid: u64) {
        for (filter, _) in self.wildcard.remove(&sid).unwrap_or_default() {
            self.released(sid, &filter);
        }
        for filter in self.held.remove(&sid).unwrap_or_default() {
            if self.drop_exact(sid, &filter) {
                self.released(sid, &filter);
            }
        }
    }

    /// A session's filters and their QoS.
    pub(super) fn filters_of(&self, sid: u64) -> Vec<(String, QoS)> {
        let mut out: Vec<(String, QoS)> = self.wildcard.get(&sid).cloned().unwrap_or_default();
        for filter in self
            .held
            .get(&sid)
            .map(|held| held.as_slice())
            .unwrap_or(&[])
        {
            let qos = (self.exact.get(filter))
                .and_then(|sids| sids.iter().find(|(s, _)| *s == sid).map(|(_, q)| *q));
            out.push((filter.to_string(), qos.unwrap_or(QoS::AtMostOnce)));
        }
        out
    }

    /// The sessions holding exactly `filter`, with their QoS.
    pub(super) fn holders(&self, filter: &str) -> Vec<(u64, QoS)> {
        if !has_wildcard(filter) {
            return self.exact.get(filter).map_or_else(Vec::new, |h| h.to_vec());
        }
        let holding = self.wildcard.iter().filter_map(|(sid, filters)| {
            let (_, qos) = filters.iter().find(|(f, _)| f == filter)?;
            Some((*sid, *qos))
        });
        holding.collect()
    }

    /// The sessions `topic` reaches, each with the highest QoS of its matching filters.
    pub(super) fn matches(&self, topic: &str) -> Vec<(u64, QoS)> {
        let mut targets = self.exact.get(topic).map_or_else(Vec::new, |h| h.to_vec());
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
        r.subscribe(1, "chat/c1", QoS::AtLeastOnce, false);
        r.subscribe(2, "chat/+", QoS::AtMostOnce, false);
        r.subscribe(2, "#", QoS::AtLeastOnce, false);
        let mut m = r.matches("chat/c1");
        m.sort_by_key(|(s, _)| *s);
        assert_eq!(m, vec![(1, QoS::AtLeastOnce), (2, QoS::AtLeastOnce)]);
        r.unsubscribe(1, "chat/c1");
        assert_eq!(r.matches("chat/c1"), vec![(2, QoS::AtLeastOnce)]);
        r.remove_session(2);
        assert!(r.matches("chat/c1").is_empty());
        assert!(r.exact.is_empty() && r.wildcard.is_empty() && r.held.is_empty());
        assert!(r.carried.is_empty() && r.fed.is_empty());
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
        r.subscribe(1, "chat/c1", QoS::AtLeastOnce, false);
        r.subscribe(5, "users/u5/notifications", QoS::AtLeastOnce, true);
        let recorded = Arc::new(Recorded::default());
        r.set_interest(recorded.clone());
        // Held before the bus asked: counted then (a queue-fed one is not).
        assert_eq!(r.carried.get("chat/c1"), Some(&1));
        assert!(!r.carried.contains_key("users/u5/notifications"));
        r.subscribe(2, "chat/c1", QoS::AtMostOnce, false);
        r.subscribe(2, "#", QoS::AtLeastOnce, false);
        r.subscribe(3, "#", QoS::AtLeastOnce, false);
        // Fed by its own queue: routed here, but asks nothing of the bus.
        r.subscribe(4, "users/u4/notifications", QoS::AtLeastOnce, true);
        assert_eq!(r.holders("users/u4/notifications").len(), 1);
        assert_eq!(r.holders("chat/c1").len(), 2);
        assert_eq!(r.holders("#").len(), 2);
        r.unsubscribe(1, "chat/c1");
        r.remove_session(2);
        r.unsubscribe(3, "#");
        r.remove_session(3);
        r.remove_session(4);
        r.remove_session(5);
        let log = crate::sync::lock(&recorded.0).clone();
        assert_eq!(log, ["+chat/c1", "+#", "-chat/c1", "-#"]);
        assert!(r.carried.is_empty() && r.fed.is_empty());
    }
}
