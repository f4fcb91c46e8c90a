//! Capability tokens: an HMAC-SHA256 over (job, block owner, rights,
//! expiry), keyed by the cluster secret that the controller and the nodes
//! share. The controller issues a token when it registers a job; a node
//! that has the secret checks it once per connection (`Auth`,
//! docs/protocol.md §7) and then serves that connection's requests for that
//! job, with those rights, until the expiry. Block requests are served only
//! for blocks of the token's block owner (`BlockOwner`).
//!
//! Text form, ASCII, safe in URLs, headers and shells:
//!
//! ```text
//! pt2.<base64url(payload)>.<base64url(tag)>        (no padding)
//! payload = version u8 (2) | rights u8 | expiry u64 LE (Unix seconds)
//!         | owner flag u8 (0: none, 1: the next 6 bytes name it)
//!         | metadata node u16 LE | job id u32 LE (both 0 without an owner)
//!         | name_len u16 LE | job name (UTF-8, name_len bytes)
//! tag     = HMAC-SHA256(cluster secret, "pollen-token" | payload)   (32 bytes)
//! ```
//!
//! Version 1 (`pt1.`, payload without the owner fields) is still read: such
//! a token names no block owner, so it opens no blocks.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::proto::Opcode;

type HmacSha256 = Hmac<Sha256>;

/// The text form's prefix: token format version 2 (the one issued).
pub const PREFIX: &str = "pt2.";
pub const VERSION: u8 = 2;
/// Version 1's prefix: read, never issued.
const PREFIX_V1: &str = "pt1.";
/// Bytes the MAC covers before the payload (domain separation).
const DOMAIN: &[u8] = b"pollen-token";
/// Shortest cluster secret a node accepts.
pub const MIN_SECRET_LEN: usize = 16;
/// Longest token a node reads (a job name is at most 1024 bytes).
pub const MAX_TOKEN_LEN: usize = 2048;
const TAG_LEN: usize = 32;
/// Fixed payload bytes of version 1 and of version 2.
const FIXED_LEN_V1: usize = 1 + 1 + 8 + 2;
const FIXED_LEN: usize = FIXED_LEN_V1 + 1 + 2 + 4;

/// The key tokens are issued and verified with, shared by the controller
/// and the nodes of a cluster. Its bytes are never printed.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("cluster secret file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("the cluster secret has {0} bytes; it needs at least {MIN_SECRET_LEN} (e.g. `head -c 32 /dev/urandom | base64`)")]
    TooShort(usize),
}

impl Secret {
    /// A secret from raw bytes (at least `MIN_SECRET_LEN`).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Secret, SecretError> {
        let b = bytes.into();
        if b.len() < MIN_SECRET_LEN {
            return Err(SecretError::TooShort(b.len()));
        }
        Ok(Secret(b))
    }

    /// Reads a secret file: its contents without leading and trailing
    /// whitespace (so a trailing newline does not matter).
    pub fn from_file(path: &Path) -> Result<Secret, SecretError> {
        let file = |reason: String| SecretError::File { path: path.display().to_string(), reason };
        let meta = std::fs::metadata(path).map_err(|e| file(e.to_string()))?;
        if meta.len() > 64 << 10 {
            return Err(file(format!("{} bytes; a secret file is at most 64 KiB", meta.len())));
        }
        let bytes = std::fs::read(path).map_err(|e| file(e.to_string()))?;
        Secret::new(bytes.trim_ascii().to_vec())
    }

    fn mac(&self) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        m.update(DOMAIN);
        m
    }
}

/// What a token allows, as bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Rights(pub u8);

impl Rights {
    /// `Lookup`, `Enumerate`, `JobInfo`, `BlockRead`.
    pub const READ: Rights = Rights(1);
    /// `CreateDir`, `PutObject`, `Delete`, `BlockAlloc`, `BlockWrite`, `BlockAppend`, `BlockFree`.
    pub const WRITE: Rights = Rights(2);
    /// `RegisterJob`, `DeregisterJob`, `FreeOwner`.
    pub const ADMIN: Rights = Rights(4);
    /// What a job's own workers get: read and write, not (de)register.
    pub const READ_WRITE: Rights = Rights(1 | 2);
    pub const ALL: Rights = Rights(1 | 2 | 4);

    pub fn contains(self, other: Rights) -> bool {
        self.0 & other.0 == other.0
    }

    /// The right a request needs; `None` for requests every connection may
    /// send (`Ping`, `NodeInfo`, `Auth`).
    pub fn needed_for(op: Opcode) -> Option<Rights> {
        use Opcode::*;
        Some(match op {
            Ping | NodeInfo | Auth => return None,
            Lookup | Enumerate | JobInfo | BlockRead => Rights::READ,
            CreateDir | PutObject | Delete | Place | BlockAlloc | BlockWrite | BlockAppend | BlockFree => {
                Rights::WRITE
            }
            RegisterJob | DeregisterJob | FreeOwner => Rights::ADMIN,
        })
    }
}

impl std::ops::BitOr for Rights {
    type Output = Rights;
    fn bitor(self, o: Rights) -> Rights {
        Rights(self.0 | o.0)
    }
}

/// Whose blocks a token opens: the job's id on its metadata node and that
/// node's number, which storage nodes record as each block's owner
/// (`storage::job_owner`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockOwner {
    pub meta_node: u16,
    pub job_id: u32,
}

impl BlockOwner {
    /// The owner value storage nodes keep for the job's blocks.
    pub fn owner(self) -> crate::storage::Owner {
        crate::storage::job_owner(self.meta_node, self.job_id)
    }
}

/// A verified token's claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub job: String,
    /// The job's block owner; `None`: the token opens no blocks (unless it
    /// has `Rights::ADMIN`).
    pub owner: Option<BlockOwner>,
    pub rights: Rights,
    /// Unix time in seconds after which the token is refused.
    pub expiry: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a Pollen token (format pt1.PAYLOAD.TAG)")]
    Malformed,
    #[error("the token's signature does not match (forged, or another cluster's secret)")]
    BadSignature,
    #[error("the token expired")]
    Expired,
    #[error("bad job name for a token")]
    BadJob,
    #[error("bad block owner for a token: job ids 0xfffffffe and 0xffffffff are reserved")]
    BadOwner,
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs()
}

impl Token {
    /// Issues a token for `job` (whose blocks `owner` holds) with `rights`,
    /// valid until `expiry`. Job names follow docs/protocol.md §6.8
    /// (non-empty, no `/`, at most 1024 bytes); others are refused, and so
    /// are reserved job ids.
    pub fn issue(
        secret: &Secret,
        job: &str,
        owner: Option<BlockOwner>,
        rights: Rights,
        expiry: SystemTime,
    ) -> Result<String, TokenError> {
        if job.is_empty() || job.len() > crate::proto::MAX_KEY_LEN || job.contains('/') {
            return Err(TokenError::BadJob);
        }
        if owner.is_some_and(|o| o.job_id >= crate::storage::FIRST_RESERVED_JOB_ID) {
            return Err(TokenError::BadOwner);
        }
        let t = Token { job: job.to_string(), owner, rights, expiry: unix_secs(expiry) };
        let payload = t.payload();
        let mut m = secret.mac();
        m.update(&payload);
        let tag = m.finalize().into_bytes();
        Ok(format!("{PREFIX}{}.{}", URL_SAFE_NO_PAD.encode(&payload), URL_SAFE_NO_PAD.encode(tag)))
    }

    /// Checks a token's form, signature (in constant time) and expiry
    /// against `now`; returns its claims.
    pub fn verify(secret: &Secret, token: &str, now: SystemTime) -> Result<Token, TokenError> {
        let (version, payload, tag) = split(token)?;
        let mut m = secret.mac();
        m.update(&payload);
        m.verify_slice(&tag).map_err(|_| TokenError::BadSignature)?;
        let t = Token::decode(version, &payload)?;
        if unix_secs(now) >= t.expiry {
            return Err(TokenError::Expired);
        }
        Ok(t)
    }

    /// The claims of a token without checking its signature or expiry
    /// (for display; never for access decisions).
    pub fn inspect(token: &str) -> Result<Token, TokenError> {
        let (version, payload, _) = split(token)?;
        Token::decode(version, &payload)
    }

    fn payload(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(FIXED_LEN + self.job.len());
        p.push(VERSION);
        p.push(self.rights.0);
        p.extend_from_slice(&self.expiry.to_le_bytes());
        let o = self.owner.unwrap_or(BlockOwner { meta_node: 0, job_id: 0 });
        p.push(u8::from(self.owner.is_some()));
        p.extend_from_slice(&o.meta_node.to_le_bytes());
        p.extend_from_slice(&o.job_id.to_le_bytes());
        p.extend_from_slice(&(self.job.len() as u16).to_le_bytes());
        p.extend_from_slice(self.job.as_bytes());
        p
    }

    /// A payload of format `version` (its text form's prefix says which).
    fn decode(version: u8, p: &[u8]) -> Result<Token, TokenError> {
        let mut r = crate::proto::Reader::new(p);
        let bad = |_| TokenError::Malformed;
        if r.u8("version").map_err(bad)? != version {
            return Err(TokenError::Malformed);
        }
        let rights = Rights(r.u8("rights").map_err(bad)?);
        let expiry = r.u64("expiry").map_err(bad)?;
        let owner = if version == 1 {
            None
        } else {
            let flag = r.u8("owner flag").map_err(bad)?;
            let meta_node = r.u16("metadata node").map_err(bad)?;
            let job_id = r.u32("job id").map_err(bad)?;
            match flag {
                0 if meta_node == 0 && job_id == 0 => None,
                1 if job_id < crate::storage::FIRST_RESERVED_JOB_ID => Some(BlockOwner { meta_node, job_id }),
                1 => return Err(TokenError::BadOwner),
                _ => return Err(TokenError::Malformed),
            }
        };
        let n = r.u16("name length").map_err(bad)? as usize;
        let name = r.bytes(n, "name").map_err(bad)?;
        r.end("trailing bytes").map_err(bad)?;
        let job = std::str::from_utf8(name).map_err(|_| TokenError::Malformed)?;
        if job.is_empty() || job.contains('/') {
            return Err(TokenError::BadJob);
        }
        Ok(Token { job: job.to_string(), owner, rights, expiry })
    }
}

/// The format version, decoded payload and tag of a token's text form.
fn split(token: &str) -> Result<(u8, Vec<u8>, Vec<u8>), TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let (version, rest) = match token.strip_prefix(PREFIX) {
        Some(rest) => (VERSION, rest),
        None => (1, token.strip_prefix(PREFIX_V1).ok_or(TokenError::Malformed)?),
    };
    let fixed = if version == 1 { FIXED_LEN_V1 } else { FIXED_LEN };
    let (payload, tag) = rest.split_once('.').ok_or(TokenError::Malformed)?;
    let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| TokenError::Malformed)?;
    let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| TokenError::Malformed)?;
    if tag.len() != TAG_LEN || payload.len() < fixed {
        return Err(TokenError::Malformed);
    }
    Ok((version, payload, tag))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::new(*b"0123456789abcdef0123456789abcdef").unwrap()
    }

    fn later() -> SystemTime {
        SystemTime::now() + Duration::from_secs(3600)
    }

    const OWNER: BlockOwner = BlockOwner { meta_node: 3, job_id: 7 };

    /// A token's text form with `payload` under a valid tag (of `s`).
    fn signed(s: &Secret, prefix: &str, payload: &[u8]) -> String {
        let mut m = s.mac();
        m.update(payload);
        let tag = m.finalize().into_bytes();
        format!("{prefix}{}.{}", URL_SAFE_NO_PAD.encode(payload), URL_SAFE_NO_PAD.encode(tag))
    }

    #[test]
    fn issued_tokens_verify_and_carry_their_claims() {
        let t = Token::issue(&secret(), "wordcount", Some(OWNER), Rights::READ_WRITE, later()).unwrap();
        assert!(t.starts_with(PREFIX) && t.is_ascii());
        let c = Token::verify(&secret(), &t, SystemTime::now()).unwrap();
        assert_eq!((c.job.as_str(), c.owner, c.rights), ("wordcount", Some(OWNER), Rights::READ_WRITE));
        assert_eq!(c.owner.unwrap().owner(), crate::storage::job_owner(3, 7));
        assert_eq!(Token::inspect(&t).unwrap(), c);
        // Without an owner claim.
        let t = Token::issue(&secret(), "wordcount", None, Rights::ALL, later()).unwrap();
        assert_eq!(Token::verify(&secret(), &t, SystemTime::now()).unwrap().owner, None);
    }

    #[test]
    fn the_owner_claim_is_encoded_at_its_documented_place() {
        let t = Token::issue(&secret(), "ab", Some(OWNER), Rights::READ, later()).unwrap();
        let (version, p, _) = split(&t).unwrap();
        assert_eq!(version, 2);
        assert_eq!(p.len(), FIXED_LEN + 2);
        assert_eq!((p[0], p[1]), (2, 1), "version, rights");
        assert_eq!(&p[10..17], &[1, 3, 0, 7, 0, 0, 0], "owner flag, node 3, job 7");
        assert_eq!(&p[17..], &[2, 0, b'a', b'b'], "name length, name");
    }

    #[test]
    fn version_1_tokens_verify_without_an_owner() {
        let s = secret();
        let mut p = vec![1, Rights::READ_WRITE.0];
        p.extend_from_slice(&unix_secs(later()).to_le_bytes());
        p.extend_from_slice(&[1, 0, b'j']);
        let t = Token::verify(&s, &signed(&s, PREFIX_V1, &p), SystemTime::now()).unwrap();
        assert_eq!((t.job.as_str(), t.owner, t.rights), ("j", None, Rights::READ_WRITE));
        // A version 1 payload under the version 2 prefix, and the reverse: malformed.
        assert_eq!(Token::verify(&s, &signed(&s, PREFIX, &p), SystemTime::now()), Err(TokenError::Malformed));
        let v2 = Token::issue(&s, "j", Some(OWNER), Rights::READ, later()).unwrap();
        let (_, p2, _) = split(&v2).unwrap();
        assert_eq!(
            Token::verify(&s, &signed(&s, PREFIX_V1, &p2), SystemTime::now()),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn malformed_owner_claims_are_refused_even_when_signed() {
        let s = secret();
        let t = Token::issue(&s, "j", Some(OWNER), Rights::READ, later()).unwrap();
        let (_, good, _) = split(&t).unwrap();
        let with = |i: usize, b: &[u8]| {
            let mut p = good.clone();
            p[i..i + b.len()].copy_from_slice(b);
            signed(&s, PREFIX, &p)
        };
        let now = SystemTime::now();
        assert_eq!(Token::verify(&s, &with(10, &[2]), now), Err(TokenError::Malformed), "flag 2");
        assert_eq!(
            Token::verify(&s, &with(10, &[0]), now),
            Err(TokenError::Malformed),
            "no owner, fields set"
        );
        let reserved = with(13, &u32::MAX.to_le_bytes());
        assert_eq!(Token::verify(&s, &reserved, now), Err(TokenError::BadOwner));
        assert_eq!(Token::inspect(&reserved), Err(TokenError::BadOwner));
        // Cut inside the owner fields; trailing bytes.
        let cut = signed(&s, PREFIX, &good[..FIXED_LEN - 1]);
        assert_eq!(Token::verify(&s, &cut, now), Err(TokenError::Malformed));
        let mut long = good.clone();
        long.push(0);
        assert_eq!(Token::verify(&s, &signed(&s, PREFIX, &long), now), Err(TokenError::Malformed));
        let bad = BlockOwner { meta_node: 1, job_id: crate::storage::FIRST_RESERVED_JOB_ID };
        assert_eq!(Token::issue(&s, "j", Some(bad), Rights::READ, later()), Err(TokenError::BadOwner));
    }

    #[test]
    fn forged_expired_and_garbled_tokens_are_refused() {
        let s = secret();
        let t = Token::issue(&s, "j", Some(OWNER), Rights::READ, later()).unwrap();
        let other = Secret::new(*b"another secret, just as long....").unwrap();
        assert_eq!(Token::verify(&other, &t, SystemTime::now()), Err(TokenError::BadSignature));
        // Claims changed under the old tag: more rights, another owner.
        let tag = t.rsplit('.').next().unwrap();
        let expiry = unix_secs(later());
        for forged in [
            Token { job: "j".into(), owner: Some(OWNER), rights: Rights::ALL, expiry },
            Token {
                job: "j".into(),
                owner: Some(BlockOwner { meta_node: 3, job_id: 8 }),
                rights: Rights::READ,
                expiry,
            },
        ] {
            let f = format!("{PREFIX}{}.{tag}", URL_SAFE_NO_PAD.encode(forged.payload()));
            assert_eq!(Token::verify(&s, &f, SystemTime::now()), Err(TokenError::BadSignature));
        }
        let past = SystemTime::now() - Duration::from_secs(1);
        let old = Token::issue(&s, "j", None, Rights::READ, past).unwrap();
        assert_eq!(Token::verify(&s, &old, SystemTime::now()), Err(TokenError::Expired));
        for bad in [
            "",
            "pt1.",
            "pt2.",
            "pt2..",
            "pt3.AAAA.AAAA",
            "pt2.!!!.AAAA",
            &t[..t.len() - 2],
            &"x".repeat(5000),
        ] {
            assert!(Token::verify(&s, bad, SystemTime::now()).is_err(), "{bad:?}");
        }
        assert_eq!(Token::issue(&s, "a/b", None, Rights::READ, later()), Err(TokenError::BadJob));
        assert!(matches!(Secret::new(*b"short"), Err(SecretError::TooShort(5))));
    }

    #[test]
    fn rights_cover_every_opcode() {
        assert_eq!(Rights::needed_for(Opcode::Ping), None);
        assert_eq!(Rights::needed_for(Opcode::BlockRead), Some(Rights::READ));
        assert_eq!(Rights::needed_for(Opcode::PutObject), Some(Rights::WRITE));
        assert_eq!(Rights::needed_for(Opcode::Place), Some(Rights::WRITE));
        assert_eq!(Rights::needed_for(Opcode::RegisterJob), Some(Rights::ADMIN));
        assert_eq!(
            Rights::needed_for(Opcode::FreeOwner),
            Some(Rights::ADMIN),
            "a bulk free is a deregistration"
        );
        assert!(Rights::ALL.contains(Rights::READ_WRITE) && !Rights::READ.contains(Rights::WRITE));
    }
}
