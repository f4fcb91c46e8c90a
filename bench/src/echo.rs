//! The floor: a TCP server that answers every Pollen-framed request with a
//! fixed-size response and does nothing else. It polls the way a Pollen core
//! does on the epoll backend (nonblocking sockets, one epoll instance, spin
//! for an idle budget, then block), on the same CPU, so the difference between
//! it and Pollen is what Pollen does per request beyond moving the bytes.

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use dataplane::proto::{decode_header, encode_header, Header, Limits, HEADER_LEN};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
/// Stop reading a connection while this much response data is unsent (as the node does).
const MAX_UNSENT: usize = 4 << 20;

/// A running echo server; stopped and joined on `stop` or drop.
pub struct EchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    /// Cumulative nanoseconds of loop passes that handled events (as a Pollen core counts busy).
    busy_ns: Arc<AtomicU64>,
    started: Instant,
}

impl EchoServer {
    /// Listens on an ephemeral loopback port. Each request (any key and body up
    /// to `max_body`) is answered by a frame with the same opcode and id and a
    /// body of `response_body` bytes.
    pub fn start(
        cpu: Option<usize>,
        response_body: usize,
        max_body: usize,
        spin: Duration,
    ) -> anyhow::Result<Self> {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the echo server")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let poll = Poll::new().context("creating the echo server's epoll instance")?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let stop = Arc::new(AtomicBool::new(false));
        let mut server = Server {
            poll,
            listener: TcpListener::from_std(std_listener),
            conns: Slab::new(),
            body: crate::wire::fill(response_body),
            limits: Limits::new(max_body),
            spin,
            busy_ns: Arc::new(AtomicU64::new(0)),
        };
        let busy_ns = Arc::clone(&server.busy_ns);
        let stop2 = Arc::clone(&stop);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("bench-echo".into())
            .spawn(move || {
                let pinned = cpu.map(crate::pin::pin_current_thread).transpose();
                let failed = pinned.as_ref().err().map(|e| format!("{e:#}"));
                let _ = ready_tx.send(failed);
                pinned?;
                server.run(&stop2)
            })
            .context("spawning the echo server thread")?;
        let server = EchoServer { addr, stop, waker, thread: Some(thread), busy_ns, started: Instant::now() };
        match ready_rx.recv() {
            Ok(None) => Ok(server),
            Ok(Some(e)) => Err(anyhow!("echo server: {e}")),
            Err(_) => Err(anyhow!("the echo server thread died while starting")),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cumulative (busy, wall-clock) nanoseconds since start.
    pub fn busy(&self) -> (u64, u64) {
        (self.busy_ns.load(Ordering::Relaxed), self.started.elapsed().as_nanos() as u64)
    }

    fn shutdown(&mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow!("the echo server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

struct Conn {
    stream: TcpStream,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    wbuf: Vec<u8>,
    wpos: usize,
}

struct Server {
    poll: Poll,
    listener: TcpListener,
    conns: Slab<Conn>,
    body: Vec<u8>,
    limits: Limits,
    spin: Duration,
    busy_ns: Arc<AtomicU64>,
}

impl Server {
    fn run(&mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        self.poll.registry().register(&mut self.listener, LISTENER, Interest::READABLE)?;
        let mut events = Events::with_capacity(256);
        let mut last_work = Instant::now();
        let mut busy = 0u64;
        while !stop.load(Ordering::Acquire) {
            let timeout = if last_work.elapsed() < self.spin { Some(Duration::ZERO) } else { None };
            let mut pass = Instant::now();
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("echo server: epoll_wait failed"),
            }
            if timeout.is_none() {
                // Time parked in epoll is idle, not part of the pass.
                pass = Instant::now();
            }
            if events.is_empty() {
                continue;
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept()?,
                    WAKER => {}
                    Token(k) => {
                        if self.serve(k).is_err() {
                            // A broken or misbehaving client only loses its own connection.
                            if let Some(mut c) = self.conns.try_remove(k) {
                                let _ = self.poll.registry().deregister(&mut c.stream);
                            }
                        }
                    }
                }
            }
            last_work = Instant::now();
            busy += (last_work - pass).as_nanos() as u64;
            self.busy_ns.store(busy, Ordering::Relaxed);
        }
        Ok(())
    }

    fn accept(&mut self) -> anyhow::Result<()> {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    stream.set_nodelay(true)?;
                    let entry = self.conns.vacant_entry();
                    self.poll.registry().register(
                        &mut stream,
                        Token(entry.key()),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    let rlen = (HEADER_LEN + self.limits.max_key + self.limits.max_body).max(64 * 1024);
                    entry.insert(Conn {
                        stream,
                        rbuf: vec![0; rlen],
                        rstart: 0,
                        rend: 0,
                        wbuf: Vec::new(),
                        wpos: 0,
                    });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("echo server: accept failed"),
            }
        }
    }

    /// Sends what is pending, then reads and answers until the socket is
    /// drained or too much output is queued. `Err` closes the connection.
    fn serve(&mut self, k: usize) -> std::io::Result<()> {
        let Some(c) = self.conns.get_mut(k) else { return Ok(()) };
        loop {
            flush(c)?;
            if c.wbuf.len() - c.wpos > MAX_UNSENT {
                // Resumed by the next writable edge.
                return Ok(());
            }
            if c.rend == c.rbuf.len() {
                c.rbuf.copy_within(c.rstart..c.rend, 0);
                c.rend -= c.rstart;
                c.rstart = 0;
            }
            match c.stream.read(&mut c.rbuf[c.rend..]) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(n) => c.rend += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            loop {
                let h = match decode_header(&c.rbuf[c.rstart..c.rend], &self.limits, true) {
                    Ok(Some(h)) => h,
                    Ok(None) => break,
                    Err(_) => return Err(ErrorKind::InvalidData.into()),
                };
                if c.rend - c.rstart < h.frame_len() {
                    break;
                }
                c.rstart += h.frame_len();
                let resp = Header {
                    opcode: h.opcode,
                    flags: 0,
                    status: 0,
                    request_id: h.request_id,
                    key_len: 0,
                    body_len: self.body.len() as u32,
                };
                let at = c.wbuf.len();
                c.wbuf.resize(at + HEADER_LEN, 0);
                encode_header(&resp, &mut c.wbuf[at..]);
                c.wbuf.extend_from_slice(&self.body);
            }
            if c.rstart == c.rend {
                c.rstart = 0;
                c.rend = 0;
            }
        }
    }
}

fn flush(c: &mut Conn) -> std::io::Result<()> {
    while c.wpos < c.wbuf.len() {
        match c.stream.write(&c.wbuf[c.wpos..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => c.wpos += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    if c.wpos == c.wbuf.len() {
        c.wbuf.clear();
        c.wpos = 0;
    } else if c.wpos > c.wbuf.len() / 2 {
        c.wbuf.drain(..c.wpos);
        c.wpos = 0;
    }
    Ok(())
}
