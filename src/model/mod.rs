//! The pure model everything else builds on: a call and its state machine ([`call`]), and the
//! topics callbus routes ([`topic`]). No I/O and no imports from the rest of callbus.

pub mod call;
pub mod topic;
