//! Arbitrary bytes into every wire-protocol decoder. A decoder may reject its
//! input but must never panic, and whatever it accepts must encode back to the
//! exact bytes it was given: every layout has one encoding per value.
//!
//! The input is used twice: whole, as the key/body of every decoder (so each
//! decoder is reached without a valid header), and as a frame whose header
//! selects the decoders for its key and body, as a node or client would.

#![no_main]

use dataplane::proto::{
    decode_entries, decode_header, decode_locations, encode_entries, encode_header, encode_locations, flags,
    split_job_key, BlockId, BlockKey, FrameError, Header, JobHints, JobInfo, Limits, NodeInfo, ObjectMeta, Opcode,
    Reader, Status, HEADER_LEN, LOCATION_LEN, MAGIC, MAX_KEY_LEN, MAX_NODES_PER_LIST, VERSION,
};
use libfuzzer_sys::fuzz_target;

const MAX_BODY: usize = 1 << 20;
/// Most blocks a `PutObject` body of `MAX_BODY` bytes can locate (16 bytes
/// besides the locations with a one-node table, 9 bytes per location).
const MAX_BLOCKS: usize = (MAX_BODY - 16) / LOCATION_LEN;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::new(MAX_BODY);
    assert_eq!(limits.max_key, MAX_KEY_LEN);

    let request = header(data, &limits, true);
    let response = header(data, &limits, false);
    if data.len() < HEADER_LEN {
        assert_eq!((request, response), (Ok(None), Ok(None)));
    } else {
        headers_agree(data, request, response);
    }
    if let Ok(Some(h)) = request {
        if let Some((key, body)) = payload(data, &h) {
            request_payload(&h, key, body);
        }
    }
    if let Ok(Some(h)) = response {
        if let Some((key, body)) = payload(data, &h) {
            response_payload(&h, key, body);
        }
    }

    block_key(data);
    job_hints(data);
    job_info(data);
    object_meta(data);
    locations(data);
    let _ = ObjectMeta::decode_v1(data, 0);
    entries(data);
    node_info(data);
    job_key(data);
    token(data);
});

/// Decodes a header and checks what must hold of any header the decoder accepts.
fn header(data: &[u8], limits: &Limits, request: bool) -> Result<Option<Header>, FrameError> {
    let r = decode_header(data, limits, request);
    match r {
        Ok(Some(h)) => {
            let mut out = [0u8; HEADER_LEN];
            encode_header(&h, &mut out);
            assert_eq!(&out[..], &data[..HEADER_LEN], "accepted header does not re-encode to its bytes");
            assert!(h.key_len as usize <= limits.max_key);
            assert!(h.body_len as usize <= limits.max_body);
            assert_eq!(h.frame_len(), HEADER_LEN + h.key_len as usize + h.body_len as usize);
            if request {
                assert!(h.op().is_some(), "request with unknown opcode accepted");
                assert_eq!(h.status, 0, "request with a status accepted");
                assert_eq!(h.flags & !flags::REQUEST_MASK, 0, "request with unknown flags accepted");
            }
        }
        Ok(None) => assert!(data.len() < HEADER_LEN),
        Err(e) => {
            assert!(data.len() >= HEADER_LEN);
            let too_large = matches!(e, FrameError::KeyTooLarge { .. } | FrameError::BodyTooLarge { .. });
            assert_eq!(e.status(), if too_large { Status::TooLarge } else { Status::Malformed });
            match e {
                FrameError::BadMagic(m) => {
                    assert_ne!(m, MAGIC);
                    assert_eq!(m.to_le_bytes(), [data[0], data[1]]);
                }
                FrameError::BadVersion(v) => assert!(v == data[2] && v != VERSION),
                FrameError::BadOpcode(op) => {
                    assert!(request && op == data[3] && Opcode::from_u8(op).is_none())
                }
                FrameError::BadFlags(_) | FrameError::StatusInRequest(_) => assert!(request),
                FrameError::Reserved => assert_ne!([data[18], data[19]], [0, 0]),
                FrameError::KeyTooLarge { len, max } => assert!(len > max && max == limits.max_key),
                FrameError::BodyTooLarge { len, max } => assert!(len > max && max == limits.max_body),
            }
        }
    }
    r
}

/// The request rules are the response rules plus three checks, so a header a
/// request decode accepts is accepted unchanged as a response, and a header
/// rejected as a response is rejected as a request too.
fn headers_agree(
    data: &[u8],
    request: Result<Option<Header>, FrameError>,
    response: Result<Option<Header>, FrameError>,
) {
    match (request, response) {
        (Ok(Some(q)), r) => assert_eq!(r, Ok(Some(q))),
        (Err(_), Ok(Some(h))) => {
            let request_only = h.op().is_none() || h.status != 0 || h.flags & !flags::REQUEST_MASK != 0;
            assert!(request_only, "request rejected for a reason that applies to responses");
        }
        (Err(q), Err(r)) => {
            // Magic and version are checked first in both modes.
            if matches!(r, FrameError::BadMagic(_) | FrameError::BadVersion(_)) {
                assert_eq!(q, r);
            }
        }
        (q, r) => panic!("impossible pair for {} bytes: {q:?} / {r:?}", data.len()),
    }
}

/// The key and body of a frame whose header is `h`, if the input holds all of it.
fn payload<'a>(data: &'a [u8], h: &Header) -> Option<(&'a [u8], &'a [u8])> {
    let rest = &data[HEADER_LEN..];
    let key_len = h.key_len as usize;
    let body_len = h.body_len as usize;
    if rest.len() < key_len + body_len {
        return None;
    }
    Some((&rest[..key_len], &rest[key_len..key_len + body_len]))
}

/// Request key and body, decoded as the opcode's layout says.
fn request_payload(h: &Header, key: &[u8], body: &[u8]) {
    let Some(op) = h.op() else { unreachable!("request header with unknown opcode") };
    match op {
        // Fixed-size fields read in place by the node (`FreeOwner`: a job id,
        // a metadata node, 8-byte block ids), no decoder to exercise here.
        Opcode::Ping | Opcode::NodeInfo | Opcode::BlockAlloc | Opcode::FreeOwner => {}
        Opcode::Auth => token(body),
        Opcode::RegisterJob => {
            job_key(key);
            job_hints(body);
        }
        Opcode::PutObject => {
            job_key(key);
            object_meta(body);
        }
        Opcode::DeregisterJob
        | Opcode::CreateDir
        | Opcode::Lookup
        | Opcode::Enumerate
        | Opcode::Delete
        | Opcode::JobInfo
        | Opcode::Place => job_key(key),
        Opcode::BlockWrite | Opcode::BlockAppend | Opcode::BlockRead | Opcode::BlockFree => block_key(key),
    }
}

/// Response body of a successful request, decoded as the opcode's layout says.
fn response_payload(h: &Header, _key: &[u8], body: &[u8]) {
    if h.status != Status::Ok as u16 {
        return;
    }
    match h.op() {
        Some(Opcode::NodeInfo) => node_info(body),
        Some(Opcode::Lookup) => object_meta(body),
        Some(Opcode::Delete) if !body.is_empty() => locations(body),
        // The job id, then the kept PERSIST blocks on other nodes.
        Some(Opcode::DeregisterJob) if body.len() > 4 => locations(&body[4..]),
        Some(Opcode::Enumerate) => entries(body),
        Some(Opcode::JobInfo) => job_info(body),
        _ => {}
    }
}

fn block_key(b: &[u8]) {
    match BlockKey::decode(b) {
        Ok(k) => {
            assert_eq!(&k.encode()[..], b);
            let id = k.block;
            assert_eq!(BlockId::new(id.tier(), id.core(), id.generation(), id.index()), id);
        }
        Err(_) => assert_ne!(b.len(), BlockKey::LEN, "a 16-byte block key was rejected"),
    }
}

fn job_hints(b: &[u8]) {
    match JobHints::decode(b) {
        Ok(h) if b.is_empty() => assert_eq!(h, JobHints::default()),
        Ok(h) => assert_eq!(&h.encode()[..], b),
        Err(_) => assert!(!b.is_empty(), "empty hints were rejected"),
    }
}

fn job_info(b: &[u8]) {
    match JobInfo::decode(b) {
        Ok(info) => {
            let mut out = Vec::with_capacity(JobInfo::LEN);
            info.encode(&mut out);
            assert_eq!(out, b);
        }
        Err(_) => {
            if b.len() == JobInfo::LEN {
                assert!(JobHints::decode(&b[4..4 + JobHints::LEN]).is_err(), "valid job info was rejected");
            }
        }
    }
}

fn object_meta(b: &[u8]) {
    let wide = ObjectMeta::decode(b, MAX_BLOCKS);
    if let Ok(m) = &wide {
        assert!(m.blocks.len() <= MAX_BLOCKS);
        let mut out = Vec::with_capacity(b.len());
        m.encode(&mut out);
        assert_eq!(out, b);
    }
    // A tighter bound only ever turns an accepted body into a rejected one.
    match ObjectMeta::decode(b, 2) {
        Ok(m) => {
            assert!(m.blocks.len() <= 2);
            assert_eq!(wide.as_ref().ok(), Some(&m));
        }
        Err(_) => {
            if let Ok(m) = &wide {
                assert!(m.blocks.len() > 2);
            }
        }
    }
}

/// A location list alone (the body of an ok `Delete` that names blocks on other nodes).
fn locations(b: &[u8]) {
    let mut r = Reader::new(b);
    if let Ok(locs) = decode_locations(&mut r, MAX_BLOCKS) {
        let nodes: std::collections::HashSet<u16> = locs.iter().map(|l| l.node).collect();
        assert!(nodes.len() <= MAX_NODES_PER_LIST);
        let mut out = Vec::with_capacity(b.len());
        encode_locations(&locs, &mut out);
        assert_eq!(out, b);
    }
}

fn entries(b: &[u8]) {
    if let Ok(v) = decode_entries(b) {
        let mut out = Vec::with_capacity(b.len());
        encode_entries(&v, &mut out);
        assert_eq!(out, b);
    }
}

fn node_info(b: &[u8]) {
    if let Ok(n) = NodeInfo::decode(b) {
        assert!(!n.core_ports.is_empty());
        let mut out = Vec::with_capacity(b.len());
        n.encode(&mut out);
        assert_eq!(out, b);
    }
}

fn job_key(b: &[u8]) {
    if let Ok((job, path)) = split_job_key(b) {
        assert!(!job.is_empty() && !job.contains('/'));
        assert!(!job.bytes().chain(path.bytes()).any(|c| c.is_ascii_control()));
        if !path.is_empty() {
            assert!(path.split('/').all(|s| !s.is_empty() && s != "." && s != ".."));
        }
        // The split loses nothing but the separator.
        let joined = if b.len() == job.len() { job.to_string() } else { format!("{job}/{path}") };
        assert_eq!(joined.as_bytes(), b);
    }
}

/// An `Auth` body: a token's text form. Verifying arbitrary bytes must fail
/// cleanly (they are not signed with this secret); whatever `inspect`
/// accepts must name a job a token can be issued for, and re-issuing its
/// claims must give a token that verifies to the same claims.
fn token(b: &[u8]) {
    use dataplane::auth::{Secret, Token};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};
    let secret = Secret::new(*b"fuzzing secret, sixteen+ bytes").expect("long enough");
    let Ok(text) = std::str::from_utf8(b) else { return };
    let now = SystemTime::now();
    assert!(Token::verify(&secret, text, now).is_err(), "an unsigned token verified");
    if let Ok(t) = Token::inspect(text) {
        assert!(!t.job.is_empty() && !t.job.contains('/'));
        let expiry = UNIX_EPOCH + Duration::from_secs(t.expiry.min(u32::MAX as u64 * 4));
        if let Ok(again) = Token::issue(&secret, &t.job, t.owner, t.rights, expiry) {
            if expiry > now {
                let back = Token::verify(&secret, &again, now).expect("a token just issued verifies");
                assert_eq!((back.job, back.owner, back.rights), (t.job, t.owner, t.rights));
            }
        }
    }
}
