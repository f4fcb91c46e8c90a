//! Frame header encoding and validation. Validation happens on the 24 header
//! bytes alone, so a frame is rejected before its key or body is buffered.

use super::{flags, Opcode, Status, HEADER_LEN, MAGIC, MAX_KEY_LEN, VERSION};

/// Size limits a decoder enforces before it buffers a frame's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_key: usize,
    pub max_body: usize,
}

impl Limits {
    pub fn new(max_body: usize) -> Self {
        Limits { max_key: MAX_KEY_LEN, max_body }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub opcode: u8,
    pub flags: u16,
    pub status: u16,
    pub request_id: u64,
    pub key_len: u16,
    pub body_len: u32,
}

impl Header {
    pub fn request(op: Opcode, flags: u16, request_id: u64, key_len: usize, body_len: usize) -> Self {
        debug_assert!(key_len <= u16::MAX as usize);
        debug_assert!(body_len <= u32::MAX as usize);
        Header {
            opcode: op as u8,
            flags,
            status: 0,
            request_id,
            key_len: key_len as u16,
            body_len: body_len as u32,
        }
    }

    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.key_len as usize + self.body_len as usize
    }

    pub fn op(&self) -> Option<Opcode> {
        Opcode::from_u8(self.opcode)
    }

    pub fn status(&self) -> Option<Status> {
        Status::from_u16(self.status)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {0:#06x}")]
    BadMagic(u16),
    #[error("unsupported protocol version {0}")]
    BadVersion(u8),
    #[error("unknown opcode {0:#04x}")]
    BadOpcode(u8),
    #[error("reserved header bytes are not zero")]
    Reserved,
    #[error("unknown flag bits {0:#06x}")]
    BadFlags(u16),
    #[error("a request carries status {0}")]
    StatusInRequest(u16),
    #[error("key of {len} bytes exceeds the limit of {max}")]
    KeyTooLarge { len: usize, max: usize },
    #[error("body of {len} bytes exceeds the limit of {max}")]
    BodyTooLarge { len: usize, max: usize },
}

impl FrameError {
    pub fn status(&self) -> Status {
        match self {
            FrameError::KeyTooLarge { .. } | FrameError::BodyTooLarge { .. } => Status::TooLarge,
            _ => Status::Malformed,
        }
    }
}

/// Writes a header into the first 24 bytes of `out`.
pub fn encode_header(h: &Header, out: &mut [u8]) {
    assert!(out.len() >= HEADER_LEN);
    out[0..2].copy_from_slice(&MAGIC.to_le_bytes());
    out[2] = VERSION;
    out[3] = h.opcode;
    out[4..6].copy_from_slice(&h.flags.to_le_bytes());
    out[6..8].copy_from_slice(&h.status.to_le_bytes());
    out[8..16].copy_from_slice(&h.request_id.to_le_bytes());
    out[16..18].copy_from_slice(&h.key_len.to_le_bytes());
    out[18..20].copy_from_slice(&0u16.to_le_bytes());
    out[20..24].copy_from_slice(&h.body_len.to_le_bytes());
}

/// Appends a whole frame (header, key, body) to `out`.
pub fn encode_frame(out: &mut Vec<u8>, h: &Header, key: &[u8], body: &[u8]) {
    debug_assert_eq!(h.key_len as usize, key.len());
    debug_assert_eq!(h.body_len as usize, body.len());
    let start = out.len();
    out.resize(start + HEADER_LEN, 0);
    encode_header(h, &mut out[start..]);
    out.extend_from_slice(key);
    out.extend_from_slice(body);
}

/// Decodes and validates a header. `request` selects the request rules
/// (known flag bits only, zero status); responses may carry any status.
/// Returns `Ok(None)` when fewer than 24 bytes are available.
pub fn decode_header(buf: &[u8], limits: &Limits, request: bool) -> Result<Option<Header>, FrameError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let u16_at = |i: usize| u16::from_le_bytes([buf[i], buf[i + 1]]);
    let magic = u16_at(0);
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    if buf[2] != VERSION {
        return Err(FrameError::BadVersion(buf[2]));
    }
    let opcode = buf[3];
    if request && Opcode::from_u8(opcode).is_none() {
        return Err(FrameError::BadOpcode(opcode));
    }
    let flags = u16_at(4);
    let status = u16_at(6);
    if request {
        if flags & !flags::REQUEST_MASK != 0 {
            return Err(FrameError::BadFlags(flags));
        }
        if status != 0 {
            return Err(FrameError::StatusInRequest(status));
        }
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&buf[8..16]);
    let key_len = u16_at(16);
    if u16_at(18) != 0 {
        return Err(FrameError::Reserved);
    }
    let body_len = u32::from_le_bytes([buf[20], buf[21], buf[22], buf[23]]);
    if key_len as usize > limits.max_key {
        return Err(FrameError::KeyTooLarge { len: key_len as usize, max: limits.max_key });
    }
    if body_len as usize > limits.max_body {
        return Err(FrameError::BodyTooLarge { len: body_len as usize, max: limits.max_body });
    }
    Ok(Some(Header { opcode, flags, status, request_id: u64::from_le_bytes(id), key_len, body_len }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> Limits {
        Limits::new(1 << 20)
    }

    proptest! {
        #[test]
        fn header_round_trips(op in prop::sample::select(vec![0x01u8, 0x02, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25]),
                              fl in 0u16..4, id: u64, key in 0u16..=1024, body in 0u32..=(1 << 20)) {
            let h = Header { opcode: op, flags: fl, status: 0, request_id: id, key_len: key, body_len: body };
            let mut b = [0u8; HEADER_LEN];
            encode_header(&h, &mut b);
            prop_assert_eq!(decode_header(&b, &limits(), true).unwrap(), Some(h));
        }

        #[test]
        fn decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_header(&bytes, &limits(), true);
            let _ = decode_header(&bytes, &limits(), false);
        }
    }

    fn good() -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        encode_header(&Header::request(Opcode::Ping, 0, 7, 3, 5), &mut b);
        b
    }

    #[test]
    fn short_buffer_is_incomplete_not_error() {
        assert_eq!(decode_header(&good()[..23], &limits(), true), Ok(None));
        assert_eq!(decode_header(&[], &limits(), true), Ok(None));
    }

    #[test]
    fn rejects_every_kind_of_malformed_header() {
        let l = limits();
        let mut b = good();
        b[0] = 0;
        assert!(matches!(decode_header(&b, &l, true), Err(FrameError::BadMagic(_))));
        let mut b = good();
        b[2] = 9;
        assert_eq!(decode_header(&b, &l, true), Err(FrameError::BadVersion(9)));
        let mut b = good();
        b[3] = 0x7f;
        assert_eq!(decode_header(&b, &l, true), Err(FrameError::BadOpcode(0x7f)));
        let mut b = good();
        b[5] = 0x40;
        assert!(matches!(decode_header(&b, &l, true), Err(FrameError::BadFlags(_))));
        let mut b = good();
        b[6] = 1;
        assert_eq!(decode_header(&b, &l, true), Err(FrameError::StatusInRequest(1)));
        let mut b = good();
        b[19] = 1;
        assert_eq!(decode_header(&b, &l, true), Err(FrameError::Reserved));
        let mut b = good();
        b[16..18].copy_from_slice(&1025u16.to_le_bytes());
        assert_eq!(decode_header(&b, &l, true), Err(FrameError::KeyTooLarge { len: 1025, max: 1024 }));
        let mut b = good();
        b[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = decode_header(&b, &l, true).unwrap_err();
        assert_eq!(e, FrameError::BodyTooLarge { len: u32::MAX as usize, max: 1 << 20 });
        assert_eq!(e.status(), Status::TooLarge);
    }

    #[test]
    fn responses_may_carry_status_and_closing_flag() {
        let mut b = [0u8; HEADER_LEN];
        let h =
            Header { opcode: 0x23, flags: flags::CLOSING, status: 5, request_id: 1, key_len: 0, body_len: 3 };
        encode_header(&h, &mut b);
        assert_eq!(decode_header(&b, &limits(), false), Ok(Some(h)));
        assert!(decode_header(&b, &limits(), true).is_err());
    }
}
