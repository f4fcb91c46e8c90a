//! Access control per connection: on a node with a cluster secret, a
//! connection presents a capability token once (`Auth`); the token is
//! verified then (HMAC-SHA256, `crate::auth`), and each later request is
//! only compared with what it granted: the job, the rights, the expiry.

use std::time::{Duration, Instant, SystemTime};

use super::{exec, State};
use crate::auth::{Rights, Token};
use crate::proto::{split_job_key, Header, Opcode, Status, HEADER_LEN};
use crate::transport::ConnId;

/// What a connection's token allows.
pub(super) struct Grant {
    job: Box<str>,
    rights: Rights,
    until: Instant,
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
            Some(_) => None,
        };
        let Some(msg) = refusal else { return false };
        self.answer_here(id, h, Status::Unauthorized, msg);
        true
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
                self.conns[id].grant = Some(Grant { job: t.job.into(), rights: t.rights, until });
                self.answer_here(id, h, Status::Ok, "");
            }
            Err(e) => {
                self.conns[id].grant = None;
                self.answer_here(id, h, Status::Unauthorized, &e.to_string());
            }
        }
    }

    /// Appends an answer to the connection's output now.
    fn answer_here(&mut self, id: ConnId, h: &Header, status: Status, msg: &str) {
        let c = &mut self.conns[id];
        exec::respond(c.tx.bytes_mut(), h.request_id, h.opcode, status, msg.as_bytes());
        self.mark_dirty(id);
        self.requests += 1;
    }
}
