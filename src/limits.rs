//! Connection and body limits: a cap on open connections across every HTTP worker, and a
//! deadline for each request body.
//!
//! A connection past the cap is answered `503` at once and closed, so a flood of connections
//! costs a descriptor only for the moment it takes to refuse it. A request body that has not
//! fully arrived by its deadline ends in `408 body-timeout`, and the connection is closed
//! (actix-web closes a connection whose request body was not read to its end).

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Extensions, Payload, ServiceRequest};
use actix_web::error::PayloadError;
use actix_web::web::Bytes;
use actix_web::HttpMessage;
use futures::{Stream, StreamExt};

/// A request body as actix-web's `Payload::Stream` holds it.
type BodyStream = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>>;

/// Counts open connections; a connection's [`Slot`] lives in its extensions and gives its
/// place back when the connection ends.
#[derive(Debug, Clone)]
pub struct ConnectionGate {
    open: Arc<AtomicUsize>,
    max: usize,
}

/// One connection's place under the cap, released on drop.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a connection past the cap is sent before it is closed.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
Content-Type: application/problem+json\r\n\
Retry-After: 1\r\n\
Connection: close\r\n\
Content-Length: 164\r\n\r\n\
{\"type\":\"/problems/too-many-connections\",\"title\":\"Too many connections\",\"status\":503,\"detail\":\"the server is at its connection cap\",\"code\":\"too-many-connections\"}";

impl ConnectionGate {
    pub fn new(max: usize) -> Self {
        Self {
            open: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Called by actix-web for each new connection, before anything is read from it. Under the
    /// cap, the connection takes a slot; past it, it is answered 503 and shut down, so the
    /// HTTP dispatcher sees it end at once and drops it.
    pub fn on_connect(&self, io: &dyn std::any::Any, ext: &mut Extensions) {
        let taken = self.open.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(Arc::clone(&self.open));
        if taken < self.max {
            ext.insert(Arc::new(slot));
            if let Some(stream) = io.downcast_ref::<actix_web::rt::net::TcpStream>() {
                use std::os::fd::AsRawFd;
                ext.insert(ConnectionFd(stream.as_raw_fd()));
            }
            return;
        }
        drop(slot);
        if let Some(stream) = io.downcast_ref::<actix_web::rt::net::TcpStream>() {
            // A fresh socket's send buffer is empty: the short answer fits. It is written
            // straight to the socket (tokio has not polled it yet, so its `try_write` would
            // only say "would block").
            let socket = socket2::SockRef::from(stream);
            let _ = socket.send(REFUSAL);
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The descriptor of a request's connection, for [`Hangup::watch`] (from `conn_data`).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionFd(std::os::fd::RawFd);

/// Notices when the client of a long response (an availability stream) hangs up, although
/// nothing is being written to it: actix-web reads no more from a connection whose response
/// is streaming, so it would learn of the close only at its next write, up to a keep-alive
/// later. Watches a duplicate of the connection's descriptor for the peer's close.
pub struct Hangup(tokio::io::unix::AsyncFd<socket2::Socket>);

impl Hangup {
    /// Starts watching the connection of a request being handled (`None` if its descriptor
    /// cannot be duplicated, e.g. out of descriptors: the stream then ends at a failed write,
    /// as before).
    pub fn watch(fd: ConnectionFd) -> Option<Self> {
        // SAFETY: the descriptor belongs to the connection whose request is being handled
        // now, so it is open for the length of this call; it is only duplicated here.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd.0) };
        let owned = borrowed.try_clone_to_owned().ok()?;
        let socket = socket2::Socket::from(owned);
        // SAFETY: `socket` owns its descriptor, which stays open (and the same) until the
        // `AsyncFd` that owns `socket` is dropped.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE)
        }
        .ok()
        .map(Self)
    }

    /// Resolves once the peer has closed the connection (or it failed).
    pub async fn closed(&self) {
        loop {
            let Ok(mut ready) = self.0.readable().await else {
                return futures::future::pending().await;
            };
            if ready.ready().is_read_closed() {
                return;
            }
            let mut byte = [std::mem::MaybeUninit::uninit(); 1];
            match ready.get_inner().peek(&mut byte) {
                Ok(0) => return,
                // Bytes of a next request wait there: not a hang-up; wait for the next change.
                Ok(_) => ready.clear_ready(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.clear_ready(),
                Err(_) => return,
            }
        }
    }
}

/// Gives the request's body a deadline `timeout` from now: past it, reading the body fails
/// with a timed-out I/O error (answered `408 body-timeout` by the JSON extractor's handler).
pub fn body_deadline(req: &mut ServiceRequest, timeout: Duration) {
    let has_body = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() != b"0")
        || req
            .headers()
            .contains_key(actix_web::http::header::TRANSFER_ENCODING);
    if !has_body {
        return;
    }
    let inner = req.take_payload();
    let sleep = Box::pin(actix_rt::time::sleep(timeout));
    let stream = futures::stream::unfold(Some((inner, sleep)), move |state| async move {
        let (mut inner, mut sleep) = state?;
        tokio::select! {
            item = inner.next() => item.map(|item| (item, Some((inner, sleep)))),
            () = &mut sleep => Some((Err(timed_out(timeout)), None)),
        }
    });
    let boxed: BodyStream = Box::pin(stream);
    req.set_payload(Payload::from(boxed));
}

fn timed_out(timeout: Duration) -> PayloadError {
    PayloadError::Io(io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "the request body did not arrive within {}",
            humantime::format_duration(timeout)
        ),
    ))
}

/// Whether a body error is the deadline of [`body_deadline`].
pub fn is_body_timeout(err: &PayloadError) -> bool {
    matches!(err, PayloadError::Io(e) if e.kind() == io::ErrorKind::TimedOut)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bounds an await, so a deadline that does not fire fails the test instead of hanging it.
    async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
        actix_rt::time::timeout(Duration::from_secs(10), fut)
            .await
            .unwrap_or_else(|_| panic!("{what} did not happen within 10 s"))
    }

    // The request's body is set on the service request, not with `TestRequest::set_payload`:
    // that one also writes `Content-Length` (0 for an empty payload), and a request of length
    // 0 has no body to put a deadline on, so the pending payload was read for ever (the hang
    // that had this test removed).
    #[actix_rt::test]
    async fn a_body_that_never_ends_fails_at_its_deadline_and_a_complete_one_passes() {
        let never: BodyStream = Box::pin(futures::stream::pending());
        let mut req = actix_web::test::TestRequest::post()
            .insert_header(("content-length", "10"))
            .to_srv_request();
        req.set_payload(Payload::from(never));
        body_deadline(&mut req, Duration::from_millis(50));
        let mut body = req.take_payload();
        let err = within("the deadline", body.next())
            .await
            .unwrap()
            .unwrap_err();
        assert!(is_body_timeout(&err), "{err}");
        assert!(
            within("the end of the stream", body.next()).await.is_none(),
            "the stream ends after the timeout"
        );

        // `set_payload` writes `Content-Length: 5` itself here, which is right.
        let mut req = actix_web::test::TestRequest::post()
            .set_payload(Bytes::from_static(b"hello"))
            .to_srv_request();
        body_deadline(&mut req, Duration::from_millis(50));
        let mut body = req.take_payload();
        let chunk = within("the body", body.next()).await.unwrap().unwrap();
        assert_eq!(chunk, "hello");
    }
}
