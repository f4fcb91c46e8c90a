//! epoll transport through mio: the fallback when io_uring is unavailable.

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::{ConnId, EventSink, Transport};
use crate::node::NetBackend;

const WAKER: Token = Token(usize::MAX);
const LISTENER_BASE: usize = usize::MAX - 64;
/// Bytes read from one connection per poll before others get a turn.
const READ_BUDGET: usize = 1 << 20;

struct Conn {
    stream: TcpStream,
    out: Vec<u8>,
    sent: usize,
    reading: bool,
    /// Edge-triggered readiness that has not been consumed yet.
    readable: bool,
    write_interest: bool,
    closing: bool,
    dead: bool,
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
    waker_fd: RawFd,
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
            waker_fd,
        })
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
                        out: Vec::new(),
                        sent: 0,
                        reading: true,
                        readable: true,
                        write_interest: false,
                        closing: false,
                        dead: false,
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

    /// Reads until WouldBlock or the budget; returns true if it should be revisited.
    fn read_conn(&mut self, id: ConnId, sink: &mut dyn EventSink) -> bool {
        let mut budget = READ_BUDGET;
        loop {
            let Some(c) = self.conns.get_mut(id) else { return false };
            if !c.reading || c.dead || c.closing {
                return false;
            }
            if budget == 0 {
                return true;
            }
            match c.stream.read(&mut self.scratch) {
                Ok(0) => {
                    c.dead = true;
                    return true;
                }
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    sink.received(id, &self.scratch[..n]);
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

    fn write_conn(&mut self, id: ConnId, sink: Option<&mut dyn EventSink>) {
        let Some(c) = self.conns.get_mut(id) else { return };
        if c.dead {
            return;
        }
        let had = c.out.len() - c.sent;
        while c.sent < c.out.len() {
            match c.stream.write(&c.out[c.sent..]) {
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
        if (c.closing && !pending) || c.dead {
            self.revisit.push(id);
        } else if had > 0 && !pending {
            if let Some(sink) = sink {
                sink.drained(id);
            }
        }
    }

    fn drop_conn(&mut self, id: ConnId, sink: &mut dyn EventSink) {
        if let Some(mut c) = self.conns.try_remove(id) {
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
        // Work carried over from the last pass first: it cannot wait for an edge.
        let revisit = std::mem::take(&mut self.revisit);
        let timeout = if revisit.is_empty() { timeout } else { Some(Duration::ZERO) };
        for id in revisit {
            let Some(c) = self.conns.get(id) else { continue };
            if c.dead || (c.closing && c.sent >= c.out.len()) {
                self.drop_conn(id, sink);
                n += 1;
            } else if c.readable && c.reading && self.read_conn(id, sink) {
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
            let readable = e.is_readable() || e.is_read_closed() || e.is_error();
            n += 1;
            match token {
                WAKER => {
                    let mut b = [0u8; 8];
                    // SAFETY: reading 8 bytes into a local array from our own eventfd.
                    let _ = unsafe { nix::libc::read(self.waker_fd, b.as_mut_ptr().cast(), 8) };
                }
                Token(t) if t >= LISTENER_BASE => {
                    n += self.accept_all(t - LISTENER_BASE, sink);
                }
                Token(id) => {
                    if writable {
                        self.write_conn(id, Some(sink));
                    }
                    if readable {
                        if let Some(c) = self.conns.get_mut(id) {
                            c.readable = true;
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
        let Some(c) = self.conns.get_mut(conn) else {
            buf.clear();
            return;
        };
        if c.dead {
            buf.clear();
            return;
        }
        if c.out.is_empty() {
            std::mem::swap(&mut c.out, buf);
            c.sent = 0;
        } else {
            c.out.extend_from_slice(buf);
            buf.clear();
        }
        self.dirty.push(conn);
    }

    fn unsent(&self, conn: ConnId) -> usize {
        self.conns.get(conn).map_or(0, |c| c.out.len() - c.sent)
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
        if let Some(c) = self.conns.get_mut(conn) {
            c.closing = true;
            self.revisit.push(conn);
        }
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
