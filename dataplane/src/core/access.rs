//! Access control per connection: on a node with a cluster secret, a
//! connection presents a capability token once (`Auth`); the token is
//! verified then (HMAC-SHA256, `crate::auth`), and each later request is
//! only compared with what it granted: the job, the rights, the expiry, and
//! for block requests the job's block owner. A block's owner is checked on
//! the core that holds the block: a request forwarded there carries the
//! connection's `BlockClaim`.

use std::time::{Duration, Instant, SystemTime};

use super::{exec, State};
use crate::auth::{Rights, Token};
use crate::proto::{split_job_key, tier, BlockKey, Header, Opcode, Reader, Status, HEADER_LEN};
use crate::storage::{job_owner, Owner, PERSISTED_OWNER};
use crate::transport::ConnId;

/// What a connection's token allows.
pub(super) struct Grant {
    job: Box<str>,
    /// The token's block owner (`auth::BlockOwner`), if it names one.
    owner: Option<Owner>,
    rights: Rights,
    until: Instant,
}

/// Whose blocks a request may touch; travels with a forwarded request to
/// the core that holds the block, which checks it against the block's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockClaim {
    /// No limit: the node checks no tokens, or the token has `Rights::ADMIN`.
    Any,
    /// Blocks of this owner, and reads of `PERSISTED_OWNER` blocks.
    Owner(Owner),
    /// None: the token names no block owner.
    NoOwner,
}

const NO_OWNER: &str =
    "the token names no job owner, so it opens no blocks (ask the controller for a new token)";
const OTHER_OWNER: &str = "the block belongs to another job than the token's";

/// Requests that address one block by id.
fn addresses_a_block(op: Opcode) -> bool {
    matches!(op, Opcode::BlockRead | Opcode::BlockWrite | Opcode::BlockAppend | Opcode::BlockFree)
}

/// The owner a `BlockAlloc` key allocates for; `None` when it does not
/// parse (execution answers `malformed`).
fn alloc_owner(key: &[u8]) -> Option<Owner> {
    let mut r = Reader::new(key);
    let job = r.u32("job id").ok()?;
    let meta_node = if key.len() > 5 {
        r.u8("tier").ok()?;
        r.u16("metadata node").ok()?
    } else {
        0
    };
    Some(job_owner(meta_node, job))
}

impl State {
    /// Reads the clock that expiries are checked against (nodes with a
    /// cluster secret only).
    pub(super) fn tick_access_clock(&mut self) {
        if self.cfg.secret.is_some() {
            self.access_now = Instant::now();
        }
    }

    /// Answers `Auth`, and refuses (`unauthorized`) a request the
    /// connection's token does not allow. True when the request was
    /// answered here; false to execute it.
    pub(super) fn gate(&mut self, id: ConnId, h: &Header, frame: &[u8]) -> bool {
        let Some(op) = h.op() else { return false };
        let (key, body) = frame[HEADER_LEN..].split_at(h.key_len as usize);
        if op == Opcode::Auth {
            self.authenticate(id, h, key, body);
            return true;
        }
        if self.cfg.secret.is_none() {
            return false;
        }
        let Some(need) = Rights::needed_for(op) else { return false };
        let refusal = match &self.conns[id].grant {
            None => Some("this node requires a capability token: send Auth first"),
            Some(g) if self.access_now >= g.until => Some("the token expired"),
            Some(g) if !g.rights.contains(need) => Some("the token does not grant this operation"),
            // A key that does not parse is answered `malformed` by execution.
            Some(g) if op.is_namespace() => match split_job_key(key) {
                Ok((job, _)) if job != &*g.job => Some("the token is for another job"),
                _ => None,
            },
            Some(g) if g.rights.contains(Rights::ADMIN) => None,
            Some(g) if op == Opcode::BlockAlloc || addresses_a_block(op) => match g.owner {
                None => Some(NO_OWNER),
                // Blocks of other owners are refused where they live (`block_refusal`).
                Some(o) if op == Opcode::BlockAlloc => alloc_owner(key).filter(|&a| a != o).map(|_| {
                    "the token is for another job: BlockAlloc's job id and metadata node are not the token's"
                }),
                Some(_) => None,
            },
            Some(_) => None,
        };
        let Some(msg) = refusal else { return false };
        self.answer_here(id, h, Status::Unauthorized, msg);
        true
    }

    /// What the connection's token allows with blocks (the claim a
    /// forwarded request carries).
    pub(super) fn block_claim(&self, id: ConnId) -> BlockClaim {
        match (&self.cfg.secret, &self.conns[id].grant) {
            (Some(_), Some(g)) if !g.rights.contains(Rights::ADMIN) => {
                g.owner.map_or(BlockClaim::NoOwner, BlockClaim::Owner)
            }
            // Without a grant, `gate` refuses every block request.
            _ => BlockClaim::Any,
        }
    }

    /// Why a request for a block of this core is refused under `claim`:
    /// the block has another owner (blocks of PERSIST objects of a
    /// deregistered job may be read by any job). Blocks that do not exist
    /// here pass: execution answers `not found`.
    pub(super) fn block_refusal(&self, h: &Header, key: &[u8], claim: BlockClaim) -> Option<&'static str> {
        let op = h.op().filter(|&op| addresses_a_block(op))?;
        let mine = match claim {
            BlockClaim::Any => return None,
            BlockClaim::NoOwner => return Some(NO_OWNER),
            BlockClaim::Owner(o) => o,
        };
        let b = BlockKey::decode(key).ok()?.block;
        let owner = match b.tier() {
            tier::DRAM => self.dram.owner_of(b),
            t => self.engines.iter().find(|e| e.tier() == t)?.owner_of(b),
        }
        .ok()?;
        let allowed = owner == mine || (owner == PERSISTED_OWNER && op == Opcode::BlockRead);
        (!allowed).then_some(OTHER_OWNER)
    }

    /// Verifies the token in `Auth`'s body and records what it grants. A
    /// refused token also ends any earlier grant of the connection.
    fn authenticate(&mut self, id: ConnId, h: &Header, key: &[u8], body: &[u8]) {
        if !key.is_empty() || h.flags != 0 {
            return self.answer_here(id, h, Status::Malformed, "Auth takes no key and no flags");
        }
        let Some(secret) = &self.cfg.secret else {
            // This node checks no tokens: every request is allowed anyway.
            return self.answer_here(id, h, Status::Ok, "");
        };
        let Ok(token) = std::str::from_utf8(body) else {
            self.conns[id].grant = None;
            return self.answer_here(id, h, Status::Unauthorized, "the token is not UTF-8");
        };
        let now = SystemTime::now();
        match Token::verify(secret, token, now) {
            Ok(t) => {
                let left = now
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(Duration::ZERO, |d| Duration::from_secs(t.expiry).saturating_sub(d));
                // An expiry beyond what the clock can hold is as good as never.
                let until = Instant::now()
                    .checked_add(left)
                    .unwrap_or_else(|| Instant::now() + Duration::from_secs(100 * 365 * 86_400));
                let owner = t.owner.map(|o| o.owner());
                self.conns[id].grant = Some(Grant { job: t.job.into(), owner, rights: t.rights, until });
                self.answer_here(id, h, Status::Ok, "");
            }
            Err(e) => {
                self.conns[id].grant = None;
                self.answer_here(id, h, Status::Unauthorized, &e.to_string());
            }
        }
    }

    /// Appends an answer to the connection's output now.
    pub(super) fn answer_here(&mut self, id: ConnId, h: &Header, status: Status, msg: &str) {
        let c = &mut self.conns[id];
        exec::respond(c.tx.bytes_mut(), h.request_id, h.opcode, status, msg.as_bytes());
        self.mark_dirty(id);
        self.requests += 1;
    }
}
