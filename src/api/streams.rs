//! Caps on the availability streams: at most so many open at once, and at most so many per
//! client address. A stream holds a [`StreamSlot`] for as long as its response body lives;
//! actix-web drops the body when the client's connection closes, and the slot with it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use actix_web::http::StatusCode;

use super::Problem;

/// How long a client refused a stream is asked to wait before trying again, in seconds.
const RETRY_AFTER_SECS: u64 = 5;

#[derive(Default)]
struct Open {
    total: usize,
    by_client: HashMap<IpAddr, usize>,
}

/// The streams open now, overall and per client; cheap to clone (shared).
#[derive(Clone)]
pub struct StreamSlots {
    open: Arc<Mutex<Open>>,
    max: usize,
    max_per_client: usize,
}

/// One open stream's place under the caps, given back on drop.
pub struct StreamSlot {
    open: Arc<Mutex<Open>>,
    client: IpAddr,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("stream slots poisoned");
        open.total -= 1;
        if let Some(n) = open.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.by_client.remove(&self.client);
            }
        }
        crate::meter::stream(-1.0);
    }
}

impl StreamSlots {
    pub fn new(max: usize, max_per_client: usize) -> Self {
        Self {
            open: Arc::default(),
            max,
            max_per_client,
        }
    }

    /// A slot for one more stream from `client`, or the problem to answer: `429` past the
    /// client's cap, `503` past the server's.
    pub fn take(&self, client: IpAddr) -> Result<StreamSlot, Problem> {
        let mut open = self.open.lock().expect("stream slots poisoned");
        let mine = open.by_client.get(&client).copied().unwrap_or(0);
        if mine >= self.max_per_client {
            return Err(Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-streams",
                "Too many streams",
                format!(
                    "this client has {mine} availability streams open, the most allowed (--max-streams-per-client); close one first"
                ),
            )
            .retry_after(RETRY_AFTER_SECS));
        }
        if open.total >= self.max {
            return Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too-many-streams",
                "Too many streams",
                format!(
                    "the server has {} availability streams open, the most it serves (--max-streams); try again later",
                    open.total
                ),
            )
            .retry_after(RETRY_AFTER_SECS));
        }
        open.total += 1;
        *open.by_client.entry(client).or_insert(0) += 1;
        crate::meter::stream(1.0);
        Ok(StreamSlot {
            open: Arc::clone(&self.open),
            client,
        })
    }

    /// Streams open now.
    pub fn open(&self) -> usize {
        self.open.lock().expect("stream slots poisoned").total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_and_the_server_have_a_cap_and_a_closed_stream_gives_its_place_back() {
        let slots = StreamSlots::new(3, 2);
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let a1 = slots.take(a).unwrap();
        let _a2 = slots.take(a).unwrap();
        assert_eq!(slots.take(a).err().unwrap().status, 429);
        let _b1 = slots.take(b).unwrap();
        assert_eq!(slots.take(b).err().unwrap().status, 503);
        drop(a1);
        assert_eq!(slots.open(), 2);
        assert!(
            slots.take(b).is_ok(),
            "a closed stream's place is free again"
        );
    }
}
