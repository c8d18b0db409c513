//! Accepting gRPC clients that send a unix socket's path as `:authority`.
//!
//! grpc-go (kubelet, the sidecars) sends `localhost` on unix sockets, but
//! gRPC's C core (Python's grpcio, C++, Ruby) sends the percent-encoded
//! socket path and grpc-java the raw path. Neither is a valid URI
//! authority, and the HTTP/2 layer under tonic refuses such a request with
//! RST_STREAM(PROTOCOL_ERROR) before our code sees it. On a unix socket the
//! authority means nothing (there is no host to route by), so this module
//! sits between the socket and the HTTP/2 server and, only on connections
//! that need it, rewrites the authority to `localhost`.
//!
//! How: client → server bytes are read frame by frame. The first header
//! block decides the connection's mode:
//! - its authority is valid (or absent): every byte from then on passes
//!   through untouched, with no further parsing (grpc-go's case: no cost
//!   beyond reading the first block);
//! - it is not: every header block of the connection is decoded with an
//!   HPACK decoder that follows the client's dynamic table, the authority
//!   replaced, and re-encoded as literals that never touch the server's
//!   dynamic table (so the two tables cannot drift apart). Other frames
//!   pass through unchanged.
//!
//! Server → client bytes are never touched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the HTTP/2 client connection preface is (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame payload the server accepts (its SETTINGS_MAX_FRAME_SIZE
/// is the protocol's default) and so the largest we may send it.
const MAX_FRAME: usize = 16_384;
/// The server's SETTINGS_HEADER_TABLE_SIZE (the default): the most a client
/// may grow its encoder's dynamic table to.
const HEADER_TABLE_SIZE: usize = 4096;
/// What the authority becomes.
const REPLACEMENT: &[u8] = b"localhost";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before the first header block.
    Undecided,
    /// Everything passes through unread.
    Passthrough,
    /// Header blocks are rewritten.
    Rewrite,
}

/// A server-side connection whose incoming header blocks carry an authority
/// the HTTP/2 server accepts. See the module comment.
pub struct AuthorityFix<S> {
    inner: S,
    mode: Mode,
    /// Bytes read from the client, not yet parsed.
    pending: Vec<u8>,
    /// Bytes ready for the server, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
    /// Whether the preface has been passed on.
    preface_done: bool,
    /// A header block being gathered across CONTINUATION frames: the first
    /// frame's header (with the priority bytes) and the fragments so far.
    block: Option<OpenBlock>,
    decoder: loona_hpack::Decoder<'static>,
    eof: bool,
}

struct OpenBlock {
    stream_id: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// The original frames, byte for byte, for when the block passes through.
    original: Vec<u8>,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        AuthorityFix {
            inner,
            mode: Mode::Undecided,
            pending: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            preface_done: false,
            block: None,
            decoder,
            eof: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Parses what `pending` holds into `out`, as far as whole frames go.
    fn process(&mut self) -> io::Result<()> {
        if !self.preface_done {
            if self.pending.len() < PREFACE.len() {
                return Ok(());
            }
            // A connection that does not open with the preface is not ours
            // to judge: the server will refuse it.
            self.preface_done = true;
            self.out.extend(self.pending.drain(..PREFACE.len()));
        }
        loop {
            if self.mode == Mode::Passthrough {
                self.out.append(&mut self.pending);
                return Ok(());
            }
            if self.pending.len() < FRAME_HEADER {
                return Ok(());
            }
            let length =
                u32::from_be_bytes([0, self.pending[0], self.pending[1], self.pending[2]]) as usize;
            if self.pending.len() < FRAME_HEADER + length {
                if length > MAX_FRAME {
                    // Too large for the server anyway: hand it on as is and
                    // let the server answer FRAME_SIZE_ERROR.
                    self.mode = Mode::Passthrough;
                }
                return Ok(());
            }
            let frame: Vec<u8> = self.pending.drain(..FRAME_HEADER + length).collect();
            self.frame(frame)?;
        }
    }

    fn frame(&mut self, frame: Vec<u8>) -> io::Result<()> {
        let kind = frame[3];
        let flags = frame[4];
        let stream_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[FRAME_HEADER..];
        match (kind, self.block.as_mut()) {
            (HEADERS, None) => {
                let mut body = payload;
                let mut pad = 0usize;
                if flags & PADDED != 0 {
                    let Some((&p, rest)) = body.split_first() else {
                        return self.pass_on(frame);
                    };
                    pad = p as usize;
                    body = rest;
                }
                let mut priority = None;
                if flags & PRIORITY != 0 {
                    if body.len() < 5 {
                        return self.pass_on(frame);
                    }
                    priority = Some(body[..5].try_into().expect("5 bytes"));
                    body = &body[5..];
                }
                if pad > body.len() {
                    return self.pass_on(frame);
                }
                let fragment = body[..body.len() - pad].to_vec();
                self.block =
                    Some(OpenBlock { stream_id, flags, priority, fragment, original: Vec::new() });
                self.block.as_mut().expect("just set").original.extend_from_slice(&frame);
                if flags & END_HEADERS != 0 {
                    self.finish_block()?;
                }
                Ok(())
            }
            (CONTINUATION, Some(block)) if block.stream_id == stream_id => {
                block.fragment.extend_from_slice(payload);
                block.original.extend_from_slice(&frame);
                if flags & END_HEADERS != 0 {
                    self.finish_block()?;
                }
                Ok(())
            }
            // Anything else inside an open block is a protocol error the
            // server reports; we only keep the byte order.
            (_, Some(_)) => {
                let block = self.block.take().expect("open block");
                self.out.extend_from_slice(&block.original);
                self.mode = Mode::Passthrough;
                self.pass_on(frame)
            }
            _ => self.pass_on(frame),
        }
    }

    fn pass_on(&mut self, frame: Vec<u8>) -> io::Result<()> {
        self.out.extend_from_slice(&frame);
        Ok(())
    }

    fn finish_block(&mut self) -> io::Result<()> {
        let block = self.block.take().expect("open block");
        let headers = match self.decoder.decode(&block.fragment) {
            Ok(h) => h,
            Err(_) if self.mode == Mode::Undecided => {
                // Not ours to judge: the server's own decoder reports it.
                self.mode = Mode::Passthrough;
                self.out.extend_from_slice(&block.original);
                return Ok(());
            }
            Err(e) => {
                // The client's table and ours no longer agree; nothing
                // sound can follow.
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("undecodable HTTP/2 header block: {e:?}"),
                ));
            }
        };
        if self.mode == Mode::Undecided {
            let bad = headers.iter().any(|(n, v)| n == b":authority" && !valid_authority(v));
            if !bad {
                self.mode = Mode::Passthrough;
                self.out.extend_from_slice(&block.original);
                return Ok(());
            }
            tracing::debug!("client sent a socket path as :authority; rewriting it");
            self.mode = Mode::Rewrite;
        }
        let mut encoded = Vec::with_capacity(block.fragment.len() * 2);
        for (name, value) in &headers {
            let value = if name == b":authority" && !valid_authority(value) {
                REPLACEMENT
            } else {
                value.as_slice()
            };
            encode_never_indexed(&mut encoded, name, value);
        }
        self.write_block(&block, &encoded);
        Ok(())
    }

    /// Writes a header block as HEADERS (+ CONTINUATION) frames within the
    /// server's frame size, without padding.
    fn write_block(&mut self, block: &OpenBlock, encoded: &[u8]) {
        let mut first = Vec::with_capacity(5 + encoded.len());
        if let Some(p) = block.priority {
            first.extend_from_slice(&p);
        }
        let room = MAX_FRAME - first.len();
        let (head, mut rest) = encoded.split_at(encoded.len().min(room));
        first.extend_from_slice(head);
        let keep = block.flags & (END_STREAM | PRIORITY);
        let end = if rest.is_empty() { END_HEADERS } else { 0 };
        push_frame(&mut self.out, HEADERS, keep | end, block.stream_id, &first);
        while !rest.is_empty() {
            let (chunk, more) = rest.split_at(rest.len().min(MAX_FRAME));
            let end = if more.is_empty() { END_HEADERS } else { 0 };
            push_frame(&mut self.out, CONTINUATION, end, block.stream_id, chunk);
            rest = more;
        }
    }
}

/// Whether the HTTP/2 server accepts `value` as an authority.
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

fn push_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("frame within MAX_FRAME").to_be_bytes();
    out.extend_from_slice(&len[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream_id.to_be_bytes());
    out.extend_from_slice(payload);
}

/// One header as a "literal never indexed, new name" representation
/// (RFC 7541 §6.2.3), strings without Huffman coding: it adds nothing to
/// the receiver's dynamic table.
fn encode_never_indexed(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x10);
    encode_string(out, name);
    encode_string(out, value);
}

fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    // Writing into a Vec cannot fail. H bit clear: no Huffman coding.
    let _ = loona_hpack::encoder::encode_integer_into(s.len(), 7, 0, out);
    out.extend_from_slice(s);
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.out_pos < this.out.len() {
                let n = (this.out.len() - this.out_pos).min(buf.remaining());
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // What is left is an incomplete frame: hand it on, the
                // server sees the truncation as it would have.
                if !this.pending.is_empty() || this.block.is_some() {
                    if let Some(block) = this.block.take() {
                        this.out.extend_from_slice(&block.original);
                    }
                    this.out.append(&mut this.pending);
                    continue;
                }
                return Poll::Ready(Ok(()));
            }
            if this.mode == Mode::Passthrough && this.pending.is_empty() {
                // The fast path: straight into the caller's buffer.
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => this.eof = true,
                Poll::Ready(Ok(())) => {
                    this.pending.extend_from_slice(read.filled());
                    this.process()?;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What a client writes: the preface, then HEADERS frames of the given
    /// blocks (HPACK-encoded by the caller), each on its own stream.
    fn client_bytes(blocks: &[Vec<u8>]) -> Vec<u8> {
        let mut out = PREFACE.to_vec();
        // A SETTINGS frame and a DATA frame pass through untouched.
        push_frame(&mut out, 0x4, 0, 0, &[]);
        for (i, block) in blocks.iter().enumerate() {
            let stream = 1 + 2 * i as u32;
            push_frame(&mut out, HEADERS, END_HEADERS, stream, block);
            push_frame(&mut out, 0x0, END_STREAM, stream, b"\0\0\0\0\0");
        }
        out
    }

    async fn through_fix(bytes: Vec<u8>) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            // Small writes: frames arrive split at every point.
            for piece in bytes.chunks(7) {
                client.write_all(piece).await.unwrap();
            }
        });
        let mut fixed = AuthorityFix::new(server);
        let mut out = Vec::new();
        fixed.read_to_end(&mut out).await.unwrap();
        writer.await.unwrap();
        out
    }

    /// The header blocks of a byte stream, decoded as the server would.
    fn server_view(bytes: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        assert!(bytes.starts_with(PREFACE));
        let mut rest = &bytes[PREFACE.len()..];
        let mut decoder = loona_hpack::Decoder::new();
        let mut blocks = Vec::new();
        let mut fragment = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let (kind, flags) = (rest[3], rest[4]);
            let payload = &rest[FRAME_HEADER..FRAME_HEADER + len];
            if kind == HEADERS || kind == CONTINUATION {
                fragment.extend_from_slice(payload);
                if flags & END_HEADERS != 0 {
                    blocks.push(decoder.decode(&fragment).unwrap());
                    fragment.clear();
                }
            }
            rest = &rest[FRAME_HEADER + len..];
        }
        blocks
    }

    fn request(authority: &str, path: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", authority)]
            .iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    fn encode(encoder: &mut loona_hpack::Encoder, headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        encoder.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
    }

    #[tokio::test]
    async fn a_socket_path_authority_becomes_localhost_on_every_request() {
        // grpcio's form, then again on the same connection: the second block
        // refers to the first through the client's dynamic table.
        let mut enc = loona_hpack::Encoder::new();
        let first = request("%2Frun%2Fcsi.sock", "/csi.v1.Identity/Probe");
        let second = request("%2Frun%2Fcsi.sock", "/csi.v1.Identity/GetPluginInfo");
        let blocks = vec![encode(&mut enc, &first), encode(&mut enc, &second)];
        let out = through_fix(client_bytes(&blocks)).await;
        let seen = server_view(&out);
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0], request("localhost", "/csi.v1.Identity/Probe"));
        assert_eq!(seen[1], request("localhost", "/csi.v1.Identity/GetPluginInfo"));
        assert!(valid_authority(b"localhost") && !valid_authority(b"/run/csi.sock"));
    }

    #[tokio::test]
    async fn a_valid_authority_passes_through_byte_for_byte() {
        let mut enc = loona_hpack::Encoder::new();
        let blocks = vec![
            encode(&mut enc, &request("localhost", "/csi.v1.Identity/Probe")),
            encode(&mut enc, &request("localhost", "/csi.v1.Node/NodeGetInfo")),
        ];
        let bytes = client_bytes(&blocks);
        assert_eq!(through_fix(bytes.clone()).await, bytes);
    }

    #[tokio::test]
    async fn large_blocks_are_split_within_the_frame_size() {
        let mut enc = loona_hpack::Encoder::new();
        let mut headers = request("/run/csi.sock", "/csi.v1.Controller/CreateVolume");
        headers.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
        let mut block = encode(&mut enc, &headers);
        // Sent as HEADERS + CONTINUATION by the client too.
        let mut bytes = PREFACE.to_vec();
        let tail = block.split_off(MAX_FRAME);
        push_frame(&mut bytes, HEADERS, 0, 1, &block);
        for chunk in tail.chunks(MAX_FRAME) {
            let last = chunk.as_ptr_range().end == tail.as_ptr_range().end;
            push_frame(&mut bytes, CONTINUATION, if last { END_HEADERS } else { 0 }, 1, chunk);
        }
        let out = through_fix(bytes).await;
        let mut expected = request("localhost", "/csi.v1.Controller/CreateVolume");
        expected.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
        assert_eq!(server_view(&out), vec![expected]);
    }
}
