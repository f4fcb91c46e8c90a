//! Block storage. A node's storage is metadata-oblivious: it allocates, writes,
//! appends to, reads ranges of and frees fixed-size blocks, nothing else.

mod arena;
mod dram;

pub use arena::Arena;
pub use dram::{DramTier, PERSISTED_OWNER};

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
}

impl StorageError {
    pub fn status(&self) -> Status {
        match self {
            StorageError::NotFound => Status::NotFound,
            StorageError::NoCapacity => Status::NoCapacity,
            StorageError::PastBlockEnd { .. } => Status::TooLarge,
            StorageError::PastData { .. } => Status::Malformed,
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
