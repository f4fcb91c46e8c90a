//! epoll transport through mio: the fallback when io_uring is unavailable.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::{CloseList, CloseTimeouts, ConnId, EventSink, Output, Transport};
use crate::node::NetBackend;

const WAKER: Token = Token(usize::MAX);
const LISTENER_BASE: usize = usize::MAX - 64;
/// Bytes read from one connection per poll before others get a turn.
const READ_BUDGET: usize = 1 << 20;
/// Pieces in one gathering write (header, data, header, data, …).
const MAX_IOV: usize = 64;

struct Conn {
    stream: TcpStream,
    /// Output; `sent` bytes of it are written. Read buffers spliced in go
    /// out through a gathering write, with no copy.
    out: Output,
    sent: usize,
    reading: bool,
    /// Edge-triggered readiness that has not been consumed yet.
    readable: bool,
    /// The peer's FIN (or an error) was signalled: read until EOF, since no
    /// further edge will come for it.
    hup: bool,
    write_interest: bool,
    /// Close requested: input is discarded, output finishes, then our write
    /// side is shut.
    closing: bool,
    /// Our write side is shut (the close's output is all out); waiting for
    /// the peer's EOF.
    shut: bool,
    /// The peer's EOF was read.
    eof: bool,
    dead: bool,
    /// While closing: when the close stops waiting, and its slot in `closes`.
    deadline: Option<Instant>,
    close_slot: usize,
}

pub struct EpollTransport {
    poll: Poll,
    events: Events,
    listeners: Vec<TcpListener>,
    conns: Slab<Conn>,
    max_conns: usize,
    scratch: Vec<u8>,
    /// Connections to revisit at the next poll: readable with budget left,
    /// resumed, closing or dead.
    revisit: Vec<ConnId>,
    /// Connections with output queued since the last flush.
    dirty: Vec<ConnId>,
    /// Connections with a close under way.
    closes: CloseList,
    /// Closes past their deadline, found by `CloseList::expire` (reused).
    expired: Vec<ConnId>,
    timeouts: CloseTimeouts,
    waker_fd: RawFd,
    /// Listener 0 (the shared port) is out of its group (`set_accepting`).
    paused: bool,
}

impl EpollTransport {
    /// `waker_fd` is an eventfd the core's peers write to wake a parked poll.
    pub fn new(
        listeners: Vec<std::net::TcpListener>,
        waker_fd: RawFd,
        max_conns: usize,
        rx_buf: usize,
    ) -> io::Result<Self> {
        let poll = Poll::new()?;
        let mut ls = Vec::new();
        for (i, l) in listeners.into_iter().enumerate() {
            l.set_nonblocking(true)?;
            let mut l = TcpListener::from_std(l);
            poll.registry().register(&mut l, Token(LISTENER_BASE + i), Interest::READABLE)?;
            ls.push(l);
        }
        poll.registry().register(&mut SourceFd(&waker_fd), WAKER, Interest::READABLE)?;
        Ok(EpollTransport {
            poll,
            events: Events::with_capacity(1024),
            listeners: ls,
            conns: Slab::with_capacity(max_conns.min(1024)),
            max_conns,
            scratch: vec![0; rx_buf],
            revisit: Vec::new(),
            dirty: Vec::new(),
            closes: CloseList::new(),
            expired: Vec::new(),
            timeouts: CloseTimeouts::DEFAULT,
            waker_fd,
            paused: false,
        })
    }

    #[cfg(test)]
    pub(super) fn set_close_timeouts(&mut self, t: CloseTimeouts) {
        self.timeouts = t;
    }

    fn accept_all(&mut self, li: usize, sink: &mut dyn EventSink) -> usize {
        let mut n = 0;
        loop {
            match self.listeners[li].accept() {
                Ok((mut stream, _)) => {
                    if self.conns.len() >= self.max_conns {
                        tracing::warn!(max = self.max_conns, "connection limit reached; refusing");
                        continue; // dropping the stream closes it
                    }
                    let _ = stream.set_nodelay(true);
                    let entry = self.conns.vacant_entry();
                    let id = entry.key();
                    if let Err(e) = self.poll.registry().register(&mut stream, Token(id), Interest::READABLE)
                    {
                        tracing::warn!(error = %e, "register failed");
                        continue;
                    }
                    entry.insert(Conn {
                        stream,
                        out: Output::new(),
                        sent: 0,
                        reading: true,
                        readable: true,
                        hup: false,
                        write_interest: false,
                        closing: false,
                        shut: false,
                        eof: false,
                        dead: false,
                        deadline: None,
                        close_slot: 0,
                    });
                    sink.accepted(id);
                    self.revisit.push(id);
                    n += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: keep serving the connections we have.
                    tracing::warn!(error = %e, "accept failed");
                    return n;
                }
            }
        }
    }

    /// Reads until WouldBlock, EOF or the budget; returns true if it should
    /// be revisited. A closing connection's input is read and discarded.
    fn read_conn(&mut self, id: ConnId, sink: &mut dyn EventSink) -> bool {
        let mut budget = READ_BUDGET;
        loop {
            let Some(c) = self.conns.get_mut(id) else { return false };
            if c.dead || c.eof || !(c.reading || c.closing) {
                return false;
            }
            if budget == 0 {
                return true;
            }
            match c.stream.read(&mut self.scratch) {
                Ok(0) => {
                    c.eof = true;
                    if !c.closing {
                        // Half-closed: the consumer answers, then closes.
                        sink.peer_closed(id);
                        return false;
                    }
                    // A lingering close is done; one still writing ends
                    // when its output is out (see `end_output`).
                    c.dead = c.shut;
                    return c.dead;
                }
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    // A short read emptied the socket: with edge triggering the
                    // next arrival raises a new edge, so skip the read that
                    // would only return EAGAIN (one syscall per request saved).
                    let drained = n < self.scratch.len() && !c.hup;
                    if drained {
                        c.readable = false;
                    }
                    if !c.closing {
                        sink.received(id, &self.scratch[..n]);
                    }
                    if drained {
                        return false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.readable = false;
                    return false;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    c.dead = true;
                    return true;
                }
            }
        }
    }

    /// Where new output for `conn` goes (written at the next flush), or
    /// `None` when the connection is gone or its write side shut.
    fn output_of(&mut self, conn: ConnId) -> Option<&mut Output> {
        let c = self.conns.get_mut(conn)?;
        if c.dead || c.shut {
            return None;
        }
        if c.out.is_empty() {
            c.sent = 0;
        }
        self.dirty.push(conn);
        Some(&mut c.out)
    }

    fn write_conn(&mut self, id: ConnId, sink: Option<&mut dyn EventSink>) {
        let Some(c) = self.conns.get_mut(id) else { return };
        if c.dead {
            return;
        }
        let had = c.out.len() - c.sent;
        let mut pieces: [IoSlice<'_>; MAX_IOV] = [IoSlice::new(&[]); MAX_IOV];
        while c.sent < c.out.len() {
            let mut n = 0;
            c.out.gather(c.sent, usize::MAX, MAX_IOV, |p| {
                pieces[n] = IoSlice::new(p);
                n += 1;
            });
            match c.stream.write_vectored(&pieces[..n]) {
                Ok(0) => {
                    c.dead = true;
                    break;
                }
                Ok(n) => c.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    c.dead = true;
                    break;
                }
            }
        }
        let pending = c.sent < c.out.len();
        if !pending {
            c.out.clear();
            c.sent = 0;
        }
        if pending != c.write_interest && !c.dead {
            let interest = if pending { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
            if self.poll.registry().reregister(&mut c.stream, Token(id), interest).is_err() {
                c.dead = true;
            }
            c.write_interest = pending;
        }
        if (c.closing && !c.shut && !pending) || c.dead {
            self.revisit.push(id);
        } else if had > 0 && !pending {
            if let Some(sink) = sink {
                sink.drained(id);
            }
        }
    }

    /// A closing connection whose output is all written: shuts our write
    /// side, so the peer sees EOF right after our last byte, and lingers for
    /// the peer's EOF (closing now, with input unread, would send a reset
    /// that can destroy those last bytes in the peer's kernel).
    fn end_output(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(id) else { return };
        if !c.closing || c.shut || c.dead || c.sent < c.out.len() {
            return;
        }
        c.shut = true;
        if c.eof || c.stream.shutdown(Shutdown::Write).is_err() {
            c.dead = true;
            return;
        }
        let d = Instant::now() + self.timeouts.linger;
        c.deadline = Some(d);
        self.closes.note(d);
    }

    /// Ends closes past their deadline; returns `timeout` shortened to the
    /// next deadline.
    fn expire_closes(&mut self, timeout: Option<Duration>) -> Option<Duration> {
        let conns = &self.conns;
        let deadline = |id| {
            let c: &Conn = conns.get(id)?;
            debug_assert!(c.closing && (c.dead || c.deadline.is_some()));
            c.deadline.filter(|_| !c.dead)
        };
        let timeout = self.closes.expire(timeout, deadline, &mut self.expired);
        for id in self.expired.drain(..) {
            let Some(c) = self.conns.get_mut(id) else { continue };
            tracing::debug!(conn = id, shut = c.shut, unsent = c.out.len() - c.sent, "close timed out");
            c.dead = true;
            self.revisit.push(id);
        }
        timeout
    }

    fn drop_conn(&mut self, id: ConnId, sink: &mut dyn EventSink) {
        if let Some(mut c) = self.conns.try_remove(id) {
            if c.closing {
                if let Some(moved) = self.closes.remove(c.close_slot) {
                    self.conns[moved].close_slot = c.close_slot;
                }
            }
            let _ = self.poll.registry().deregister(&mut c.stream);
            sink.closed(id);
        }
    }
}

impl Transport for EpollTransport {
    fn backend(&self) -> NetBackend {
        NetBackend::Epoll
    }

    fn poll(&mut self, timeout: Option<Duration>, sink: &mut dyn EventSink) -> io::Result<usize> {
        let mut n = 0;
        let timeout = self.expire_closes(timeout);
        // Work carried over from the last pass first: it cannot wait for an edge.
        let revisit = std::mem::take(&mut self.revisit);
        let timeout = if revisit.is_empty() { timeout } else { Some(Duration::ZERO) };
        for id in revisit {
            self.end_output(id);
            let Some(c) = self.conns.get(id) else { continue };
            if c.dead {
                self.drop_conn(id, sink);
                n += 1;
            } else if c.readable && (c.reading || c.closing) && self.read_conn(id, sink) {
                self.revisit.push(id);
            }
        }
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(n),
            Err(e) => return Err(e),
        }
        // Take the event list out so handlers can borrow `self`; put it back after.
        let events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        for e in events.iter() {
            let (token, writable) = (e.token(), e.is_writable());
            let hup = e.is_read_closed() || e.is_error();
            let readable = e.is_readable() || hup;
            n += 1;
            match token {
                WAKER => {
                    let mut b = [0u8; 8];
                    // SAFETY: reading 8 bytes into a local array from our own eventfd.
                    let _ = unsafe { nix::libc::read(self.waker_fd, b.as_mut_ptr().cast(), 8) };
                }
                Token(t) if t >= LISTENER_BASE => {
                    // A paused listener is not listening: accept would fail.
                    if !(self.paused && t == LISTENER_BASE) {
                        n += self.accept_all(t - LISTENER_BASE, sink);
                    }
                }
                Token(id) => {
                    if writable {
                        self.write_conn(id, Some(sink));
                    }
                    if readable {
                        if let Some(c) = self.conns.get_mut(id) {
                            c.readable = true;
                            c.hup |= hup;
                        }
                        if self.read_conn(id, sink) {
                            self.revisit.push(id);
                        }
                    }
                }
            }
        }
        self.events = events;
        Ok(n)
    }

    fn send(&mut self, conn: ConnId, buf: &mut Vec<u8>) {
        match self.output_of(conn) {
            Some(dst) => dst.append_bytes(buf),
            None => buf.clear(),
        }
    }

    fn send_output(&mut self, conn: ConnId, out: &mut Output) {
        match self.output_of(conn) {
            Some(dst) => dst.append(out),
            None => out.clear(),
        }
    }

    fn unsent(&self, conn: ConnId) -> usize {
        self.conns.get(conn).map_or(0, |c| c.out.len() - c.sent)
    }

    fn set_accepting(&mut self, on: bool, sink: &mut dyn EventSink) -> io::Result<usize> {
        if self.listeners.is_empty() || self.paused != on {
            return Ok(0);
        }
        // What the kernel queued before the pause is served, not reset.
        let n = if on { 0 } else { self.accept_all(0, sink) };
        super::set_listening(&self.listeners[0], on)?;
        self.paused = !on;
        // Connections that arrived while listening resumed raised their edge
        // already or will; take any queued before the next one.
        Ok(if on { self.accept_all(0, sink) } else { n })
    }

    fn set_reading(&mut self, conn: ConnId, on: bool) {
        if let Some(c) = self.conns.get_mut(conn) {
            let was = c.reading;
            c.reading = on;
            if on && !was {
                self.revisit.push(conn);
            }
        }
    }

    fn close(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(conn) else { return };
        if c.closing || c.dead {
            return;
        }
        c.closing = true;
        let d = Instant::now() + self.timeouts.drain;
        c.deadline = Some(d);
        c.close_slot = self.closes.insert(conn, d);
        self.revisit.push(conn);
    }

    fn flush(&mut self) -> io::Result<()> {
        let dirty = std::mem::take(&mut self.dirty);
        for id in &dirty {
            self.write_conn(*id, None);
        }
        self.dirty = dirty;
        self.dirty.clear();
        Ok(())
    }
}
