//! What the load generator puts on a connection and how it recognises one
//! whole response. Pollen and the echo floor share the Pollen framing (from
//! `dataplane::proto`); Redis speaks RESP.

use anyhow::{anyhow, bail};
use dataplane::proto::{
    decode_header, encode_frame, encode_header, flags, BlockId, BlockKey, Header, Limits, Opcode, Status,
    HEADER_LEN,
};

use crate::cli::Op;

/// One complete response at the front of a receive buffer.
#[derive(Debug)]
pub struct Parsed {
    /// Bytes the response occupies.
    pub len: usize,
    /// Request id it answers; `None` for in-order protocols (RESP).
    pub id: Option<u64>,
    /// `None` when the response is the expected success, else why not.
    pub error: Option<String>,
}

/// A request/response protocol as the load generator sees it. Requests are
/// pre-encoded per connection; only the id changes between sends.
pub trait Wire: Send + Sync {
    /// Appends the request for connection `conn` carrying `id` to `out`.
    fn encode(&self, conn: usize, id: u64, out: &mut Vec<u8>);
    /// Recognises one response at the start of `buf`: `Ok(None)` when more
    /// bytes are needed, `Err` when the stream cannot be parsed any further.
    fn parse(&self, buf: &[u8]) -> anyhow::Result<Option<Parsed>>;
    /// Largest response, to size receive buffers.
    fn max_response(&self) -> usize;
}

/// Pollen frames: `BlockRead`/`BlockWrite` on one block per connection.
pub struct FrameWire {
    op: Opcode,
    templates: Vec<Vec<u8>>,
    /// Body length of a successful response.
    ok_body: usize,
    limits: Limits,
}

impl FrameWire {
    /// Requests for `op` of `size` bytes, one per entry of `blocks`
    /// (connection `i` addresses `blocks[i]`).
    pub fn new(op: Op, size: usize, blocks: &[BlockId]) -> FrameWire {
        assert!(!blocks.is_empty());
        let (opcode, body, ok_body) = if op.read_pct() > 0 {
            (Opcode::BlockRead, Vec::new(), size)
        } else {
            (Opcode::BlockWrite, fill(size), 4)
        };
        let templates = blocks
            .iter()
            .map(|&block| {
                let key = BlockKey { block, offset: 0, len: size as u32 }.encode();
                let h = Header::request(opcode, 0, 0, key.len(), body.len());
                let mut v = Vec::with_capacity(h.frame_len());
                encode_frame(&mut v, &h, &key, &body);
                v
            })
            .collect();
        // A response is either the expected body or an error message (<= 256 bytes).
        FrameWire { op: opcode, templates, ok_body, limits: Limits::new(ok_body.max(4096)) }
    }

    pub fn request_len(&self) -> usize {
        self.templates[0].len()
    }

    pub fn response_len(&self) -> usize {
        HEADER_LEN + self.ok_body
    }
}

impl Wire for FrameWire {
    fn encode(&self, conn: usize, id: u64, out: &mut Vec<u8>) {
        let t = &self.templates[conn % self.templates.len()];
        let start = out.len();
        out.extend_from_slice(t);
        let h = Header::request(self.op, 0, id, BlockKey::LEN, t.len() - HEADER_LEN - BlockKey::LEN);
        encode_header(&h, &mut out[start..]);
    }

    fn parse(&self, buf: &[u8]) -> anyhow::Result<Option<Parsed>> {
        let h = match decode_header(buf, &self.limits, false) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(None),
            Err(e) => bail!("undecodable response header: {e}"),
        };
        let len = h.frame_len();
        if buf.len() < len {
            return Ok(None);
        }
        let body = &buf[HEADER_LEN + h.key_len as usize..len];
        let error = if h.status != Status::Ok as u16 {
            let name = h.status().map(|s| s.name()).unwrap_or("unknown status");
            Some(format!("status {} ({name}): {}", h.status, String::from_utf8_lossy(body)))
        } else if h.opcode != self.op as u8 {
            Some(format!("response opcode {:#04x}, expected {:#04x}", h.opcode, self.op as u8))
        } else if body.len() != self.ok_body {
            Some(format!("response body of {} bytes, expected {}", body.len(), self.ok_body))
        } else {
            None
        };
        if h.flags & flags::CLOSING != 0 {
            bail!("the server is closing the connection: {}", error.as_deref().unwrap_or("no reason given"));
        }
        Ok(Some(Parsed { len, id: Some(h.request_id), error }))
    }

    fn max_response(&self) -> usize {
        HEADER_LEN + self.limits.max_key + self.limits.max_body
    }
}

/// Pollen frames for the block workloads: every request picks a block of the
/// working set and a `size`-aligned offset inside it at random, and reads or
/// writes there (reads with probability `read_pct` %).
pub struct BlockWire {
    blocks: Vec<BlockId>,
    /// `size`-sized slots per block.
    slots: u32,
    size: usize,
    read_pct: u32,
    value: Vec<u8>,
    limits: Limits,
}

impl BlockWire {
    pub fn new(op: Op, size: usize, block_size: usize, blocks: Vec<BlockId>) -> BlockWire {
        assert!(!blocks.is_empty() && size > 0 && block_size.is_multiple_of(size));
        BlockWire {
            blocks,
            slots: (block_size / size) as u32,
            size,
            read_pct: op.read_pct(),
            value: fill(size),
            limits: Limits::new(size.max(4096)),
        }
    }

    /// Bytes of a read request (a write adds `size`).
    pub fn request_len(&self) -> usize {
        HEADER_LEN + BlockKey::LEN + if self.read_pct > 0 { 0 } else { self.size }
    }

    /// Bytes of a read response (a write's is 28).
    pub fn response_len(&self) -> usize {
        HEADER_LEN + if self.read_pct > 0 { self.size } else { 4 }
    }
}

/// SplitMix64: a well-mixed 64-bit hash, so (connection, request id) gives
/// an independent random choice per request without any shared state.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Wire for BlockWire {
    fn encode(&self, conn: usize, id: u64, out: &mut Vec<u8>) {
        let r = mix64(((conn as u64) << 44) ^ id);
        let block = self.blocks[((r >> 32) % self.blocks.len() as u64) as usize];
        let offset = ((r >> 8) as u32 % self.slots) * self.size as u32;
        let read = (((r & 0xFF) * 100) >> 8) < self.read_pct as u64;
        let key = BlockKey { block, offset, len: self.size as u32 }.encode();
        let (op, body): (Opcode, &[u8]) =
            if read { (Opcode::BlockRead, &[]) } else { (Opcode::BlockWrite, &self.value) };
        let h = Header::request(op, 0, id, key.len(), body.len());
        encode_frame(out, &h, &key, body);
    }

    fn parse(&self, buf: &[u8]) -> anyhow::Result<Option<Parsed>> {
        let h = match decode_header(buf, &self.limits, false) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(None),
            Err(e) => bail!("undecodable response header: {e}"),
        };
        let len = h.frame_len();
        if buf.len() < len {
            return Ok(None);
        }
        let body = &buf[HEADER_LEN + h.key_len as usize..len];
        let expect = if h.opcode == Opcode::BlockRead as u8 {
            Some(self.size)
        } else if h.opcode == Opcode::BlockWrite as u8 {
            Some(4)
        } else {
            None
        };
        let error = if h.status != Status::Ok as u16 {
            let name = h.status().map(|s| s.name()).unwrap_or("unknown status");
            Some(format!("status {} ({name}): {}", h.status, String::from_utf8_lossy(body)))
        } else if let Some(n) = expect.filter(|&n| n != body.len()) {
            Some(format!("response body of {} bytes, expected {n}", body.len()))
        } else if expect.is_none() {
            Some(format!("response opcode {:#04x}, expected a block read or write", h.opcode))
        } else {
            None
        };
        if h.flags & flags::CLOSING != 0 {
            bail!("the server is closing the connection: {}", error.as_deref().unwrap_or("no reason given"));
        }
        Ok(Some(Parsed { len, id: Some(h.request_id), error }))
    }

    fn max_response(&self) -> usize {
        HEADER_LEN + self.limits.max_key + self.limits.max_body
    }
}

/// RESP `GET`/`SET` of one key per connection.
pub struct RespWire {
    templates: Vec<Vec<u8>>,
    op: Op,
    size: usize,
}

/// The key connection `conn` uses.
pub fn redis_key(conn: usize) -> String {
    format!("pollen-bench:{conn}")
}

impl RespWire {
    pub fn new(op: Op, size: usize, conns: usize) -> RespWire {
        let value = fill(size);
        let templates = (0..conns)
            .map(|c| match op.read_pct() {
                0 => resp_command(&[b"SET", redis_key(c).as_bytes(), &value]),
                _ => resp_command(&[b"GET", redis_key(c).as_bytes()]),
            })
            .collect();
        RespWire { templates, op, size }
    }
}

/// A RESP array of bulk strings: how clients send commands.
pub fn resp_command(parts: &[&[u8]]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", parts.len()).into_bytes();
    for p in parts {
        v.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
        v.extend_from_slice(p);
        v.extend_from_slice(b"\r\n");
    }
    v
}

/// Position of the first `\r\n` in `buf`.
fn line_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

impl Wire for RespWire {
    fn encode(&self, conn: usize, _id: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.templates[conn % self.templates.len()]);
    }

    fn parse(&self, buf: &[u8]) -> anyhow::Result<Option<Parsed>> {
        let Some(&kind) = buf.first() else { return Ok(None) };
        if !matches!(kind, b'+' | b'-' | b'$') {
            bail!("unexpected RESP type byte {kind:#04x}");
        }
        // Header lines are short; a long run without CRLF means we are lost.
        let Some(eol) = line_end(&buf[..buf.len().min(128)]) else {
            if buf.len() >= 128 {
                bail!("RESP line longer than 128 bytes");
            }
            return Ok(None);
        };
        let line = &buf[1..eol];
        let text = || String::from_utf8_lossy(line).into_owned();
        match kind {
            b'+' => {
                let error = match (self.op.read_pct(), line) {
                    (0, b"OK") => None,
                    _ => Some(format!("unexpected reply +{}", text())),
                };
                Ok(Some(Parsed { len: eol + 2, id: None, error }))
            }
            b'-' => {
                Ok(Some(Parsed { len: eol + 2, id: None, error: Some(format!("redis error: {}", text())) }))
            }
            b'$' => {
                let n: i64 = std::str::from_utf8(line)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| anyhow!("bad bulk length {:?}", text()))?;
                if n < 0 {
                    return Ok(Some(Parsed {
                        len: eol + 2,
                        id: None,
                        error: Some("key not found (nil)".into()),
                    }));
                }
                let n = n as usize;
                if n > crate::cli::MAX_SIZE {
                    bail!("bulk reply of {n} bytes is larger than any value the bench stores");
                }
                let len = eol + 2 + n + 2;
                if buf.len() < len {
                    return Ok(None);
                }
                if &buf[len - 2..len] != b"\r\n" {
                    bail!("bulk reply not terminated by CRLF");
                }
                let error = match self.op.read_pct() {
                    100 if n == self.size => None,
                    _ => Some(format!("bulk reply of {n} bytes, expected {}", self.size)),
                };
                Ok(Some(Parsed { len, id: None, error }))
            }
            _ => bail!("unexpected RESP type byte {kind:#04x}"),
        }
    }

    fn max_response(&self) -> usize {
        self.size + 64
    }
}

/// Deterministic, non-zero value bytes (so a short or misplaced read is visible).
pub fn fill(size: usize) -> Vec<u8> {
    (0..size).map(|i| b'a' + (i % 26) as u8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_requests_carry_their_id_and_parse_responses() {
        let w = FrameWire::new(Op::Get, 1024, &[BlockId(7), BlockId(9)]);
        let mut out = Vec::new();
        w.encode(1, 42, &mut out);
        assert_eq!(out.len(), HEADER_LEN + 16);
        let h = decode_header(&out, &Limits::new(1 << 20), true).unwrap().unwrap();
        assert_eq!((h.request_id, h.opcode, h.key_len, h.body_len), (42, Opcode::BlockRead as u8, 16, 0));
        assert_eq!(BlockKey::decode(&out[HEADER_LEN..]).unwrap().block, BlockId(9));

        let mut resp = Vec::new();
        let rh = Header {
            opcode: Opcode::BlockRead as u8,
            flags: 0,
            status: 0,
            request_id: 42,
            key_len: 0,
            body_len: 1024,
        };
        encode_frame(&mut resp, &rh, &[], &fill(1024));
        assert!(w.parse(&resp[..100]).unwrap().is_none());
        let p = w.parse(&resp).unwrap().unwrap();
        assert_eq!((p.len, p.id, p.error.is_none()), (resp.len(), Some(42), true));

        let mut err = Vec::new();
        let eh = Header { status: Status::NotFound as u16, body_len: 5, ..rh };
        encode_frame(&mut err, &eh, &[], b"stale");
        assert!(w.parse(&err).unwrap().unwrap().error.unwrap().contains("not found"));
        assert!(w.parse(&[0u8; 24]).is_err());
    }

    #[test]
    fn put_frames_carry_the_value() {
        let w = FrameWire::new(Op::Put, 100, &[BlockId(1)]);
        let mut out = Vec::new();
        w.encode(0, 1, &mut out);
        assert_eq!(out.len(), HEADER_LEN + 16 + 100);
        assert_eq!(w.response_len(), HEADER_LEN + 4);
    }

    #[test]
    fn block_requests_spread_over_blocks_offsets_and_ops() {
        let blocks: Vec<BlockId> = (0..8).map(BlockId).collect();
        let w = BlockWire::new(Op::Mixed, 4096, 65536, blocks);
        let (mut reads, mut seen_blocks, mut seen_offsets) = (0, [false; 8], [false; 16]);
        for id in 0..2000u64 {
            let mut out = Vec::new();
            w.encode((id % 3) as usize, id, &mut out);
            let h = decode_header(&out, &Limits::new(1 << 20), true).unwrap().unwrap();
            assert_eq!(h.request_id, id);
            let k = BlockKey::decode(&out[HEADER_LEN..HEADER_LEN + 16]).unwrap();
            assert_eq!(k.len, 4096);
            assert_eq!(k.offset % 4096, 0);
            seen_blocks[k.block.0 as usize] = true;
            seen_offsets[(k.offset / 4096) as usize] = true;
            if h.opcode == Opcode::BlockRead as u8 {
                reads += 1;
                assert_eq!(out.len(), HEADER_LEN + 16);
            } else {
                assert_eq!(out.len(), HEADER_LEN + 16 + 4096);
            }
        }
        assert!(seen_blocks.iter().all(|&b| b) && seen_offsets.iter().all(|&b| b));
        assert!((1250..1550).contains(&reads), "{reads} reads of 2000, expected about 70%");
        // Responses of either kind parse.
        let mut resp = Vec::new();
        let rh = Header {
            opcode: Opcode::BlockWrite as u8,
            flags: 0,
            status: 0,
            request_id: 3,
            key_len: 0,
            body_len: 4,
        };
        encode_frame(&mut resp, &rh, &[], &[0, 16, 0, 0]);
        assert!(w.parse(&resp).unwrap().unwrap().error.is_none());
        let reads_only = BlockWire::new(Op::Randread, 65536, 65536, vec![BlockId(1)]);
        assert_eq!(reads_only.response_len(), HEADER_LEN + 65536);
    }

    #[test]
    fn resp_replies() {
        let g = RespWire::new(Op::Get, 3, 2);
        let mut out = Vec::new();
        g.encode(1, 0, &mut out);
        assert_eq!(out, b"*2\r\n$3\r\nGET\r\n$14\r\npollen-bench:1\r\n");
        assert!(g.parse(b"$3\r\nab").unwrap().is_none());
        let p = g.parse(b"$3\r\nabc\r\n+OK").unwrap().unwrap();
        assert_eq!((p.len, p.error.is_none()), (9, true));
        assert!(g.parse(b"$-1\r\n").unwrap().unwrap().error.is_some());
        assert!(g.parse(b"-ERR x\r\n").unwrap().unwrap().error.is_some());
        assert!(g.parse(b"?").is_err());
        let s = RespWire::new(Op::Put, 3, 1);
        assert!(s.parse(b"+OK\r\n").unwrap().unwrap().error.is_none());
    }
}
