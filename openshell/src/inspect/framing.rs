//! A read-side guard for HTTP/1 client streams that sees the raw bytes hyper normalises away.
//!
//! hyper already refuses obs-fold, non-numeric and conflicting `Content-Length` values. It
//! accepts, by RFC 9112's leniency, a bare LF as a line end, a repeated identical
//! `Content-Length`, and `Content-Length` beside `Transfer-Encoding` (dropping the former).
//! A front end and a back end that disagree on such framing is how requests are smuggled, so
//! the guard follows each request head and body in the byte stream, and records the index of
//! the first request whose framing is ambiguous. The service answers that request with 400 and
//! closes the connection. Bytes pass through unchanged.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest request head the guard follows; hyper refuses larger ones itself.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;

/// The first request (0-based, in arrival order) with ambiguous framing, and why.
pub(super) type Verdicts = Arc<Mutex<Option<(u64, &'static str)>>>;

enum State {
    /// Collecting a request head.
    Head,
    /// Skipping `n` body bytes.
    Body(u64),
    /// Collecting a chunk-size line.
    ChunkSize,
    /// Skipping chunk data plus its CRLF.
    ChunkData(u64),
    /// Collecting trailer lines until an empty one.
    Trailers,
    /// Stopped following the stream (after a verdict, or an upgrade); bytes still pass.
    Done,
}

pub(super) struct Guard<I> {
    inner: I,
    state: State,
    buf: Vec<u8>,
    index: u64,
    verdict: Verdicts,
}

impl<I> Guard<I> {
    pub(super) fn new(inner: I, verdict: Verdicts) -> Self {
        Self {
            inner,
            state: State::Head,
            buf: Vec::new(),
            index: 0,
            verdict,
        }
    }

    fn reject(&mut self, why: &'static str) {
        let mut v = self
            .verdict
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        v.get_or_insert((self.index, why));
        self.state = State::Done;
        self.buf = Vec::new();
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Done => return,
                State::Body(n) | State::ChunkData(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(data.len());
                    data = &data[take..];
                    let left = n - take as u64;
                    self.state = match (&self.state, left) {
                        (State::Body(_), 0) => {
                            self.index += 1;
                            State::Head
                        }
                        (State::Body(_), l) => State::Body(l),
                        (_, 0) => State::ChunkSize,
                        (_, l) => State::ChunkData(l),
                    };
                }
                State::Head | State::ChunkSize | State::Trailers => {
                    let need_blank = matches!(self.state, State::Head);
                    let start = self.buf.len();
                    self.buf.extend_from_slice(data);
                    let end = if need_blank {
                        let crlf = find(&self.buf, b"\n\r\n").map(|p| p + 3);
                        let lf = find(&self.buf, b"\n\n").map(|p| p + 2);
                        match (crlf, lf) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        }
                    } else {
                        find(&self.buf, b"\n").map(|p| p + 1)
                    };
                    let Some(end) = end else {
                        if self.buf.len() > MAX_HEAD {
                            self.reject("a request head or chunk line that is too long");
                        }
                        return;
                    };
                    let consumed = end - start.min(end);
                    data = data.get(consumed..).unwrap_or(&[]);
                    let piece: Vec<u8> = self.buf.drain(..end).collect();
                    self.buf.clear();
                    match self.state {
                        State::Head => self.on_head(&piece),
                        State::ChunkSize => self.on_chunk_size(&piece),
                        _ => self.on_trailer(&piece),
                    }
                }
            }
        }
    }

    fn on_head(&mut self, head: &[u8]) {
        // Empty lines before a request line are tolerated (RFC 9112 §2.2).
        if head.iter().all(|b| *b == b'\r' || *b == b'\n') {
            return;
        }
        if bare_lf(head) {
            return self.reject("a bare LF in the request head");
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
            // hyper refuses it with 400 as well; nothing after it is read.
            return self.reject("a malformed request head");
        }
        let mut lengths = Vec::new();
        let mut te = false;
        let mut upgrade = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                lengths.push(h.value);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = true;
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        if lengths.len() > 1 {
            return self.reject("more than one Content-Length header");
        }
        if te && !lengths.is_empty() {
            return self.reject("Content-Length together with Transfer-Encoding");
        }
        let is_connect = req
            .method
            .is_some_and(|m| m.eq_ignore_ascii_case("CONNECT"));
        if upgrade || is_connect {
            // Refused by the service; whatever follows is not HTTP/1 framing to follow.
            self.state = State::Done;
            return;
        }
        self.state = if te {
            State::ChunkSize
        } else if let Some(v) = lengths.first() {
            match std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
            {
                Some(0) => {
                    self.index += 1;
                    State::Head
                }
                Some(n) => State::Body(n),
                None => return self.reject("a Content-Length that is not a number"),
            }
        } else {
            self.index += 1;
            State::Head
        };
    }

    fn on_chunk_size(&mut self, line: &[u8]) {
        if bare_lf(line) {
            return self.reject("a bare LF in the chunked body");
        }
        match httparse::parse_chunk_size(line) {
            Ok(httparse::Status::Complete((_, 0))) => self.state = State::Trailers,
            // The data, then its CRLF.
            Ok(httparse::Status::Complete((_, n))) => self.state = State::ChunkData(n + 2),
            _ => self.reject("a malformed chunk size"),
        }
    }

    fn on_trailer(&mut self, line: &[u8]) {
        if bare_lf(line) {
            return self.reject("a bare LF in the trailers");
        }
        if line == b"\r\n" {
            self.index += 1;
            self.state = State::Head;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn bare_lf(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || bytes[i - 1] != b'\r'))
}

impl<I: AsyncRead + Unpin> AsyncRead for Guard<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && !matches!(this.state, State::Done)
        {
            this.feed(&buf.filled()[before..]);
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Guard<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict_of(chunks: &[&[u8]]) -> Option<(u64, &'static str)> {
        let v: Verdicts = Arc::default();
        let mut g = Guard::new((), Arc::clone(&v));
        for c in chunks {
            g.feed(c);
        }
        *v.lock().expect("lock")
    }

    #[test]
    fn clean_pipelines_pass_even_split_anywhere() {
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc\
GET /b HTTP/1.1\r\nHost: h\r\n\r\n\
POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\n\
GET /d HTTP/1.1\r\nHost: h\r\n\r\n";
        assert_eq!(verdict_of(&[stream]), None);
        for cut in 1..stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(verdict_of(&[a, b]), None, "split at {cut}");
        }
    }

    #[test]
    fn the_ambiguous_request_is_the_one_named() {
        let ok = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n".as_slice();
        let cases: [(&[u8], &str); 4] = [
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                "Content-Length together with Transfer-Encoding",
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
                "more than one Content-Length header",
            ),
            (
                b"GET / HTTP/1.1\nHost: h\n\n",
                "a bare LF in the request head",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n",
                "a bare LF in the request head",
            ),
        ];
        for (bad, why) in cases {
            assert_eq!(verdict_of(&[ok, bad]), Some((1, why)), "{why}");
        }
    }
}
