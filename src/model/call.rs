//! The call record and its state machine (DESIGN "Call state machine"), as pure functions:
//! `ringing → active → ended`; `ringing → rejected | cancelled | missed`. Terminal states never
//! change. Durations come from the server's own accept and end times.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Voice or video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallType {
    Voice,
    Video,
}

impl CallType {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "voice" => Some(CallType::Voice),
            "video" => Some(CallType::Video),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CallType::Voice => "voice",
            CallType::Video => "video",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ringing,
    Active,
    Ended,
    Rejected,
    Cancelled,
    Missed,
}

impl Status {
    pub fn is_terminal(self) -> bool {
        !matches!(self, Status::Ringing | Status::Active)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ringing => "ringing",
            Status::Active => "active",
            Status::Ended => "ended",
            Status::Rejected => "rejected",
            Status::Cancelled => "cancelled",
            Status::Missed => "missed",
        }
    }
}

/// Hangup reasons a client may give when ending (Matrix's list).
pub const HANGUP_REASONS: [&str; 5] = [
    "user_hangup",
    "ice_failed",
    "ice_timeout",
    "user_media_failed",
    "unknown_error",
];

/// One side of a call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Party {
    pub id: String,
    pub username: String,
    #[serde(default)]
    pub first_name: String,
    #[serde(default)]
    pub last_name: String,
}

/// A call as stored. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    pub id: u64,
    pub caller: Party,
    pub receiver: Party,
    pub call_type: CallType,
    pub conversation_id: String,
    pub status: Status,
    pub created_ms: u64,
    pub ring_deadline_ms: u64,
    pub accepted_ms: Option<u64>,
    pub ended_ms: Option<u64>,
    pub end_reason: Option<String>,
    pub hangup_reason: Option<String>,
    pub accepted_device: Option<String>,
}

/// What someone asks of a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Accept {
        by: String,
        username: String,
        device_id: Option<String>,
    },
    Reject {
        by: String,
        username: String,
    },
    End {
        by: String,
        hangup_reason: Option<String>,
    },
    /// The ring timeout passed.
    Timeout,
    /// callbus ends an active call by itself: `connection_lost` (neither party connected for
    /// the grace period) or `max_duration`.
    Expire {
        reason: &'static str,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("you are not a party to this call")]
    NotAParty,
    #[error("only the receiver can do this")]
    NotReceiver,
    #[error("the call is {0}")]
    WrongState(&'static str),
}

impl Call {
    pub fn is_party(&self, uid: &str) -> bool {
        self.caller.id == uid || self.receiver.id == uid
    }

    /// The other party, seen from `uid`.
    pub fn other_party(&self, uid: &str) -> &Party {
        if self.caller.id == uid {
            &self.receiver
        } else {
            &self.caller
        }
    }

    /// Whole seconds between accept and end, 0 if never active.
    pub fn duration_seconds(&self) -> u64 {
        match (self.accepted_ms, self.ended_ms) {
            (Some(a), Some(e)) => e.saturating_sub(a) / 1000,
            _ => 0,
        }
    }

    /// Applies an action at time `now_ms`, returning the new record.
    pub fn apply(&self, action: &Action, now_ms: u64) -> Result<Call, TransitionError> {
        let wrong_state = || TransitionError::WrongState(self.status.as_str());
        let mut next = self.clone();
        match action {
            Action::Accept {
                by,
                username,
                device_id,
            } => {
                self.check_receiver(by)?;
                if self.status != Status::Ringing {
                    return Err(wrong_state());
                }
                next.status = Status::Active;
                next.accepted_ms = Some(now_ms);
                next.accepted_device = device_id.clone();
                next.receiver.username = username.clone();
            }
            Action::Reject { by, username } => {
                self.check_receiver(by)?;
                if self.status != Status::Ringing {
                    return Err(wrong_state());
                }
                next.finish(Status::Rejected, "rejected", now_ms);
                next.receiver.username = username.clone();
            }
            Action::End { by, hangup_reason } => {
                if !self.is_party(by) {
                    return Err(TransitionError::NotAParty);
                }
                match self.status {
                    Status::Active => next.finish(Status::Ended, "ended", now_ms),
                    // The caller hanging up a ringing call cancels it; the receiver hanging up
                    // before answering declines it.
                    Status::Ringing if *by == self.caller.id => {
                        next.finish(Status::Cancelled, "cancelled", now_ms)
                    }
                    Status::Ringing => next.finish(Status::Rejected, "rejected", now_ms),
                    _ => return Err(wrong_state()),
                }
                next.hangup_reason = hangup_reason.clone();
            }
            Action::Timeout => {
                if self.status != Status::Ringing {
                    return Err(wrong_state());
                }
                next.finish(Status::Missed, "missed", now_ms);
            }
            Action::Expire { reason } => {
                if self.status != Status::Active {
                    return Err(wrong_state());
                }
                next.finish(Status::Ended, reason, now_ms);
            }
        }
        Ok(next)
    }

    fn check_receiver(&self, by: &str) -> Result<(), TransitionError> {
        if self.receiver.id == by {
            Ok(())
        } else if self.caller.id == by {
            Err(TransitionError::NotReceiver)
        } else {
            Err(TransitionError::NotAParty)
        }
    }

    fn finish(&mut self, status: Status, reason: &str, now_ms: u64) {
        self.status = status;
        self.ended_ms = Some(now_ms);
        self.end_reason = Some(reason.to_owned());
    }

    /// The call as the REST API shows it (the seed's shape, extended by DESIGN).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self.view()).unwrap_or_default()
    }

    /// The call as the REST API shows it, written without building a `Value`.
    pub fn view(&self) -> CallView<'_> {
        CallView {
            id: self.id,
            caller: PartyView::of(&self.caller),
            receiver: PartyView::of(&self.receiver),
            call_type: self.call_type.as_str(),
            conversation_id: &self.conversation_id,
            status: self.status.as_str(),
            created_at: rfc3339_text(self.created_ms),
            accepted_at: self.accepted_ms.map(rfc3339_text),
            ended_at: self.ended_ms.map(rfc3339_text),
            duration_seconds: self.duration_seconds(),
            end_reason: self.end_reason.as_deref(),
            hangup_reason: self.hangup_reason.as_deref(),
            device_id: self.accepted_device.as_deref(),
        }
    }
}

/// A call as the REST API shows it (see [`Call::view`]).
#[derive(Serialize)]
pub struct CallView<'a> {
    id: u64,
    caller: PartyView<'a>,
    receiver: PartyView<'a>,
    call_type: &'a str,
    conversation_id: &'a str,
    status: &'a str,
    created_at: String,
    accepted_at: Option<String>,
    ended_at: Option<String>,
    duration_seconds: u64,
    end_reason: Option<&'a str>,
    hangup_reason: Option<&'a str>,
    device_id: Option<&'a str>,
}

#[derive(Serialize)]
struct PartyView<'a> {
    id: &'a str,
    username: &'a str,
}

impl<'a> PartyView<'a> {
    fn of(party: &'a Party) -> Self {
        Self {
            id: &party.id,
            username: &party.username,
        }
    }
}

/// Unix milliseconds as RFC 3339, or null.
pub fn rfc3339(ms: Option<u64>) -> Value {
    match ms {
        Some(ms) => Value::String(rfc3339_text(ms)),
        None => Value::Null,
    }
}

/// Unix milliseconds as RFC 3339.
pub fn rfc3339_text(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

#[cfg(test)]
impl Call {
    /// For unit tests: call 17 from `a` to `b` in conversation `c1`, video, created at 1 s.
    pub(crate) fn sample(status: Status) -> Call {
        let party = |id: &str| Party {
            id: id.into(),
            username: id.into(),
            first_name: String::new(),
            last_name: String::new(),
        };
        Call {
            id: 17,
            caller: party("a"),
            receiver: party("b"),
            call_type: CallType::Video,
            conversation_id: "c1".into(),
            status,
            created_ms: 1_000,
            ring_deadline_ms: 61_000,
            accepted_ms: None,
            ended_ms: None,
            end_reason: None,
            hangup_reason: None,
            accepted_device: None,
        }
    }
}

#[cfg(test)]
#[path = "call_tests.rs"]
mod tests;
