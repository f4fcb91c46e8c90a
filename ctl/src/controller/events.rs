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

    /// Events with a sequence number above `since`, oldest first, at most
    /// `limit`, and whether more follow them (ask again from the last one's).
    pub fn since(&self, since: u64, limit: usize) -> (Vec<Event>, bool) {
        let start = self.events.partition_point(|e| e.seq <= since);
        let newer = self.events.len() - start;
        (self.events.range(start..).take(limit).cloned().collect(), newer > limit)
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
        let (all, more) = log.since(0, 100);
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert!(!more);
        assert_eq!(log.since(4, 100).0.len(), 1);
        assert_eq!(log.last_seq(), 5);
    }

    /// A limit keeps the oldest events after `since` and says more follow:
    /// paging from the last one returned skips none.
    #[test]
    fn a_limit_pages_from_the_oldest() {
        let mut log = EventLog::new(100);
        for i in 0..5 {
            log.push(EventKind::Scale, None, None, format!("e{i}"));
        }
        let seqs = |v: &[Event]| v.iter().map(|e| e.seq).collect::<Vec<_>>();
        let (page, more) = log.since(1, 2);
        assert_eq!((seqs(&page), more), (vec![2, 3], true));
        let (page, more) = log.since(3, 2);
        assert_eq!((seqs(&page), more), (vec![4, 5], false));
        let (page, more) = log.since(5, 2);
        assert_eq!((seqs(&page), more), (vec![], false));
    }
}
