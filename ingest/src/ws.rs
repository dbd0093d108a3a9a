//! Server side of the WebSocket protocol (RFC 6455) over any byte stream,
//! written for memory per idle connection: no read buffer is held between
//! messages (bytes are read into a stack buffer inside the poll and copied
//! into a heap buffer only while a frame is incomplete), and nothing is
//! buffered for writing (each frame is written whole, then dropped). With
//! 100,000 chargers that each send a message every few minutes, a fixed
//! 4 KiB read buffer per socket would be most of the node's memory.
//!
//! Covered: masking (client frames must be masked), fragmentation and
//! continuation frames, control frames between fragments, ping/pong, the
//! close handshake (echoing the peer's code, then closing TCP ourselves),
//! a maximum message size (close 1009), UTF-8 validation of text messages
//! (close 1007) and protocol errors (close 1002). No extensions are
//! negotiated, so reserved bits must be zero.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Bytes read from the socket per read call; lives on the poller's stack.
const READ_CHUNK: usize = 8 * 1024;
/// Longest header of a client frame: 2 + 8 (length) + 4 (mask).
const MAX_HEADER: usize = 14;

pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_PROTOCOL: u16 = 1002;
pub const CLOSE_INVALID_DATA: u16 = 1007;
pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_TOO_BIG: u16 = 1009;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// A complete message or control frame from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    Binary(Vec<u8>),
    /// Answer with [`WsConn::send_pong`] and the same payload.
    Ping(Vec<u8>),
    Pong,
    /// The client started the close handshake (code and reason, if given).
    Close(Option<(u16, String)>),
}

#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("the connection ended without a close frame")]
    Eof,
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("WebSocket protocol error: {0}")]
    Protocol(&'static str),
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    #[error("message of {size} bytes is over the limit of {max}")]
    TooLarge { size: u64, max: usize },
}

impl WsError {
    /// The close code to send for this error, if the socket is still usable.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            WsError::Eof | WsError::Io(_) => None,
            WsError::Protocol(_) => Some(CLOSE_PROTOCOL),
            WsError::InvalidUtf8 => Some(CLOSE_INVALID_DATA),
            WsError::TooLarge { .. } => Some(CLOSE_TOO_BIG),
        }
    }
}

/// A fragmented message being assembled.
struct Partial {
    text: bool,
    data: Vec<u8>,
}

/// One server-side WebSocket connection over `S` (plain TCP or TLS).
pub struct WsConn<S> {
    io: S,
    /// Bytes read but not yet consumed: empty (and unallocated) between
    /// messages, except when the client pipelines frames.
    rbuf: Vec<u8>,
    /// Bytes still missing from the frame at the head of `rbuf`, as a hint
    /// for how much to reserve.
    want: usize,
    partial: Option<Partial>,
    max_message: usize,
}

/// A parsed frame header.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    fin: bool,
    opcode: u8,
    header_len: usize,
    payload_len: u64,
    mask: [u8; 4],
}

/// Parses the header at the start of `buf`; `None` while it is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(WsError::Protocol("reserved bits set without an extension"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            if !fin {
                return Err(WsError::Protocol("fragmented control frame"));
            }
            if b1 & 0x7F > 125 {
                return Err(WsError::Protocol("control frame longer than 125 bytes"));
            }
        }
        _ => return Err(WsError::Protocol("unknown opcode")),
    }
    if b1 & 0x80 == 0 {
        return Err(WsError::Protocol("client frame is not masked"));
    }
    let (payload_len, at) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(WsError::Protocol("payload length has its top bit set"));
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    if buf.len() < at + 4 {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&buf[at..at + 4]);
    Ok(Some(Head {
        fin,
        opcode,
        header_len: at + 4,
        payload_len,
        mask,
    }))
}

fn unmask(data: &mut [u8], mask: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// A server frame (never masked) with `payload`, ready to write.
fn encode(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = Vec::with_capacity(len + 10);
    out.push(0x80 | opcode);
    if len < 126 {
        out.push(len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        out.push(126);
        out.extend_from_slice(&short.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

/// Whether `code` may appear in a close frame on the wire (RFC 6455 7.4).
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

impl<S> WsConn<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Wraps an upgraded stream; `leftover` holds bytes that arrived after
    /// the HTTP request head. Messages over `max_message` bytes close the
    /// connection with 1009.
    pub fn new(io: S, leftover: Vec<u8>, max_message: usize) -> Self {
        WsConn {
            io,
            rbuf: leftover,
            want: 0,
            partial: None,
            max_message,
        }
    }

    /// Capacity held for reading; zero between messages.
    pub fn buffered_capacity(&self) -> usize {
        self.rbuf.capacity() + self.partial.as_ref().map_or(0, |p| p.data.capacity())
    }

    /// The next message or control frame. Cancel safe: everything read so
    /// far stays in the connection.
    pub async fn read(&mut self) -> Result<Incoming, WsError> {
        loop {
            if let Some(m) = self.take_message()? {
                return Ok(m);
            }
            let n = poll_fn(|cx| self.poll_fill(cx)).await?;
            if n == 0 {
                return Err(WsError::Eof);
            }
        }
    }

    /// Reads what the socket has into `rbuf`. The read goes through a stack
    /// buffer, so an idle connection holds no buffer while it waits.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut stack = [0u8; READ_CHUNK];
        let mut rb = ReadBuf::new(&mut stack);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        let got = rb.filled();
        if !got.is_empty() {
            if self.rbuf.capacity() == 0 {
                self.rbuf = Vec::with_capacity(got.len().max(self.want));
            } else {
                self.rbuf.reserve(got.len().max(self.want));
            }
            self.rbuf.extend_from_slice(got);
        }
        Poll::Ready(Ok(got.len()))
    }

    /// Consumes complete frames from `rbuf` until a message or control
    /// frame is complete; `None` when more bytes are needed.
    fn take_message(&mut self) -> Result<Option<Incoming>, WsError> {
        loop {
            let Some(head) = parse_head(&self.rbuf)? else {
                self.want = MAX_HEADER;
                return Ok(None);
            };
            let assembled = self.partial.as_ref().map_or(0, |p| p.data.len() as u64);
            let is_data = head.opcode < OP_CLOSE;
            if is_data && assembled + head.payload_len > self.max_message as u64 {
                return Err(WsError::TooLarge {
                    size: assembled + head.payload_len,
                    max: self.max_message,
                });
            }
            // Within `max_message` (data) or 125 (control), so it fits usize.
            let len = head.payload_len as usize;
            let end = head.header_len + len;
            if self.rbuf.len() < end {
                self.want = end - self.rbuf.len();
                return Ok(None);
            }
            self.want = 0;
            unmask(&mut self.rbuf[head.header_len..end], head.mask);
            let payload = self.consume(head.header_len, end);
            match head.opcode {
                OP_PING => return Ok(Some(Incoming::Ping(payload))),
                OP_PONG => return Ok(Some(Incoming::Pong)),
                OP_CLOSE => return close_payload(&payload).map(|c| Some(Incoming::Close(c))),
                OP_CONTINUATION => {
                    let Some(p) = self.partial.as_mut() else {
                        return Err(WsError::Protocol("continuation frame without a message"));
                    };
                    p.data.extend_from_slice(&payload);
                    if head.fin {
                        let p = self.partial.take().expect("checked above");
                        return finish(p.text, p.data).map(Some);
                    }
                }
                op => {
                    if self.partial.is_some() {
                        return Err(WsError::Protocol("new message inside a fragmented one"));
                    }
                    let text = op == OP_TEXT;
                    if head.fin {
                        return finish(text, payload).map(Some);
                    }
                    self.partial = Some(Partial {
                        text,
                        data: payload,
                    });
                }
            }
        }
    }

    /// Takes `rbuf[start..end]` out and drops `rbuf[..end]`; the common case
    /// (one frame, the whole buffer) reuses the buffer without copying, and
    /// an emptied buffer is released.
    fn consume(&mut self, start: usize, end: usize) -> Vec<u8> {
        if end == self.rbuf.len() {
            let mut all = std::mem::take(&mut self.rbuf);
            all.drain(..start);
            return all;
        }
        let payload = self.rbuf[start..end].to_vec();
        self.rbuf.drain(..end);
        payload
    }

    pub async fn send_text(&mut self, text: &str) -> io::Result<()> {
        self.send(OP_TEXT, text.as_bytes()).await
    }

    pub async fn send_ping(&mut self) -> io::Result<()> {
        self.send(OP_PING, &[]).await
    }

    pub async fn send_pong(&mut self, payload: &[u8]) -> io::Result<()> {
        self.send(OP_PONG, payload).await
    }

    async fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let frame = encode(opcode, payload);
        self.io.write_all(&frame).await?;
        self.io.flush().await
    }

    /// Ends the connection: sends a close frame (`code` 0: an empty one),
    /// shuts our side of TCP down, then reads and discards until the client
    /// closes too or `linger` passes, so that the close frame is not lost to
    /// a reset caused by unread bytes.
    pub async fn close(&mut self, code: u16, reason: &str, linger: Duration) {
        let mut payload = Vec::with_capacity(2 + reason.len());
        if code != 0 {
            payload.extend_from_slice(&code.to_be_bytes());
            // Control frames carry at most 125 bytes.
            let mut cut = reason.len().min(123);
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            payload.extend_from_slice(&reason.as_bytes()[..cut]);
        }
        let _ = tokio::time::timeout(linger, async {
            if self.send(OP_CLOSE, &payload).await.is_err() {
                return;
            }
            let _ = self.io.shutdown().await;
            self.rbuf = Vec::new();
            self.partial = None;
            let mut sink = [0u8; 1024];
            while let Ok(n) = self.io.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }

    /// Answers the client's close frame (echoing its code) and closes.
    pub async fn answer_close(&mut self, code: Option<u16>, linger: Duration) {
        self.close(code.unwrap_or(0), "", linger).await;
    }
}

fn finish(text: bool, data: Vec<u8>) -> Result<Incoming, WsError> {
    if text {
        String::from_utf8(data)
            .map(Incoming::Text)
            .map_err(|_| WsError::InvalidUtf8)
    } else {
        Ok(Incoming::Binary(data))
    }
}

fn close_payload(p: &[u8]) -> Result<Option<(u16, String)>, WsError> {
    match p.len() {
        0 => Ok(None),
        1 => Err(WsError::Protocol("close frame with a one-byte payload")),
        _ => {
            let code = u16::from_be_bytes([p[0], p[1]]);
            if !valid_close_code(code) {
                return Err(WsError::Protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(&p[2..]).map_err(|_| WsError::InvalidUtf8)?;
            Ok(Some((code, reason.to_string())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::DuplexStream;
    use tokio_tungstenite::{
        WebSocketStream,
        tungstenite::{
            Message,
            protocol::{CloseFrame, Role, WebSocketConfig, frame::coding::CloseCode},
        },
    };

    /// A tungstenite client (an independent implementation) wired to ours.
    async fn pair(max: usize) -> (WsConn<DuplexStream>, WebSocketStream<DuplexStream>) {
        let (a, b) = tokio::io::duplex(256 * 1024);
        let client = WebSocketStream::from_raw_socket(
            b,
            Role::Client,
            Some(WebSocketConfig::default().max_frame_size(None)),
        )
        .await;
        (WsConn::new(a, Vec::new(), max), client)
    }

    /// A masked client frame written by hand, for cases tungstenite won't send.
    fn client_frame(b0: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![b0];
        let m = if masked { 0x80 } else { 0 };
        if payload.len() < 126 {
            out.push(m | payload.len() as u8);
        } else {
            out.push(m | 126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        let mut body = payload.to_vec();
        if masked {
            out.extend_from_slice(&mask);
            unmask(&mut body, mask);
        }
        out.extend_from_slice(&body);
        out
    }

    #[tokio::test]
    async fn text_round_trip_holds_no_buffer_when_idle() {
        let (mut server, mut client) = pair(1 << 17).await;
        client
            .send(Message::text("[2,\"1\",\"Heartbeat\",{}]"))
            .await
            .unwrap();
        let m = server.read().await.unwrap();
        assert_eq!(m, Incoming::Text("[2,\"1\",\"Heartbeat\",{}]".into()));
        assert_eq!(server.buffered_capacity(), 0);
        server.send_text("[3,\"1\",{}]").await.unwrap();
        let back = client.next().await.unwrap().unwrap();
        assert_eq!(back, Message::text("[3,\"1\",{}]"));
        // Long enough for the 16-bit and 64-bit length encodings.
        for n in [200, 70_000] {
            let big = "x".repeat(n);
            client.send(Message::text(big.clone())).await.unwrap();
            assert_eq!(server.read().await.unwrap(), Incoming::Text(big.clone()));
            assert_eq!(server.buffered_capacity(), 0);
            server.send_text(&big).await.unwrap();
            assert_eq!(client.next().await.unwrap().unwrap(), Message::text(big));
        }
    }

    #[tokio::test]
    async fn pipelined_frames_and_leftover_bytes() {
        let (a, mut b) = tokio::io::duplex(4096);
        let mut bytes = client_frame(0x81, b"one", true);
        let first = bytes.split_off(4);
        let mut rest = first;
        rest.extend(client_frame(0x81, b"two", true));
        rest.extend(client_frame(0x82, b"\x00\x01", true));
        b.write_all(&rest).await.unwrap();
        let mut server = WsConn::new(a, bytes, 1024);
        assert_eq!(server.read().await.unwrap(), Incoming::Text("one".into()));
        assert_eq!(server.read().await.unwrap(), Incoming::Text("two".into()));
        assert_eq!(server.read().await.unwrap(), Incoming::Binary(vec![0, 1]));
        assert_eq!(server.buffered_capacity(), 0);
    }

    #[tokio::test]
    async fn fragments_with_a_ping_between_them() {
        let (a, mut b) = tokio::io::duplex(4096);
        let mut server = WsConn::new(a, Vec::new(), 1024);
        let mut bytes = client_frame(0x01, "hé".as_bytes(), true);
        bytes.extend(client_frame(0x89, b"p", true));
        bytes.extend(client_frame(0x00, b"llo ", true));
        bytes.extend(client_frame(0x80, b"world", true));
        b.write_all(&bytes).await.unwrap();
        assert_eq!(server.read().await.unwrap(), Incoming::Ping(b"p".to_vec()));
        assert_eq!(
            server.read().await.unwrap(),
            Incoming::Text("héllo world".into())
        );
    }

    #[tokio::test]
    async fn ping_pong_and_close_handshake_with_tungstenite() {
        let (mut server, mut client) = pair(1024).await;
        client
            .send(Message::Ping(b"abc".to_vec().into()))
            .await
            .unwrap();
        let Incoming::Ping(p) = server.read().await.unwrap() else {
            panic!("expected a ping")
        };
        server.send_pong(&p).await.unwrap();
        server.send_ping().await.unwrap();
        // The client sees our pong, answers our ping on its own.
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::Pong(b"abc".to_vec().into())
        );
        assert!(matches!(
            client.next().await.unwrap().unwrap(),
            Message::Ping(_)
        ));
        client.flush().await.unwrap();
        assert_eq!(server.read().await.unwrap(), Incoming::Pong);
        client
            .close(Some(CloseFrame {
                code: CloseCode::Away,
                reason: "bye".into(),
            }))
            .await
            .unwrap();
        let Incoming::Close(Some((code, reason))) = server.read().await.unwrap() else {
            panic!("expected a close")
        };
        assert_eq!((code, reason.as_str()), (1001, "bye"));
        let closing = tokio::spawn(async move {
            server
                .answer_close(Some(code), Duration::from_secs(5))
                .await;
        });
        // The client gets the echo, then the end of the stream.
        let mut saw_close = false;
        while let Some(m) = client.next().await {
            match m {
                Ok(Message::Close(Some(f))) => {
                    assert_eq!(u16::from(f.code), 1001);
                    saw_close = true;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        assert!(saw_close);
        drop(client);
        closing.await.unwrap();
    }

    #[tokio::test]
    async fn oversized_message_is_refused_from_its_header() {
        let (mut server, mut client) = pair(4096).await;
        client.send(Message::text("y".repeat(8000))).await.unwrap();
        let err = server.read().await.unwrap_err();
        assert!(
            matches!(
                err,
                WsError::TooLarge {
                    size: 8000,
                    max: 4096
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.close_code(), Some(1009));
        let closing = tokio::spawn(async move {
            server
                .close(CLOSE_TOO_BIG, "frame too large", Duration::from_secs(5))
                .await;
        });
        let mut code = None;
        while let Some(Ok(m)) = client.next().await {
            if let Message::Close(Some(f)) = m {
                code = Some(u16::from(f.code));
            }
        }
        assert_eq!(code, Some(1009));
        drop(client);
        closing.await.unwrap();
    }

    #[tokio::test]
    async fn fragments_count_toward_the_limit() {
        let (a, mut b) = tokio::io::duplex(8192);
        let mut server = WsConn::new(a, Vec::new(), 100);
        let mut bytes = client_frame(0x01, &[b'a'; 60], true);
        bytes.extend(client_frame(0x80, &[b'b'; 60], true));
        b.write_all(&bytes).await.unwrap();
        assert!(matches!(
            server.read().await,
            Err(WsError::TooLarge {
                size: 120,
                max: 100
            })
        ));
    }

    #[tokio::test]
    async fn protocol_violations() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (client_frame(0x81, b"hi", false), CLOSE_PROTOCOL),
            (client_frame(0xC1, b"hi", true), CLOSE_PROTOCOL),
            (client_frame(0x83, b"hi", true), CLOSE_PROTOCOL),
            (client_frame(0x80, b"hi", true), CLOSE_PROTOCOL),
            (client_frame(0x09, b"hi", true), CLOSE_PROTOCOL),
            (client_frame(0x89, &[0; 126], true), CLOSE_PROTOCOL),
            (client_frame(0x88, &[3], true), CLOSE_PROTOCOL),
            (client_frame(0x88, &[0x03, 0xED], true), CLOSE_PROTOCOL),
            (client_frame(0x81, &[0xC3, 0x28], true), CLOSE_INVALID_DATA),
            (
                [
                    client_frame(0x01, b"a", true),
                    client_frame(0x81, b"b", true),
                ]
                .concat(),
                CLOSE_PROTOCOL,
            ),
        ];
        for (bytes, code) in cases {
            let (a, mut b) = tokio::io::duplex(4096);
            let mut server = WsConn::new(a, Vec::new(), 1024);
            b.write_all(&bytes).await.unwrap();
            let err = server.read().await.unwrap_err();
            assert_eq!(err.close_code(), Some(code), "{bytes:02x?}: {err:?}");
        }
    }

    #[tokio::test]
    async fn eof_and_partial_frames() {
        let (a, mut b) = tokio::io::duplex(4096);
        let mut server = WsConn::new(a, Vec::new(), 1024);
        let frame = client_frame(0x81, b"hello", true);
        b.write_all(&frame[..5]).await.unwrap();
        // Incomplete: the read waits (cancelled here) and keeps the bytes.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), server.read())
                .await
                .is_err()
        );
        b.write_all(&frame[5..]).await.unwrap();
        assert_eq!(server.read().await.unwrap(), Incoming::Text("hello".into()));
        drop(b);
        assert!(matches!(server.read().await, Err(WsError::Eof)));
    }

    #[test]
    fn encodes_lengths() {
        assert_eq!(encode(OP_TEXT, b"ab"), vec![0x81, 2, b'a', b'b']);
        let mid = encode(OP_TEXT, &[0; 300]);
        assert_eq!(&mid[..4], &[0x81, 126, 1, 44]);
        let big = encode(OP_BINARY, &[0; 70_000]);
        assert_eq!(&big[..2], &[0x82, 127]);
        assert_eq!(big.len(), 70_010);
        assert_eq!(encode(OP_PING, &[]), vec![0x89, 0]);
    }
}
