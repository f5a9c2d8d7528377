//! A minimal HTTP/1.1 client over one keep-alive TCP connection.
//!
//! Why not reqwest or hyper: the load generator shares two cores with the server it measures,
//! so every microsecond of client CPU is taken from the server. One connection per worker,
//! one request in flight, a reused write buffer and `httparse` for the answer is all the
//! protocol this tool needs (the server speaks JSON with a `Content-Length`; chunked answers
//! are decoded too).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One answer: status, `Retry-After` in seconds when sent, and the body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub retry_after_secs: Option<u64>,
    /// `Idempotent-Replayed: true`: the stored answer to an earlier request with the same key.
    pub replayed: bool,
    pub body: Vec<u8>,
}

/// Why a request got no answer. Every one of these is an *unknown outcome* for a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Connect,
    Timeout,
    /// Reset, closed mid-answer, or an answer this client cannot parse.
    Transport,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect-error",
            Self::Timeout => "timeout",
            Self::Transport => "transport-error",
        }
    }
}

/// A lazily (re)connected keep-alive connection to one server.
pub struct Conn {
    addr: SocketAddr,
    host: String,
    timeout: Duration,
    stream: Option<TcpStream>,
    write_buf: Vec<u8>,
    read_buf: Vec<u8>,
}

impl Conn {
    pub fn new(addr: SocketAddr, timeout: Duration) -> Self {
        Self {
            addr,
            host: addr.to_string(),
            timeout,
            stream: None,
            write_buf: Vec::with_capacity(512),
            read_buf: Vec::with_capacity(16 * 1024),
        }
    }

    pub async fn get(&mut self, path: &str) -> Result<Response, Failure> {
        self.send("GET", path, &[], None).await
    }

    pub async fn post_json(&mut self, path: &str, body: &[u8]) -> Result<Response, Failure> {
        self.send("POST", path, &[], Some(body)).await
    }

    /// Sends one request (with extra headers, e.g. `Authorization`) and reads its answer within
    /// the timeout. On any failure the connection is dropped and the next request reconnects.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Response, Failure> {
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.exchange(method, path, headers, body)).await {
            Ok(Ok((response, keep_alive))) => {
                if !keep_alive {
                    self.stream = None;
                }
                Ok(response)
            }
            Ok(Err(failure)) => {
                self.stream = None;
                Err(failure)
            }
            Err(_) => {
                self.stream = None;
                Err(Failure::Timeout)
            }
        }
    }

    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<(Response, bool), Failure> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.addr)
                .await
                .map_err(|_| Failure::Connect)?;
            stream.set_nodelay(true).map_err(|_| Failure::Connect)?;
            self.stream = Some(stream);
            self.read_buf.clear();
        }
        self.encode(method, path, headers, body);
        let stream = self.stream.as_mut().expect("connected above");
        stream
            .write_all(&self.write_buf)
            .await
            .map_err(|_| Failure::Transport)?;
        read_response(stream, &mut self.read_buf)
            .await
            .map_err(|_| Failure::Transport)
    }

    fn encode(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&[u8]>) {
        use std::io::Write;
        let buf = &mut self.write_buf;
        buf.clear();
        let _ = write!(buf, "{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        for (name, value) in headers {
            let _ = write!(buf, "{name}: {value}\r\n");
        }
        match body {
            Some(body) => {
                let _ = write!(
                    buf,
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                buf.extend_from_slice(body);
            }
            None => buf.extend_from_slice(b"\r\n"),
        }
    }
}

/// Reads one answer. `buf` may hold bytes left over from the previous answer (there are none
/// with one request in flight, but a server may send early) and keeps what follows this one.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<(Response, bool)> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Response::new(&mut headers);
        match parsed.parse(buf).map_err(invalid)? {
            httparse::Status::Complete(head_len) => {
                let status = parsed.code.unwrap_or(0);
                let mut content_length = None;
                let mut chunked = false;
                let mut keep_alive = parsed.version == Some(1);
                let mut retry_after_secs = None;
                let mut replayed = false;
                for h in parsed.headers.iter() {
                    let value = std::str::from_utf8(h.value).unwrap_or("").trim();
                    if h.name.eq_ignore_ascii_case("content-length") {
                        content_length = Some(value.parse::<usize>().map_err(invalid)?);
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        chunked = value.to_ascii_lowercase().contains("chunked");
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        let v = value.to_ascii_lowercase();
                        keep_alive = if v.contains("close") {
                            false
                        } else {
                            keep_alive || v.contains("keep-alive")
                        };
                    } else if h.name.eq_ignore_ascii_case("retry-after") {
                        retry_after_secs = value.parse().ok();
                    } else if h.name.eq_ignore_ascii_case("idempotent-replayed") {
                        replayed = value.eq_ignore_ascii_case("true");
                    }
                }
                let body = if chunked {
                    read_chunked(stream, buf, head_len).await?
                } else {
                    let len = match content_length {
                        Some(len) => len,
                        None if status == 204 || status == 304 || status < 200 => 0,
                        None => {
                            // body until close
                            buf.drain(..head_len);
                            while stream.read_buf(buf).await? > 0 {}
                            let body = std::mem::take(buf);
                            return Ok((
                                Response {
                                    status,
                                    retry_after_secs,
                                    replayed,
                                    body,
                                },
                                false,
                            ));
                        }
                    };
                    while buf.len() < head_len + len {
                        fill(stream, buf).await?;
                    }
                    let body = buf[head_len..head_len + len].to_vec();
                    buf.drain(..head_len + len);
                    body
                };
                return Ok((
                    Response {
                        status,
                        retry_after_secs,
                        replayed,
                        body,
                    },
                    keep_alive,
                ));
            }
            httparse::Status::Partial => fill(stream, buf).await?,
        }
    }
}

async fn read_chunked(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    head_len: usize,
) -> io::Result<Vec<u8>> {
    buf.drain(..head_len);
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(pos) = buf.windows(2).position(|w| w == b"\r\n") {
                break pos;
            }
            fill(stream, buf).await?;
        };
        let size_text = std::str::from_utf8(&buf[..line_end]).map_err(invalid)?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(invalid)?;
        let needed = line_end + 2 + size + 2;
        while buf.len() < needed {
            fill(stream, buf).await?;
        }
        body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
        buf.drain(..needed);
        if size == 0 {
            return Ok(body);
        }
    }
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<()> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16 * 1024);
    }
    if stream.read_buf(buf).await? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Parses `http://host:port` (an optional trailing `/`) into a socket address. Only plain HTTP
/// on an address this machine can resolve; the base path must be empty.
pub fn parse_target(raw: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let rest = raw.strip_prefix("http://").ok_or_else(|| {
        anyhow::anyhow!("--target {raw}: give an http:// URL, e.g. http://127.0.0.1:8080")
    })?;
    let authority = rest.trim_end_matches('/');
    if authority.contains('/') {
        anyhow::bail!("--target {raw}: give the server's root URL without a path");
    }
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    with_port
        .to_socket_addrs()
        .map_err(|e| anyhow::anyhow!("--target {raw}: cannot resolve `{authority}`: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("--target {raw}: `{authority}` resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Serves the given raw answers, one per request read, on one connection.
    async fn serve(answers: Vec<&'static str>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            for answer in answers {
                let _ = socket.read(&mut buf).await.unwrap();
                socket.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        addr
    }

    #[tokio::test]
    async fn content_length_chunked_and_headers_are_read_on_one_kept_alive_connection() {
        let addr = serve(vec![
            "HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\nRetry-After: 1\r\n\r\n{}",
            "HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\nIdempotent-Replayed: true\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        ])
        .await;
        let mut conn = Conn::new(addr, Duration::from_secs(2));
        let first = conn.get("/a").await.unwrap();
        assert_eq!((first.status, first.retry_after_secs), (400, Some(1)));
        assert_eq!(first.body, b"{}");
        let second = conn.post_json("/b", b"{}").await.unwrap();
        assert_eq!(second.status, 202);
        assert!(second.replayed);
        assert_eq!(second.body, b"abcde");
    }

    #[tokio::test]
    async fn a_closed_connection_is_a_transport_failure_and_a_silent_server_a_timeout() {
        let addr = serve(vec![]).await;
        let mut conn = Conn::new(addr, Duration::from_secs(2));
        assert_eq!(conn.get("/").await.unwrap_err(), Failure::Transport);

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _hold = tokio::spawn(async move {
            let (_socket, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let mut conn = Conn::new(addr, Duration::from_millis(100));
        assert_eq!(conn.get("/").await.unwrap_err(), Failure::Timeout);
    }

    #[test]
    fn targets_are_plain_http_roots() {
        assert!(parse_target("http://127.0.0.1:8080/").is_ok());
        assert!(parse_target("127.0.0.1:8080").is_err());
        assert!(parse_target("http://127.0.0.1:8080/api").is_err());
    }
}
