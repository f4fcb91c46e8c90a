//! The controller's event log: every decision and state change, in order,
//! in a bounded ring (the oldest events fall off), served by `GET /v1/events`.

use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::api::{Event, EventKind};

/// Events kept; older ones are dropped.
pub const DEFAULT_CAPACITY: usize = 10_000;

pub struct EventLog {
    next_seq: u64,
    capacity: usize,
    events: VecDeque<Event>,
}

impl EventLog {
    pub fn new(capacity: usize) -> EventLog {
        assert!(capacity > 0, "an event log holds at least one event");
        EventLog { next_seq: 1, capacity, events: VecDeque::with_capacity(capacity.min(1024)) }
    }

    /// Records an event, logs it, and returns its sequence number.
    pub fn push(
        &mut self,
        kind: EventKind,
        node: Option<&str>,
        job: Option<&str>,
        message: impl Into<String>,
    ) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let message = message.into();
        tracing::info!(seq, kind = %kind, node, job, "{message}");
        if self.events.len() == self.capacity {
            self.events.pop_front();
        }
        self.events.push_back(Event {
            seq,
            unix_ms,
            kind,
            node: node.map(str::to_string),
            job: job.map(str::to_string),
            message,
        });
        seq
    }

    /// Events with a sequence number above `since`, oldest first, at most `limit`
    /// (the newest ones when there are more).
    pub fn since(&self, since: u64, limit: usize) -> Vec<Event> {
        let newer: Vec<&Event> = self.events.iter().filter(|e| e.seq > since).collect();
        let skip = newer.len().saturating_sub(limit);
        newer.into_iter().skip(skip).cloned().collect()
    }

    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_ordered() {
        let mut log = EventLog::new(3);
        for i in 0..5 {
            log.push(EventKind::Scale, None, None, format!("e{i}"));
        }
        let all = log.since(0, 100);
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(log.since(4, 100).len(), 1);
        assert_eq!(log.since(0, 1)[0].message, "e4", "a limit keeps the newest");
        assert_eq!(log.last_seq(), 5);
    }
}
