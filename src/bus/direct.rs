//! The in-process bus: a publish is routed to the local sessions by the publishing task itself.
//! The hub routes each message under its one lock, so every session sees one global order; a
//! publisher never outruns the bus (the routing is its own work), and a session that stops
//! reading is dropped by the hub, not waited for.

use futures_util::future::BoxFuture;
use std::sync::Arc;

use super::{Bus, BusError, Deliver, Message};

pub struct DirectBus {
    sink: Arc<dyn Deliver>,
}

impl DirectBus {
    pub fn new(sink: Arc<dyn Deliver>) -> Self {
        Self { sink }
    }
}

impl Bus for DirectBus {
    fn publish(&self, message: Message) -> BoxFuture<'_, Result<(), BusError>> {
        // Routed when polled, not when called: a caller never holds a lock of the hub's while
        // polling (its guards are not Send), so the hub's lock is free here.
        Box::pin(async move {
            self.sink.deliver(message);
            Ok(())
        })
    }
}
