//! The call state machine's unit tests.

use super::*;

fn ringing() -> Call {
    let mut call = Call::sample(Status::Ringing);
    call.caller.username = "alice".into();
    call
}

fn accept(by: &str) -> Action {
    Action::Accept {
        by: by.into(),
        username: "bob".into(),
        device_id: Some("phone".into()),
    }
}

fn end(by: &str) -> Action {
    Action::End {
        by: by.into(),
        hangup_reason: None,
    }
}

#[test]
fn accept_then_end_computes_duration() {
    let active = ringing().apply(&accept("b"), 2_000).unwrap();
    assert_eq!(active.status, Status::Active);
    assert_eq!(active.receiver.username, "bob");
    assert_eq!(active.accepted_device.as_deref(), Some("phone"));
    let ended = active.apply(&end("a"), 14_500).unwrap();
    assert_eq!(ended.status, Status::Ended);
    assert_eq!(ended.duration_seconds(), 12);
    assert_eq!(ended.end_reason.as_deref(), Some("ended"));
}

#[test]
fn only_the_receiver_accepts_or_rejects() {
    assert_eq!(
        ringing().apply(&accept("a"), 2),
        Err(TransitionError::NotReceiver)
    );
    assert_eq!(
        ringing().apply(&accept("z"), 2),
        Err(TransitionError::NotAParty)
    );
    let reject = Action::Reject {
        by: "a".into(),
        username: "alice".into(),
    };
    assert_eq!(
        ringing().apply(&reject, 2),
        Err(TransitionError::NotReceiver)
    );
}

#[test]
fn ending_while_ringing() {
    assert_eq!(
        ringing().apply(&end("a"), 5).unwrap().status,
        Status::Cancelled
    );
    assert_eq!(
        ringing().apply(&end("b"), 5).unwrap().status,
        Status::Rejected
    );
    assert_eq!(
        ringing().apply(&end("z"), 5),
        Err(TransitionError::NotAParty)
    );
    assert_eq!(ringing().apply(&end("a"), 5).unwrap().duration_seconds(), 0);
}

#[test]
fn timeout_misses_only_ringing_calls() {
    assert_eq!(
        ringing().apply(&Action::Timeout, 61_000).unwrap().status,
        Status::Missed
    );
    let active = ringing().apply(&accept("b"), 2_000).unwrap();
    assert!(active.apply(&Action::Timeout, 70_000).is_err());
}

#[test]
fn only_active_calls_expire() {
    let active = ringing().apply(&accept("b"), 2_000).unwrap();
    let lost = active
        .apply(
            &Action::Expire {
                reason: "connection_lost",
            },
            9_000,
        )
        .unwrap();
    assert_eq!(lost.status, Status::Ended);
    assert_eq!(lost.end_reason.as_deref(), Some("connection_lost"));
    assert_eq!(lost.duration_seconds(), 7);
    let expire = Action::Expire {
        reason: "max_duration",
    };
    assert!(ringing().apply(&expire, 5).is_err());
    assert!(lost.apply(&expire, 10_000).is_err());
}

#[test]
fn terminal_states_never_change() {
    let terminal = [
        ringing().apply(&end("a"), 5).unwrap(),
        ringing().apply(&end("b"), 5).unwrap(),
        ringing().apply(&Action::Timeout, 5).unwrap(),
        ringing()
            .apply(&accept("b"), 5)
            .unwrap()
            .apply(&end("b"), 9)
            .unwrap(),
    ];
    for call in terminal {
        assert!(call.status.is_terminal());
        for action in [accept("b"), end("a"), end("b"), Action::Timeout] {
            assert!(matches!(
                call.apply(&action, 100),
                Err(TransitionError::WrongState(_))
            ));
        }
    }
}

#[test]
fn json_shape() {
    let v = ringing().to_json();
    assert_eq!(v["id"], 17);
    assert_eq!(v["caller"]["username"], "alice");
    assert_eq!(v["status"], "ringing");
    assert_eq!(v["call_type"], "video");
    assert!(v["accepted_at"].is_null());
    assert_eq!(v["created_at"], "1970-01-01T00:00:01.000Z");
}
