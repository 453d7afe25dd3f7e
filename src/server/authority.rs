//! Unix-socket clients name the server by something that is not a valid
//! HTTP authority: grpcio's `unix:` target sends `:authority` =
//! `tmp%2Fodin.sock`, grpcurl `-unix` sends `/tmp/odin.sock`. hyper's HTTP/2
//! layer (h2) answers such a request with RST_STREAM PROTOCOL_ERROR before
//! any service sees it, so those clients could not call a sidecar on a
//! socket at all.
//!
//! On Unix-socket connections only, this reader rewrites the value of
//! `:authority` in the client's HEADERS, before h2 reads them: every byte
//! that may not appear in an authority becomes `x`. The length stays the
//! same, so both ends' HPACK dynamic tables keep the same sizes and every
//! later index still points at the same entry. On a socket the authority
//! names nothing the server uses. Anything it cannot parse is passed on
//! untouched, for h2 to judge.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Largest frame this reader writes (HTTP/2's default SETTINGS_MAX_FRAME_SIZE).
const MAX_FRAME: usize = 16_384;
/// A header block larger than this is passed on unrewritten.
const MAX_BLOCK: usize = 256 * 1024;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// A byte stream whose client HEADERS get a valid `:authority`.
#[derive(Debug)]
pub struct AuthorityFix<IO> {
    io: IO,
    // Bytes read from `io`, not yet processed.
    inbound: Vec<u8>,
    // Processed bytes for the reader.
    ready: Vec<u8>,
    preface_left: usize,
    // A header block spread over HEADERS and CONTINUATION frames.
    pending: Option<Pending>,
}

#[derive(Debug)]
struct Pending {
    stream: [u8; 4],
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

impl<IO> AuthorityFix<IO> {
    /// Wraps a freshly accepted connection.
    pub fn new(io: IO) -> AuthorityFix<IO> {
        AuthorityFix {
            io,
            inbound: Vec::new(),
            ready: Vec::new(),
            preface_left: PREFACE.len(),
            pending: None,
        }
    }

    /// Moves every complete frame in `inbound` to `ready`, rewritten.
    fn process(&mut self) {
        if self.preface_left > 0 {
            let n = self.preface_left.min(self.inbound.len());
            self.ready.extend(self.inbound.drain(..n));
            self.preface_left -= n;
        }
        loop {
            if self.inbound.len() < 9 {
                return;
            }
            let len = usize::from(self.inbound[0]) << 16
                | usize::from(self.inbound[1]) << 8
                | usize::from(self.inbound[2]);
            if self.inbound.len() < 9 + len {
                return;
            }
            let frame: Vec<u8> = self.inbound.drain(..9 + len).collect();
            self.frame(frame);
        }
    }

    fn frame(&mut self, frame: Vec<u8>) {
        let (kind, flags) = (frame[3], frame[4]);
        let stream = [frame[5], frame[6], frame[7], frame[8]];
        let payload = &frame[9..];
        match kind {
            HEADERS if self.pending.is_none() => {
                let Some((priority, fragment)) = headers_fragment(flags, payload) else {
                    return self.ready.extend(frame);
                };
                let pending = Pending {
                    stream,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                    block: fragment.to_vec(),
                };
                if flags & END_HEADERS != 0 {
                    self.emit(pending);
                } else {
                    self.pending = Some(pending);
                }
            }
            CONTINUATION if self.pending.as_ref().is_some_and(|p| p.stream == stream) => {
                let Some(mut pending) = self.pending.take() else {
                    return;
                };
                pending.block.extend_from_slice(payload);
                if pending.block.len() > MAX_BLOCK {
                    // Too large to hold: hand it on as it came.
                    self.emit_raw(&pending, flags & END_HEADERS != 0);
                } else if flags & END_HEADERS != 0 {
                    self.emit(pending);
                } else {
                    self.pending = Some(pending);
                }
            }
            _ => self.ready.extend(frame),
        }
    }

    /// Writes a whole header block as HEADERS (+ CONTINUATION) frames.
    fn emit(&mut self, mut pending: Pending) {
        pending.block = rewrite(&pending.block).unwrap_or(pending.block);
        self.emit_raw(&pending, true);
    }

    fn emit_raw(&mut self, pending: &Pending, end_headers: bool) {
        let mut first = Vec::new();
        if let Some(p) = pending.priority {
            first.extend_from_slice(&p);
        }
        let room = MAX_FRAME - first.len();
        let split = pending.block.len().min(room);
        first.extend_from_slice(&pending.block[..split]);
        let rest: Vec<&[u8]> = pending.block[split..].chunks(MAX_FRAME).collect();
        let mut flags = 0;
        if pending.end_stream {
            flags |= END_STREAM;
        }
        if pending.priority.is_some() {
            flags |= PRIORITY;
        }
        if rest.is_empty() && end_headers {
            flags |= END_HEADERS;
        }
        self.write_frame(HEADERS, flags, pending.stream, &first);
        for (i, chunk) in rest.iter().enumerate() {
            let last = i + 1 == rest.len() && end_headers;
            let flags = if last { END_HEADERS } else { 0 };
            self.write_frame(CONTINUATION, flags, pending.stream, chunk);
        }
    }

    fn write_frame(&mut self, kind: u8, flags: u8, stream: [u8; 4], payload: &[u8]) {
        let len = payload.len();
        self.ready.extend_from_slice(&[
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
        ]);
        self.ready.extend_from_slice(&stream);
        self.ready.extend_from_slice(payload);
    }
}

/// The priority fields and header block fragment of a HEADERS payload,
/// padding removed; `None` if the frame is malformed.
fn headers_fragment(flags: u8, payload: &[u8]) -> Option<(Option<[u8; 5]>, &[u8])> {
    let mut body = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        pad = usize::from(*body.first()?);
        body = body.get(1..)?;
    }
    let priority = if flags & PRIORITY != 0 {
        let p: [u8; 5] = body.get(..5)?.try_into().ok()?;
        body = body.get(5..)?;
        Some(p)
    } else {
        None
    };
    let end = body.len().checked_sub(pad)?;
    Some((priority, &body[..end]))
}

/// The header block with `:authority` values made valid; `None` when the
/// block cannot be parsed (then it is passed on as it is).
fn rewrite(block: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(block.len() + 16);
    let mut i = 0;
    while i < block.len() {
        let b = block[i];
        let prefix = if b & 0x80 != 0 {
            // Indexed header field: nothing to rewrite.
            let (_, n) = integer(&block[i..], 7)?;
            out.extend_from_slice(&block[i..i + n]);
            i += n;
            continue;
        } else if b & 0xC0 == 0x40 {
            6 // literal with incremental indexing
        } else if b & 0xE0 == 0x20 {
            // Dynamic table size update.
            let (_, n) = integer(&block[i..], 5)?;
            out.extend_from_slice(&block[i..i + n]);
            i += n;
            continue;
        } else {
            4 // literal without indexing, or never indexed
        };
        let (name_index, n) = integer(&block[i..], prefix)?;
        out.extend_from_slice(&block[i..i + n]);
        i += n;
        // Static index 1 is ":authority".
        let mut authority = name_index == 1;
        if name_index == 0 {
            let (name, n) = string(&block[i..])?;
            authority = name == b":authority";
            out.extend_from_slice(&block[i..i + n]);
            i += n;
        }
        let (value, n) = string(&block[i..])?;
        let fixed: Vec<u8> = value.iter().map(|c| authority_byte(*c)).collect();
        if authority && fixed != value {
            // Same decoded length, written as a plain (non-Huffman) string.
            push_integer(&mut out, 0x00, 7, fixed.len());
            out.extend_from_slice(&fixed);
        } else {
            out.extend_from_slice(&block[i..i + n]);
        }
        i += n;
    }
    Some(out)
}

/// `c`, or `x` when `c` may not appear in an HTTP authority.
fn authority_byte(c: u8) -> u8 {
    if c.is_ascii_alphanumeric() || b"-._~:[]".contains(&c) {
        c
    } else {
        b'x'
    }
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541, 5.1): its value and
/// the bytes it took.
fn integer(bytes: &[u8], n: u32) -> Option<(usize, usize)> {
    let max = (1usize << n) - 1;
    let mut value = usize::from(*bytes.first()?) & max;
    if value < max {
        return Some((value, 1));
    }
    let mut shift = 0u32;
    for (k, b) in bytes.iter().enumerate().skip(1) {
        value = value.checked_add(usize::from(b & 0x7F).checked_shl(shift)?)?;
        if b & 0x80 == 0 {
            return Some((value, k + 1));
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
    None
}

fn push_integer(out: &mut Vec<u8>, first: u8, n: u32, value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 0x80 {
        out.push((rest & 0x7F) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// An HPACK string literal (RFC 7541, 5.2): its decoded octets and the
/// bytes it took.
fn string(bytes: &[u8]) -> Option<(Vec<u8>, usize)> {
    let huffman = *bytes.first()? & 0x80 != 0;
    let (len, n) = integer(bytes, 7)?;
    let raw = bytes.get(n..n.checked_add(len)?)?;
    let value = if huffman {
        let mut decoded = Vec::with_capacity(len * 2);
        httlib_huffman::decode(raw, &mut decoded, httlib_huffman::DecoderSpeed::FourBits).ok()?;
        decoded
    } else {
        raw.to_vec()
    };
    Some((value, n + len))
}

impl<IO: AsyncRead + Unpin> AsyncRead for AuthorityFix<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.drain(..n);
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.io).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    // End of stream: hand on whatever is left as it is.
                    if this.inbound.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    this.ready.append(&mut this.inbound);
                }
                Poll::Ready(Ok(())) => {
                    this.inbound.extend_from_slice(read.filled());
                    this.process();
                }
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn literal(name_index: u8, value: &[u8]) -> Vec<u8> {
        // Literal with incremental indexing, indexed name, plain value.
        let mut b = vec![0x40 | name_index];
        push_integer(&mut b, 0, 7, value.len());
        b.extend_from_slice(value);
        b
    }

    #[test]
    fn integers_round_trip() {
        for (n, v) in [(5, 10), (5, 31), (5, 1337), (7, 127), (7, 300_000)] {
            let mut b = Vec::new();
            push_integer(&mut b, 0, n, v);
            assert_eq!(integer(&b, n), Some((v, b.len())), "{n} {v}");
        }
        // RFC 7541 C.1.2: 1337 with a 5-bit prefix.
        assert_eq!(integer(&[0x1f, 0x9a, 0x0a], 5), Some((1337, 3)));
    }

    #[test]
    fn a_socket_path_authority_becomes_valid_with_the_same_length() {
        let mut block = vec![0x82]; // :method GET, indexed
        block.extend(literal(1, b"/tmp/odin.sock"));
        block.extend(literal(4, b"/odin.v1.Detector/Detect")); // :path stays
        let out = rewrite(&block).expect("parses");
        let mut want = vec![0x82];
        want.extend(literal(1, b"xtmpxodin.sock"));
        want.extend(literal(4, b"/odin.v1.Detector/Detect"));
        assert_eq!(out, want);
    }

    #[test]
    fn a_huffman_coded_authority_is_decoded_and_written_plain() {
        let mut coded = Vec::new();
        httlib_huffman::encode(b"tmp%2Fodin.sock", &mut coded).expect("encodes");
        let mut block = vec![0x41];
        push_integer(&mut block, 0x80, 7, coded.len());
        block.extend(&coded);
        let out = rewrite(&block).expect("parses");
        assert_eq!(out, literal(1, b"tmpx2Fodin.sock"));
    }

    #[test]
    fn valid_authorities_and_unparsable_blocks_pass_unchanged() {
        let block = literal(1, b"localhost:50051");
        assert_eq!(rewrite(&block).as_deref(), Some(&block[..]));
        assert_eq!(rewrite(&[0x41, 0x7f]), None, "a truncated block");
    }

    #[test]
    fn frames_are_rewritten_across_continuations_and_reads() {
        let mut fix = AuthorityFix::new(tokio::io::empty());
        let block = literal(1, b"/tmp/s");
        let mut wire = PREFACE.to_vec();
        // HEADERS (no END_HEADERS) carrying half the block, then CONTINUATION.
        let (a, b) = block.split_at(3);
        for (kind, flags, part) in [(HEADERS, END_STREAM, a), (CONTINUATION, END_HEADERS, b)] {
            let len = part.len();
            wire.extend([
                (len >> 16) as u8,
                (len >> 8) as u8,
                len as u8,
                kind,
                flags,
                0,
                0,
                0,
                1,
            ]);
            wire.extend(part);
        }
        for byte in wire {
            fix.inbound.push(byte);
            fix.process();
        }
        let mut want = PREFACE.to_vec();
        let fixed = literal(1, b"xtmpxs");
        want.extend([
            0,
            0,
            fixed.len() as u8,
            HEADERS,
            END_STREAM | END_HEADERS,
            0,
            0,
            0,
            1,
        ]);
        want.extend(&fixed);
        assert_eq!(fix.ready, want);
    }
}
