//! The wire protocol: fixed little-endian header, opcodes, status codes and the
//! binary layouts of every request and response. `docs/protocol.md` is the
//! normative description; this module is its one implementation.

mod codec;
mod msg;

pub use codec::{decode_header, encode_frame, encode_header, FrameError, Header, Limits};
pub use msg::*;

/// `"PN"` on the wire (0x50 0x4E), read as a little-endian u16.
pub const MAGIC: u16 = 0x4E50;
/// Version 2: `NodeInfo` carries the node number, `ObjectMeta` locates each
/// block on a node, `Delete` answers with the blocks the client frees.
pub const VERSION: u8 = 2;
pub const HEADER_LEN: usize = 24;
/// Longest key (object path or block address) any node accepts.
pub const MAX_KEY_LEN: usize = 1024;

/// Operation codes. Values are fixed by `docs/protocol.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    Ping = 0x01,
    NodeInfo = 0x02,
    Auth = 0x03,
    RegisterJob = 0x10,
    DeregisterJob = 0x11,
    CreateDir = 0x12,
    PutObject = 0x13,
    Lookup = 0x14,
    Enumerate = 0x15,
    Delete = 0x16,
    JobInfo = 0x17,
    Place = 0x18,
    BlockAlloc = 0x20,
    BlockWrite = 0x21,
    BlockAppend = 0x22,
    BlockRead = 0x23,
    BlockFree = 0x24,
    FreeOwner = 0x25,
}

impl Opcode {
    pub fn from_u8(v: u8) -> Option<Opcode> {
        use Opcode::*;
        Some(match v {
            0x01 => Ping,
            0x02 => NodeInfo,
            0x03 => Auth,
            0x10 => RegisterJob,
            0x11 => DeregisterJob,
            0x12 => CreateDir,
            0x13 => PutObject,
            0x14 => Lookup,
            0x15 => Enumerate,
            0x16 => Delete,
            0x17 => JobInfo,
            0x18 => Place,
            0x20 => BlockAlloc,
            0x21 => BlockWrite,
            0x22 => BlockAppend,
            0x23 => BlockRead,
            0x24 => BlockFree,
            0x25 => FreeOwner,
            _ => return None,
        })
    }

    /// Operations on a job's namespace, executed by the job's metadata core.
    pub fn is_namespace(self) -> bool {
        matches!(
            self,
            Opcode::RegisterJob
                | Opcode::DeregisterJob
                | Opcode::CreateDir
                | Opcode::PutObject
                | Opcode::Lookup
                | Opcode::Enumerate
                | Opcode::Delete
                | Opcode::JobInfo
                | Opcode::Place
        )
    }
}

/// Response status codes. Values are fixed by `docs/protocol.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    Exists = 2,
    NoCapacity = 3,
    Unauthorized = 4,
    Malformed = 5,
    TooLarge = 6,
    DataUnavailable = 7,
    Internal = 8,
}

impl Status {
    pub fn from_u16(v: u16) -> Option<Status> {
        use Status::*;
        Some(match v {
            0 => Ok,
            1 => NotFound,
            2 => Exists,
            3 => NoCapacity,
            4 => Unauthorized,
            5 => Malformed,
            6 => TooLarge,
            7 => DataUnavailable,
            8 => Internal,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::NotFound => "not found",
            Status::Exists => "exists",
            Status::NoCapacity => "no capacity",
            Status::Unauthorized => "unauthorized",
            Status::Malformed => "malformed",
            Status::TooLarge => "too large",
            Status::DataUnavailable => "data unavailable",
            Status::Internal => "internal error",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Header flag bits.
pub mod flags {
    /// `PutObject`: the object survives `DeregisterJob`.
    pub const PERSIST: u16 = 1 << 0;
    /// `PutObject`: the object is deleted after its first complete read.
    pub const DELETE_AFTER_READ: u16 = 1 << 1;
    /// Response: the node closes the connection after this frame.
    pub const CLOSING: u16 = 1 << 15;
    /// `Enumerate` response: the listing was cut at the body limit; ask again
    /// with the last name returned.
    pub const MORE: u16 = 1 << 14;
    /// Bits a request may carry; any other bit is malformed.
    pub const REQUEST_MASK: u16 = PERSIST | DELETE_AFTER_READ;
}

/// FNV-1a, 64-bit. Clients use it to find a job's metadata core
/// (`fnv1a(job) % cores`) without asking the node.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The core that owns a job's namespace.
pub fn meta_core(job: &str, cores: usize) -> usize {
    debug_assert!(cores > 0);
    (fnv1a(job.as_bytes()) % cores.max(1) as u64) as usize
}
