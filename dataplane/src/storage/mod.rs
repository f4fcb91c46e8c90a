//! Block storage. A node's storage is metadata-oblivious: it allocates, writes,
//! appends to, reads ranges of and frees fixed-size blocks, nothing else.

mod arena;
mod dram;
pub mod flash;

pub use arena::Arena;
pub use dram::{
    is_job_owner, job_owner, owner_parts, DramTier, Owner, FIRST_RESERVED_JOB_ID, PERSISTED_OWNER,
};
pub use flash::{Completion, FlashConfig, FlashEngine, IoMode, ReadBuf, TierPolicy};

use crate::proto::Status;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    #[error("no such block (freed, stale or never allocated)")]
    NotFound,
    #[error("tier is full")]
    NoCapacity,
    #[error("{end} bytes would pass the block size of {block_size}")]
    PastBlockEnd { end: u64, block_size: u32 },
    #[error("offset {offset} is past the block's {len} bytes of data")]
    PastData { offset: u32, len: u32 },
    /// The tier's queue is full: retry on a later pass. Never sent to a
    /// client by design (the core retries), mapped to `Internal` if it is.
    #[error("storage queue full")]
    Busy,
    /// The device failed the I/O (EIO, ENOSPC, ...). ENOSPC and EDQUOT map
    /// to `NoCapacity`, the rest to `Internal`.
    #[error("I/O error: {}", std::io::Error::from_raw_os_error(*errno))]
    Io { errno: i32 },
}

impl StorageError {
    pub fn status(&self) -> Status {
        match self {
            StorageError::NotFound => Status::NotFound,
            StorageError::NoCapacity => Status::NoCapacity,
            StorageError::PastBlockEnd { .. } => Status::TooLarge,
            StorageError::PastData { .. } => Status::Malformed,
            StorageError::Busy => Status::Internal,
            StorageError::Io { errno } if *errno == nix::libc::ENOSPC || *errno == nix::libc::EDQUOT => {
                Status::NoCapacity
            }
            StorageError::Io { .. } => Status::Internal,
        }
    }
}

/// Capacity figures of one tier on one core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierUsage {
    pub blocks_total: u64,
    pub blocks_used: u64,
    pub block_size: u64,
    pub huge_pages: bool,
}
