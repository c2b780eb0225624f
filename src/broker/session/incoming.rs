//! What a session does with a client's PUBLISH and SUBSCRIBE, and its Last Will: the bridge's
//! checks, then the bus (publishes) or the hub (subscriptions).

use tracing::{debug, info, warn};

use super::{End, Session};
use crate::auth::Identity;
use crate::bridge::acl::Denied;
use crate::bridge::message::{error_event, ErrorCode, ErrorRef};
use crate::bridge::PublishOutcome;
use crate::broker::codec::Version;
use crate::broker::codec::{Packet, Publish, QoS, SubAck, SubscribeReasonCode};
use crate::broker::connect::Will;
use crate::broker::v5;
use crate::broker::Gateway;
use crate::bus::{Kept, Message};
use crate::metrics;
use crate::model::topic::{has_wildcard, notifications_topic};

/// Publishes the Last Will of `who` (on `device`), checked and stamped like any publish.
pub(super) async fn publish_will(gateway: &Gateway, who: &Identity, device: &str, will: &Will) {
    let inner = &gateway.inner;
    match inner
        .bridge
        .on_publish(who, device, &will.topic, &will.payload)
    {
        PublishOutcome::Deliver(messages) => {
            let expires_at_ms = (will.expiry_secs)
                .map(|secs| crate::model::call::now_ms() + u64::from(secs) * 1000);
            for message in messages {
                let message = message.expiring(expires_at_ms);
                let message = message.with_extras(will.extras.clone());
                if let Err(e) = inner.publisher.publish(message).await {
                    warn!(error = %e, "could not publish the Last Will");
                }
            }
        }
        PublishOutcome::Refuse { detail, .. } => {
            info!(%detail, "Last Will no longer allowed; not published");
        }
    }
}

impl Session {
    /// A client's PUBLISH; `extra` has what MQTT 5 said beside it (its expiry and the
    /// properties that go on to v5 subscribers).
    pub(super) async fn on_publish(
        &mut self,
        publish: Publish,
        extra: v5::Extra,
    ) -> Result<(), End> {
        let expires_at_ms = (extra.message_expiry)
            .map(|secs| crate::model::call::now_ms() + u64::from(secs) * 1000);
        // A No Local subscriber of this connection must not get its own messages back.
        let extras = match (extra.properties, self.no_local) {
            (properties, false) => properties,
            (properties, true) => {
                let mut extras = properties.map_or_else(Default::default, |p| (*p).clone());
                extras.origin = Some((*self.client_id).into());
                Some(std::sync::Arc::new(extras))
            }
        };
        let inner = &self.gateway.inner;
        let outcome = if publish.retain {
            PublishOutcome::Refuse {
                code: ErrorCode::Unsupported,
                detail: "retained messages are not supported".into(),
                about: crate::bridge::message::describe(&publish.payload, &publish.topic),
            }
        } else {
            let device = self.device();
            inner
                .bridge
                .on_publish(&self.identity, device, &publish.topic, &publish.payload)
        };
        match outcome {
            PublishOutcome::Deliver(messages) => {
                metrics::PUBLISHES_RELAYED.inc();
                let kept = self
                    .relay(messages, publish.qos, expires_at_ms, extras)
                    .await?;
                let (qos, pkid) = (publish.qos, publish.pkid);
                self.acknowledge_after(kept, |session| session.acknowledge(qos, pkid));
                Ok(())
            }
            PublishOutcome::Refuse {
                code,
                detail,
                about,
            } => {
                if tracing::enabled!(tracing::Level::DEBUG) {
                    self.span().in_scope(|| {
                        debug!(topic = %publish.topic, code = code.as_str(), %detail, "publish refused")
                    });
                }
                metrics::PUBLISHES_REFUSED.inc();
                self.violations += 1;
                if self.version == Version::V5 && publish.qos == QoS::AtLeastOnce {
                    // MQTT 5 says no in the PUBACK itself.
                    let refused = match code {
                        ErrorCode::Forbidden => v5::PublishRefused::NotAuthorized,
                        ErrorCode::BadPayload => v5::PublishRefused::PayloadInvalid,
                        _ => v5::PublishRefused::Rule,
                    };
                    let reason = format!("{}: {detail}", code.as_str());
                    let pkid = publish.pkid;
                    let answer = v5::Answer::PubAck {
                        pkid,
                        refused,
                        reason,
                    };
                    self.acknowledge_after(None, |session| session.answer(answer));
                } else {
                    // v3.1.1 (and a v5 QoS 0 publish) has no negative acknowledgement: the
                    // refusal is an `error` event on the sender's own notifications topic.
                    self.report(code, &detail, &about).await;
                    let (qos, pkid) = (publish.qos, publish.pkid);
                    self.acknowledge_after(None, |session| session.acknowledge(qos, pkid));
                }
                if self.violations >= self.gateway.limits().violation_limit {
                    return Err(End::Violations);
                }
                Ok(())
            }
        }
    }

    /// Hands a PUBLISH's messages to the bus. In cluster mode a QoS 1 PUBLISH is acknowledged
    /// only once the bus stored them (for persistent sessions on any node, whatever NATS
    /// server is lost): what that waits for. Receivers get them as they are sent.
    ///
    /// Such messages are sent when the session polls what it returns, which it does oldest
    /// first: one is sent only once everything this connection published before it is stored.
    /// Sent side by side, a first attempt lost to a NATS server that stopped (and sent again a
    /// second later) would be stored after newer ones, against the order the client sent them
    /// in (MQTT-4.6.0-6); one at a time, a stored message costs one round trip to the stream.
    async fn relay(
        &self,
        messages: Vec<Message>,
        qos: QoS,
        expires_at_ms: Option<u64>,
        extras: Option<std::sync::Arc<crate::bus::Extras>>,
    ) -> Result<Option<Kept>, End> {
        let publisher = &self.gateway.inner.publisher;
        let keep = qos == QoS::AtLeastOnce && publisher.keeps_relays();
        let mut kept: Option<Kept> = None;
        for message in messages {
            let message = message.expiring(expires_at_ms).with_extras(extras.clone());
            if !keep {
                publisher.publish(message).await.map_err(|_| End::Bus)?;
                continue;
            }
            let publisher = publisher.clone();
            let stored: Kept =
                Box::pin(async move { publisher.publish_kept(message).await?.await });
            kept = Some(match kept.take() {
                None => stored,
                Some(earlier) => Box::pin(async move { earlier.await.and(stored.await) }),
            });
        }
        Ok(kept)
    }

    /// Sends an `error` event to this client's own notifications topic.
    async fn report(&self, code: ErrorCode, detail: &str, about: &ErrorRef) {
        let topic = notifications_topic(self.identity.user_id());
        let event = Message::new(topic, error_event(code, detail, about));
        if let Err(e) = self.gateway.inner.publisher.publish(event).await {
            self.span()
                .in_scope(|| warn!(error = %e, "could not publish an error event"));
        }
    }

    /// A persistent session's SUBACK is sent once its subscriptions are on disk, so they
    /// survive a restart, and once the bus carries them.
    /// A SUBSCRIBE; `no_local` names its MQTT 5 filters with No Local.
    pub(super) async fn on_subscribe(
        &mut self,
        subscribe: rumqttc::mqttbytes::v4::Subscribe,
        no_local: &[String],
    ) {
        let inner = &self.gateway.inner;
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let max = self.gateway.limits().max_subscriptions;
        for filter in subscribe.filters {
            let allowed = inner.bridge.may_subscribe(&self.identity, &filter.path);
            if !inner.hub.has_room(self.registration.id, &filter.path, max) {
                info!(filter = %filter.path, max, "subscription limit reached");
                metrics::SUBSCRIPTIONS_OVER_LIMIT.inc();
                codes.push(v5::Granted::Quota);
            } else if let Err(denied) = allowed {
                debug!(filter = %filter.path, %denied, "subscription refused");
                metrics::SUBSCRIPTIONS_REFUSED.inc();
                let path = filter.path.as_str();
                codes.push(match denied {
                    _ if path.starts_with("$share/") => v5::Granted::NoSharedSubscriptions,
                    Denied::Malformed => v5::Granted::FilterInvalid,
                    _ if has_wildcard(path) => v5::Granted::NoWildcards,
                    _ => v5::Granted::NotAuthorized,
                });
            } else {
                // callbus delivers at most QoS 1.
                let qos = match filter.qos {
                    QoS::AtMostOnce => QoS::AtMostOnce,
                    _ => QoS::AtLeastOnce,
                };
                // Routed from now on: anything the bus delivers after this SUBACK arrives.
                let local = !no_local.contains(&filter.path);
                inner
                    .hub
                    .subscribe(self.registration.id, &filter.path, qos, local);
                self.no_local |= !local;
                codes.push(v5::Granted::Yes(qos));
            }
        }
        if self.persistent {
            if let Err(e) = inner.hub.persist(self.registration.id).await {
                warn!(error = %e, "subscriptions not made durable");
            }
        }
        // A bus that routes by interest (cluster mode) has the new filters in effect first.
        inner.publisher.settled().await;
        let pkid = subscribe.pkid;
        match self.version {
            Version::V4 => {
                let codes = codes.into_iter().map(|granted| match granted {
                    v5::Granted::Yes(qos) => SubscribeReasonCode::Success(qos),
                    _ => SubscribeReasonCode::Failure,
                });
                self.send(Packet::SubAck(SubAck::new(pkid, codes.collect())));
            }
            Version::V5 => self.answer(v5::Answer::SubAck {
                pkid,
                granted: codes,
            }),
        }
    }
}
