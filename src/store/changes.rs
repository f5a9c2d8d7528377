//! Who is told when an event's availability changes: the availability streams.
//!
//! Every write that moves an event's `available_tickets` calls [`Changes::changed`] once its
//! transaction has committed (the group-commit writer, the fenced writes of `locked`, the
//! monolith's statements). A stream waits on its event's [`watch`] channel and reads the event
//! again only when told, so an idle stream costs nothing. The channel holds a version number,
//! not the value: changes that come faster than a stream reads collapse into one wake-up, and
//! the stream reads what is stored then.
//!
//! Only this process's writes are seen: another process writing the same database (a second
//! inventory node of stage `services`) does not tell this one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::domain::EventId;

/// One channel per event that has a stream open; cheap to clone (shared).
#[derive(Clone, Default)]
pub struct Changes {
    events: Arc<Mutex<HashMap<EventId, watch::Sender<u64>>>>,
}

impl Changes {
    /// A receiver woken at each committed change of `event`'s availability.
    pub fn subscribe(&self, event: EventId) -> watch::Receiver<u64> {
        let mut events = self.events.lock().expect("availability channels poisoned");
        // Channels whose streams have all closed are dropped here, so the map follows the
        // events that have a stream open.
        events.retain(|_, tx| tx.receiver_count() > 0);
        events
            .entry(event)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// `event`'s availability changed (its transaction committed).
    pub fn changed(&self, event: EventId) {
        let events = self.events.lock().expect("availability channels poisoned");
        if let Some(tx) = events.get(&event) {
            tx.send_modify(|version| *version = version.wrapping_add(1));
        }
    }

    /// Events with a channel now (tests).
    pub fn channels(&self) -> usize {
        self.events
            .lock()
            .expect("availability channels poisoned")
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_subscriber_is_woken_by_its_events_changes_only() {
        let changes = Changes::default();
        let mut one = changes.subscribe(EventId(1));
        let two = changes.subscribe(EventId(2));
        changes.changed(EventId(1));
        changes.changed(EventId(1));
        changes.changed(EventId(3)); // nobody listens: no channel is made
        assert!(one.has_changed().unwrap());
        one.changed().await.unwrap();
        assert_eq!(*one.borrow_and_update(), 2, "two changes, one wake-up");
        assert!(!two.has_changed().unwrap());
        assert_eq!(changes.channels(), 2);
        drop(one);
        drop(two);
        let _three = changes.subscribe(EventId(3));
        assert_eq!(changes.channels(), 1, "closed channels are dropped");
    }
}
