//! Capability tokens: an HMAC-SHA256 over (job, rights, expiry), keyed by
//! the cluster secret that the controller and the nodes share. The
//! controller issues a token when it registers a job; a node that has the
//! secret checks it once per connection (`Auth`, docs/protocol.md §7) and
//! then serves that connection's requests for that job, with those rights,
//! until the expiry.
//!
//! Text form (version 1), ASCII, safe in URLs, headers and shells:
//!
//! ```text
//! pt1.<base64url(payload)>.<base64url(tag)>        (no padding)
//! payload = version u8 (1) | rights u8 | expiry u64 LE (Unix seconds)
//!         | name_len u16 LE | job name (UTF-8, name_len bytes)
//! tag     = HMAC-SHA256(cluster secret, "pollen-token" | payload)   (32 bytes)
//! ```

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::proto::Opcode;

type HmacSha256 = Hmac<Sha256>;

/// The text form's prefix: token format version 1.
pub const PREFIX: &str = "pt1.";
pub const VERSION: u8 = 1;
/// Bytes the MAC covers before the payload (domain separation).
const DOMAIN: &[u8] = b"pollen-token";
/// Shortest cluster secret a node accepts.
pub const MIN_SECRET_LEN: usize = 16;
/// Longest token a node reads (a job name is at most 1024 bytes).
pub const MAX_TOKEN_LEN: usize = 2048;
const TAG_LEN: usize = 32;
const FIXED_LEN: usize = 1 + 1 + 8 + 2;

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

/// A verified token's claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub job: String,
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
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs()
}

impl Token {
    /// Issues a token for `job` with `rights`, valid until `expiry`. Job
    /// names follow docs/protocol.md §6.8 (non-empty, no `/`, at most 1024
    /// bytes); others are refused.
    pub fn issue(
        secret: &Secret,
        job: &str,
        rights: Rights,
        expiry: SystemTime,
    ) -> Result<String, TokenError> {
        if job.is_empty() || job.len() > crate::proto::MAX_KEY_LEN || job.contains('/') {
            return Err(TokenError::BadJob);
        }
        let t = Token { job: job.to_string(), rights, expiry: unix_secs(expiry) };
        let payload = t.payload();
        let mut m = secret.mac();
        m.update(&payload);
        let tag = m.finalize().into_bytes();
        Ok(format!("{PREFIX}{}.{}", URL_SAFE_NO_PAD.encode(&payload), URL_SAFE_NO_PAD.encode(tag)))
    }

    /// Checks a token's form, signature (in constant time) and expiry
    /// against `now`; returns its claims.
    pub fn verify(secret: &Secret, token: &str, now: SystemTime) -> Result<Token, TokenError> {
        let (payload, tag) = split(token)?;
        let mut m = secret.mac();
        m.update(&payload);
        m.verify_slice(&tag).map_err(|_| TokenError::BadSignature)?;
        let t = Token::decode(&payload)?;
        if unix_secs(now) >= t.expiry {
            return Err(TokenError::Expired);
        }
        Ok(t)
    }

    /// The claims of a token without checking its signature or expiry
    /// (for display; never for access decisions).
    pub fn inspect(token: &str) -> Result<Token, TokenError> {
        Token::decode(&split(token)?.0)
    }

    fn payload(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(FIXED_LEN + self.job.len());
        p.push(VERSION);
        p.push(self.rights.0);
        p.extend_from_slice(&self.expiry.to_le_bytes());
        p.extend_from_slice(&(self.job.len() as u16).to_le_bytes());
        p.extend_from_slice(self.job.as_bytes());
        p
    }

    fn decode(p: &[u8]) -> Result<Token, TokenError> {
        let mut r = crate::proto::Reader::new(p);
        let bad = |_| TokenError::Malformed;
        if r.u8("version").map_err(bad)? != VERSION {
            return Err(TokenError::Malformed);
        }
        let rights = Rights(r.u8("rights").map_err(bad)?);
        let expiry = r.u64("expiry").map_err(bad)?;
        let n = r.u16("name length").map_err(bad)? as usize;
        let name = r.bytes(n, "name").map_err(bad)?;
        r.end("trailing bytes").map_err(bad)?;
        let job = std::str::from_utf8(name).map_err(|_| TokenError::Malformed)?;
        if job.is_empty() || job.contains('/') {
            return Err(TokenError::BadJob);
        }
        Ok(Token { job: job.to_string(), rights, expiry })
    }
}

/// The decoded payload and tag of a token's text form.
fn split(token: &str) -> Result<(Vec<u8>, Vec<u8>), TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let rest = token.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
    let (payload, tag) = rest.split_once('.').ok_or(TokenError::Malformed)?;
    let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| TokenError::Malformed)?;
    let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| TokenError::Malformed)?;
    if tag.len() != TAG_LEN || payload.len() < FIXED_LEN {
        return Err(TokenError::Malformed);
    }
    Ok((payload, tag))
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

    #[test]
    fn issued_tokens_verify_and_carry_their_claims() {
        let t = Token::issue(&secret(), "wordcount", Rights::READ_WRITE, later()).unwrap();
        assert!(t.starts_with(PREFIX) && t.is_ascii());
        let c = Token::verify(&secret(), &t, SystemTime::now()).unwrap();
        assert_eq!((c.job.as_str(), c.rights), ("wordcount", Rights::READ_WRITE));
        assert_eq!(Token::inspect(&t).unwrap(), c);
    }

    #[test]
    fn forged_expired_and_garbled_tokens_are_refused() {
        let s = secret();
        let t = Token::issue(&s, "j", Rights::READ, later()).unwrap();
        let other = Secret::new(*b"another secret, just as long....").unwrap();
        assert_eq!(Token::verify(&other, &t, SystemTime::now()), Err(TokenError::BadSignature));
        // Claims changed under the old tag: more rights, another job.
        let forged = Token { job: "j".into(), rights: Rights::ALL, expiry: unix_secs(later()) };
        let tag = t.rsplit('.').next().unwrap();
        let f = format!("{PREFIX}{}.{tag}", URL_SAFE_NO_PAD.encode(forged.payload()));
        assert_eq!(Token::verify(&s, &f, SystemTime::now()), Err(TokenError::BadSignature));
        let past = SystemTime::now() - Duration::from_secs(1);
        let old = Token::issue(&s, "j", Rights::READ, past).unwrap();
        assert_eq!(Token::verify(&s, &old, SystemTime::now()), Err(TokenError::Expired));
        for bad in
            ["", "pt1.", "pt1..", "pt2.AAAA.AAAA", "pt1.!!!.AAAA", &t[..t.len() - 2], &"x".repeat(5000)]
        {
            assert!(Token::verify(&s, bad, SystemTime::now()).is_err(), "{bad:?}");
        }
        assert_eq!(Token::issue(&s, "a/b", Rights::READ, later()), Err(TokenError::BadJob));
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
