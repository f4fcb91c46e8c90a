//! The transport contract, checked against every backend: epoll, io_uring,
//! and io_uring with a tiny receive pool (so it keeps running out of
//! buffers). io_uring runs are skipped, saying why, where `uring::probe`
//! fails.

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::epoll::EpollTransport;
use super::uring::{self, UringTransport};
use super::{CloseTimeouts, ConnId, EventSink, Output, Transport};
use crate::core::waker::Waker;
use crate::node::NetBackend;
use crate::storage::flash::testing;

const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Epoll,
    Uring,
    /// Eight 4 KiB receive buffers: every test runs the pool dry.
    UringTinyPool,
}

/// Records what a transport reports and checks the id and ordering rules as
/// it goes.
#[derive(Default)]
struct Recorder {
    live: HashSet<ConnId>,
    accepted: Vec<ConnId>,
    data: HashMap<ConnId, Vec<u8>>,
    drained: HashMap<ConnId, usize>,
    closed: Vec<ConnId>,
    /// Live connections whose close was requested (`Harness::close`).
    closing: HashSet<ConnId>,
    /// Live connections whose peer finished sending.
    eof: HashSet<ConnId>,
    /// `peer_closed` events not yet seen by the harness.
    new_eofs: Vec<ConnId>,
}

impl EventSink for Recorder {
    fn accepted(&mut self, conn: ConnId) {
        assert!(self.live.insert(conn), "id {conn} reused before its closed event");
        self.accepted.push(conn);
    }

    fn received(&mut self, conn: ConnId, data: &[u8]) {
        assert!(self.live.contains(&conn), "bytes for unknown connection {conn}");
        assert!(!data.is_empty(), "empty receive for {conn}");
        assert!(!self.eof.contains(&conn), "bytes for {conn} after its peer_closed");
        assert!(!self.closing.contains(&conn), "bytes for {conn} after its close was requested");
        self.data.entry(conn).or_default().extend_from_slice(data);
    }

    fn peer_closed(&mut self, conn: ConnId) {
        assert!(self.live.contains(&conn), "peer_closed for unknown connection {conn}");
        assert!(self.eof.insert(conn), "peer_closed twice for {conn}");
        assert!(!self.closing.contains(&conn), "peer_closed for {conn} after its close was requested");
        self.new_eofs.push(conn);
    }

    fn drained(&mut self, conn: ConnId) {
        assert!(self.live.contains(&conn), "drained for unknown connection {conn}");
        *self.drained.entry(conn).or_default() += 1;
    }

    fn closed(&mut self, conn: ConnId) {
        assert!(self.live.remove(&conn), "closed twice, or never accepted: {conn}");
        self.closing.remove(&conn);
        self.eof.remove(&conn);
        self.closed.push(conn);
    }
}

struct Harness {
    // Declared before `waker`: the transport watches the waker's fd.
    t: Box<dyn Transport>,
    sink: Recorder,
    addr: SocketAddr,
    waker: Arc<Waker>,
    backend: Backend,
    /// Close a connection as soon as its peer finished sending, as a
    /// consumer with nothing left to answer does.
    auto_close: bool,
}

fn harness(b: Backend) -> Option<Harness> {
    harness_with(b, 1024, CloseTimeouts::DEFAULT)
}

fn harness_with(b: Backend, max_conns: usize, timeouts: CloseTimeouts) -> Option<Harness> {
    if b != Backend::Epoll {
        if let Err(reason) = uring::probe() {
            eprintln!("skipping {b:?}: io_uring unavailable: {reason}");
            return None;
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("local addr");
    let waker = Arc::new(Waker::new().expect("eventfd"));
    let (fd, ls) = (waker.fd(), vec![l]);
    let t: Box<dyn Transport> = match b {
        Backend::Epoll => {
            let mut t = EpollTransport::new(ls, fd, max_conns, 256 << 10).expect("epoll");
            t.set_close_timeouts(timeouts);
            Box::new(t)
        }
        Backend::Uring | Backend::UringTinyPool => {
            let mut t = if b == Backend::Uring {
                UringTransport::new(ls, fd, max_conns, 256 << 10)
            } else {
                UringTransport::with_buffers(ls, fd, max_conns, 4096, 8)
            }
            .expect("io_uring");
            t.set_close_timeouts(timeouts);
            Box::new(t)
        }
    };
    let want = if b == Backend::Epoll { NetBackend::Epoll } else { NetBackend::Uring };
    assert_eq!(t.backend(), want);
    Some(Harness { t, sink: Recorder::default(), addr, waker, backend: b, auto_close: true })
}

impl Harness {
    /// One core-loop pass: poll, then flush.
    fn pass(&mut self) {
        self.t.poll(Some(Duration::from_millis(2)), &mut self.sink).expect("poll");
        self.after_poll();
    }

    fn after_poll(&mut self) {
        for id in std::mem::take(&mut self.sink.new_eofs) {
            if self.auto_close {
                self.close(id);
            }
        }
        self.t.flush().expect("flush");
    }

    fn close(&mut self, id: ConnId) {
        assert!(self.sink.live.contains(&id), "close of unknown connection {id}");
        self.sink.closing.insert(id);
        self.t.close(id);
    }

    fn until(&mut self, what: &str, mut done: impl FnMut(&mut Harness) -> bool) {
        let start = Instant::now();
        while !done(self) {
            assert!(start.elapsed() < DEADLINE, "{:?}: timed out waiting for {what}", self.backend);
            self.pass();
        }
    }

    fn connect(&mut self) -> (TcpStream, ConnId) {
        let s = TcpStream::connect(self.addr).expect("connect");
        s.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let before = self.sink.accepted.len();
        self.until("an accept", |h| h.sink.accepted.len() > before);
        assert_eq!(self.sink.accepted.len(), before + 1);
        (s, self.sink.accepted[before])
    }

    fn received(&self, id: ConnId) -> usize {
        self.sink.data.get(&id).map_or(0, Vec::len)
    }

    fn take(&mut self, id: ConnId) -> Vec<u8> {
        self.sink.data.remove(&id).unwrap_or_default()
    }

    /// `id`'s current holder was reported closed (ids are reused after).
    fn is_closed(&self, id: ConnId) -> bool {
        !self.sink.live.contains(&id)
    }
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len).map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 24) as u8).collect()
}

fn read_n(mut s: TcpStream, n: usize) -> JoinHandle<io::Result<Vec<u8>>> {
    thread::spawn(move || {
        let mut v = vec![0; n];
        s.read_exact(&mut v)?;
        Ok(v)
    })
}

fn write_all(mut s: TcpStream, data: Vec<u8>) -> JoinHandle<io::Result<()>> {
    thread::spawn(move || s.write_all(&data))
}

fn accept_and_echo(b: Backend) {
    let Some(mut h) = harness(b) else { return };
    let (mut s, id) = h.connect();
    for round in 0..3 {
        let msg = format!("hello, pollen #{round}").into_bytes();
        s.write_all(&msg).unwrap();
        h.until("the message", |h| h.received(id) >= msg.len());
        let mut buf = h.take(id);
        assert_eq!(buf, msg);
        h.t.send(id, &mut buf);
        assert!(buf.is_empty(), "send leaves the caller's buffer empty");
        h.until("the reply to leave", |h| h.t.unsent(id) == 0);
        let mut back = vec![0; msg.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
    }
    assert!(h.sink.closed.is_empty());
}

fn many_connections(b: Backend) {
    let Some(mut h) = harness(b) else { return };
    const N: usize = 100;
    for wave in 0..2 {
        let mut clients: Vec<TcpStream> = (0..N)
            .map(|i| {
                let mut s = TcpStream::connect(h.addr).expect("connect");
                s.set_read_timeout(Some(DEADLINE)).unwrap();
                s.write_all(&(i as u32).to_le_bytes()).unwrap();
                s
            })
            .collect();
        let first = h.sink.accepted.len();
        h.until("every client's index", |h| {
            h.sink.accepted.len() == first + N
                && h.sink.accepted[first..].iter().all(|&id| h.received(id) == 4)
        });
        let ids: Vec<ConnId> = h.sink.accepted[first..].to_vec();
        for &id in &ids {
            let idx = u32::from_le_bytes(h.take(id).try_into().unwrap());
            let mut reply = format!("client {idx} wave {wave}").into_bytes();
            h.t.send(id, &mut reply);
        }
        h.t.flush().unwrap();
        for (i, s) in clients.iter_mut().enumerate() {
            let want = format!("client {i} wave {wave}").into_bytes();
            let mut got = vec![0; want.len()];
            s.read_exact(&mut got).unwrap();
            assert_eq!(got, want);
        }
        drop(clients);
        h.until("every close", |h| ids.iter().all(|&id| h.is_closed(id)));
        assert!(h.sink.live.is_empty());
    }
}

fn large_transfer(b: Backend) {
    let Some(mut h) = harness(b) else { return };
    let (s, id) = h.connect();
    let payload = pattern(8 << 20, 1);
    let writer = write_all(s.try_clone().unwrap(), payload.clone());
    let reader = read_n(s, payload.len());
    let (mut echoed, mut max_unsent) = (0, 0);
    h.until("the echo", |h| {
        let mut d = h.take(id);
        echoed += d.len();
        h.t.send(id, &mut d);
        max_unsent = max_unsent.max(h.t.unsent(id));
        reader.is_finished()
    });
    writer.join().unwrap().expect("client write");
    let got = reader.join().unwrap().expect("client read");
    assert_eq!(echoed, payload.len());
    assert!(got == payload, "{b:?}: echoed bytes differ");
    assert!(max_unsent > 0);
    // The client's threads dropped both handles of the socket.
    h.until("the close", |h| h.is_closed(id));
}

/// Responses with read buffers spliced in (header bytes, data buffer,
/// header, …) arrive as one ordered stream, also when they queue behind a
/// send in flight and when one gathering send cannot take them all; each
/// buffer goes back to its pool once its bytes are out.
fn gathered_output(b: Backend) {
    let Some(mut h) = harness(b) else { return };
    let (s, id) = h.connect();
    let pool = testing::pool(256);
    let mut expect = Vec::new();
    let mut seed = 7;
    for batch in 0..40 {
        let mut out = Output::new();
        // More pieces than one gathering send carries (64), in some batches.
        for i in 0..(1 + batch % 5) * 20 {
            let head = pattern(24 + i % 7, seed);
            let data = pattern(1 + (seed as usize * 997) % 4096, seed + 1);
            seed += 2;
            out.bytes_mut().extend_from_slice(&head);
            expect.extend_from_slice(&head);
            match testing::read_buf(&pool, &data) {
                Some(buf) => out.push_buf(buf),
                None => out.bytes_mut().extend_from_slice(&data),
            }
            expect.extend_from_slice(&data);
        }
        h.t.send_output(id, &mut out);
        assert!(out.is_empty());
        if batch % 3 == 0 {
            // Plain bytes queue behind gathered output and stay in order.
            let mut tail = pattern(100, seed);
            expect.extend_from_slice(&tail);
            h.t.send(id, &mut tail);
        }
        h.pass();
    }
    let reader = read_n(s, expect.len());
    h.until("the reader", |_| reader.is_finished());
    let got = reader.join().unwrap().expect("client read");
    assert!(got == expect, "{b:?}: gathered bytes differ");
    h.until("the pool's buffers", |h| h.t.unsent(id) == 0 && pool.available() == 256);
}

fn reading_off_holds_data_back(b: Backend) {
    let Some(mut h) = harness(b) else { return };
    let (s, id) = h.connect();
    h.t.set_reading(id, false);
    let payload = pattern(300_000, 2);
    let writer = write_all(s.try_clone().unwrap(), payload.clone());
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(200) {
        h.pass();
    }
    assert_eq!(h.received(id), 0, "{b:?}: bytes delivered while reading was off");
    h.t.set_reading(id, true);
    h.until("the held bytes", |h| h.received(id) >= payload.len());
    writer.join().unwrap().unwrap();
    assert!(h.take(id) == payload, "{b:?}: bytes lost or reordered");
    drop(s);
    h.until("the close", |h| h.is_closed(id));
}

/// Toggles reading on and off (sometimes twice between polls) while a client
/// streams; nothing may arrive while off, nothing may be lost or reordered.
fn pause_resume_stream(b: Backend) {
    let Some(mut h) = harness(b) else { return };
    let (s, id) = h.connect();
    let payload = pattern(3 << 20, 3);
    let writer = write_all(s.try_clone().unwrap(), payload.clone());
    let mut got = Vec::with_capacity(payload.len());
    let (mut paused, mut passes, mut toggles) = (false, 0u32, 0u32);
    h.until("the stream", |h| {
        let d = h.take(id);
        assert!(!paused || d.is_empty(), "{:?}: {} bytes delivered while paused", h.backend, d.len());
        got.extend_from_slice(&d);
        passes += 1;
        if passes % 5 == 0 {
            paused = !paused;
            toggles += 1;
            if toggles % 3 == 0 {
                h.t.set_reading(id, paused);
            }
            h.t.set_reading(id, !paused);
        }
        got.len() >= payload.len()
    });
    writer.join().unwrap().unwrap();
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "{b:?}: bytes lost or reordered across pauses");
    drop(s);
}

fn close_after_queued_output(b: Backend) {
    let Some(mut h) = harness(b) else { return };
    let (s, id) = h.connect();
    let payload = pattern(6 << 20, 4);
    // Several sends, some while earlier ones are still in flight.
    for chunk in payload.chunks(1 << 20) {
        let mut v = chunk.to_vec();
        h.t.send(id, &mut v);
        h.pass();
    }
    h.close(id);
    let reader = thread::spawn(move || {
        let mut s = s;
        let mut v = Vec::new();
        s.read_to_end(&mut v).map(|_| v)
    });
    h.until("the close", |h| h.is_closed(id));
    let got = reader.join().unwrap().expect("client read");
    assert_eq!(got.len(), payload.len(), "{b:?}: output cut short by close");
    assert!(got == payload);
    // The id is gone: sends are dropped, nothing is unsent.
    let mut late = b"late".to_vec();
    h.t.send(id, &mut late);
    assert!(late.is_empty());
    assert_eq!(h.t.unsent(id), 0);

    // Nothing queued: the peer sees EOF at once, and the close completes
    // when it closes too.
    let (mut s2, id2) = h.connect();
    h.close(id2);
    h.pass();
    let mut b1 = [0u8; 1];
    assert_eq!(s2.read(&mut b1).unwrap(), 0);
    drop(s2);
    h.until("the second close", |h| h.is_closed(id2));
}

/// A close while the peer is still sending (say, the rest of a pipeline
/// after a malformed frame): the peer must get our last bytes and a clean
/// EOF, not a reset that can destroy them.
fn close_discards_late_input(b: Backend) {
    let Some(mut h) = harness(b) else { return };
    let (s, id) = h.connect();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let client = thread::spawn(move || -> io::Result<Vec<u8>> {
        let mut s = s;
        s.write_all(b"bad frame")?;
        go_rx.recv().expect("the go signal");
        // The server has queued its answer and closed; we send on regardless
        // before reading anything.
        s.write_all(&pattern(1 << 20, 7))?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        Ok(got)
    });
    h.until("the bad frame", |h| h.received(id) >= 9);
    let reply = pattern(256 << 10, 8);
    let mut out = reply.clone();
    h.t.send(id, &mut out);
    h.close(id);
    h.pass();
    go_tx.send(()).unwrap();
    h.until("the client and the close", |h| client.is_finished() && h.is_closed(id));
    let got = client.join().unwrap().unwrap_or_else(|e| panic!("{b:?}: client saw {e}"));
    assert_eq!(got.len(), reply.len(), "{b:?}: reply cut short");
    assert!(got == reply, "{b:?}: reply corrupted");
    assert_eq!(h.take(id), b"bad frame", "{b:?}: input after close was delivered");
}

/// Only the drain deadline is short.
const SHORT_DRAIN: CloseTimeouts =
    CloseTimeouts { drain: Duration::from_millis(300), linger: Duration::from_secs(60) };
/// Only the linger deadline is short.
const SHORT_LINGER: CloseTimeouts =
    CloseTimeouts { drain: Duration::from_secs(60), linger: Duration::from_millis(300) };

/// A peer that never reads cannot keep a close (and its output) forever.
fn close_gives_up_on_stuck_output(b: Backend) {
    let Some(mut h) = harness_with(b, 16, SHORT_DRAIN) else { return };
    let (s, id) = h.connect();
    let mut big = pattern(8 << 20, 9);
    h.t.send(id, &mut big);
    for _ in 0..20 {
        h.pass();
    }
    assert!(h.t.unsent(id) > 0, "{b:?}: 8 MiB cannot fit in socket buffers");
    let start = Instant::now();
    h.close(id);
    h.until("the close", |h| h.is_closed(id));
    let took = start.elapsed();
    assert!(took >= SHORT_DRAIN.drain, "{b:?}: closed before the drain deadline ({took:?})");
    assert!(took < SHORT_DRAIN.drain + Duration::from_secs(3), "{b:?}: close took {took:?}");
    drop(s);
}

/// After our last byte, a peer that never closes is waited for only until
/// the linger deadline, and a parked poll wakes up for it.
fn close_lingers_until_deadline(b: Backend) {
    let Some(mut h) = harness_with(b, 16, SHORT_LINGER) else { return };
    let (mut s, id) = h.connect();
    let mut bye = b"bye".to_vec();
    h.t.send(id, &mut bye);
    let start = Instant::now();
    h.close(id);
    h.t.flush().unwrap();
    // If a parked poll misses the deadline, a wake-up ends it so the test
    // fails instead of hanging.
    let done = Arc::new(AtomicBool::new(false));
    let (w, d) = (h.waker.clone(), done.clone());
    let guard = thread::spawn(move || {
        let t0 = Instant::now();
        while !d.load(Ordering::SeqCst) {
            if t0.elapsed() > Duration::from_secs(5) {
                w.wake();
            }
            thread::sleep(Duration::from_millis(10));
        }
    });
    while !h.is_closed(id) {
        h.t.poll(None, &mut h.sink).expect("parked poll");
        h.after_poll();
        assert!(start.elapsed() < Duration::from_secs(5), "{b:?}: parked poll missed the deadline");
    }
    done.store(true, Ordering::SeqCst);
    guard.join().unwrap();
    let took = start.elapsed();
    assert!(took >= SHORT_LINGER.linger, "{b:?}: closed before the linger deadline ({took:?})");
    assert!(took < SHORT_LINGER.linger + Duration::from_secs(3), "{b:?}: close took {took:?}");
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("clean end of stream");
    assert_eq!(got, b"bye");
}

/// A peer that shuts its write side still gets the output queued after:
/// `peer_closed` follows the last delivered byte, and the connection stays
/// until the consumer closes it.
fn half_close_keeps_output(b: Backend) {
    let Some(mut h) = harness(b) else { return };
    h.auto_close = false;
    let (s, id) = h.connect();
    let request = pattern(100_000, 10);
    let mut w = s.try_clone().unwrap();
    w.write_all(&request).unwrap();
    w.shutdown(Shutdown::Write).unwrap();
    h.until("the end of input", |h| h.sink.eof.contains(&id));
    assert!(h.take(id) == request, "{b:?}: input lost before peer_closed");
    let reply = pattern(3 << 20, 11);
    let reader = thread::spawn(move || {
        let mut s = s;
        let mut v = Vec::new();
        s.read_to_end(&mut v).map(|_| v)
    });
    for chunk in reply.chunks(1 << 20) {
        let mut v = chunk.to_vec();
        h.t.send(id, &mut v);
        for _ in 0..3 {
            h.pass();
        }
    }
    assert!(!h.is_closed(id), "{b:?}: a half-closed connection closed by itself");
    h.close(id);
    h.until("the close", |h| h.is_closed(id));
    let got = reader.join().unwrap().expect("client read");
    assert_eq!(got.len(), reply.len(), "{b:?}: output after the peer's EOF lost");
    assert!(got == reply);
    drop(w);

    // The end of input waits behind input held back by a pause.
    let (s, id) = h.connect();
    h.t.set_reading(id, false);
    let mut w = s.try_clone().unwrap();
    w.write_all(b"held").unwrap();
    w.shutdown(Shutdown::Write).unwrap();
    for _ in 0..50 {
        h.pass();
    }
    assert_eq!(h.received(id), 0, "{b:?}: bytes delivered while reading was off");
    assert!(!h.sink.eof.contains(&id), "{b:?}: peer_closed while reading was off");
    h.t.set_reading(id, true);
    h.until("the end of input", |h| h.sink.eof.contains(&id));
    assert_eq!(h.take(id), b"held");
    let mut v = b"answer".to_vec();
    h.t.send(id, &mut v);
    h.close(id);
    let mut s = s;
    let mut got = Vec::new();
    let reader = thread::spawn(move || s.read_to_end(&mut got).map(|_| got));
    h.until("the close", |h| h.is_closed(id) && reader.is_finished());
    assert_eq!(reader.join().unwrap().expect("client read"), b"answer");
}

fn peer_disconnect(b: Backend) {
    let Some(mut h) = harness(b) else { return };
    let (s, id) = h.connect();
    drop(s);
    h.until("closed after FIN", |h| h.is_closed(id));

    // The peer goes away while output is stuck in flight.
    let (s, id) = h.connect();
    let mut big = pattern(32 << 20, 5);
    h.t.send(id, &mut big);
    for _ in 0..20 {
        h.pass();
    }
    assert!(h.t.unsent(id) > 0, "{b:?}: 32 MiB cannot fit in socket buffers");
    drop(s);
    h.until("closed after reset", |h| h.is_closed(id));

    // Bytes the peer sent before leaving are still delivered.
    let (mut s, id) = h.connect();
    s.write_all(b"last words").unwrap();
    drop(s);
    h.until("closed after last words", |h| h.is_closed(id));
    assert_eq!(h.take(id), b"last words");
    assert!(h.sink.live.is_empty());
}

fn waker_wakes_parked_poll(b: Backend) {
    let Some(mut h) = harness(b) else { return };
    for round in 0..3 {
        let done = Arc::new(AtomicBool::new(false));
        let (w, d, addr) = (h.waker.clone(), done.clone(), h.addr);
        // Timed from before the spawn: the wake-up comes 60 ms after this
        // however late the poll starts, so a poll that waited for it has
        // always slept 60 ms by this clock.
        let start = Instant::now();
        let helper = thread::spawn(move || {
            thread::sleep(Duration::from_millis(60));
            w.wake();
            // If the wake-up is lost, a connection ends the poll so the test
            // fails instead of hanging.
            let start = Instant::now();
            while !d.load(Ordering::SeqCst) {
                if start.elapsed() > Duration::from_secs(5) {
                    let _ = TcpStream::connect(addr);
                    return;
                }
                thread::sleep(Duration::from_millis(10));
            }
        });
        h.t.poll(None, &mut h.sink).expect("parked poll");
        let slept = start.elapsed();
        done.store(true, Ordering::SeqCst);
        helper.join().unwrap();
        assert!(
            slept >= Duration::from_millis(60),
            "{b:?} round {round}: parked poll returned early ({slept:?})"
        );
        assert!(slept < Duration::from_secs(4), "{b:?} round {round}: wake-up lost ({slept:?})");
        assert!(h.sink.accepted.is_empty());
    }
    // A wake-up before the poll is not lost either.
    h.waker.wake();
    let start = Instant::now();
    h.t.poll(None, &mut h.sink).expect("parked poll");
    assert!(start.elapsed() < Duration::from_secs(4));
}

fn unsent_accounting(b: Backend) {
    let Some(mut h) = harness(b) else { return };
    let (s, id) = h.connect();
    assert_eq!(h.t.unsent(id), 0);
    assert_eq!(h.t.unsent(id + 1000), 0, "unknown ids have nothing unsent");
    let mut total = 0;
    let mut all = Vec::new();
    for i in 0..24 {
        let chunk = pattern(1 << 20, 100 + i);
        all.extend_from_slice(&chunk);
        let before = h.t.unsent(id);
        let mut v = chunk;
        h.t.send(id, &mut v);
        total += 1 << 20;
        assert_eq!(h.t.unsent(id), before + (1 << 20), "{b:?}: queued bytes count at once");
        h.pass();
        assert!(h.t.unsent(id) <= total);
    }
    for _ in 0..20 {
        h.pass();
    }
    let stuck = h.t.unsent(id);
    assert!(stuck > 0 && stuck <= total, "{b:?}: unsent {stuck} of {total} with a peer that does not read");
    let drained_before = h.sink.drained.get(&id).copied().unwrap_or(0);
    let reader = read_n(s, total);
    h.until("the drain", |h| h.t.unsent(id) == 0);
    let got = reader.join().unwrap().expect("client read");
    assert!(got == all, "{b:?}: output reordered or lost");
    h.until("the drained event", |h| h.sink.drained.get(&id).copied().unwrap_or(0) > drained_before);
}

fn connection_limit(b: Backend) {
    let Some(mut h) = harness_with(b, 2, CloseTimeouts::DEFAULT) else { return };
    let (_a, _) = h.connect();
    let (_b, _) = h.connect();
    let mut c = TcpStream::connect(h.addr).expect("connect");
    c.set_nonblocking(true).unwrap();
    h.until("the refusal", |_| match c.read(&mut [0u8; 1]) {
        Ok(0) => true,
        Ok(_) => panic!("unexpected bytes"),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    });
    assert_eq!(h.sink.accepted.len(), 2);
}

/// Dropping a transport with receives armed and a send stuck in flight is
/// prompt and ends the connections.
fn drop_with_io_in_flight(b: Backend) {
    let Some(mut h) = harness(b) else { return };
    let (mut stuck, id) = h.connect();
    let mut big = pattern(32 << 20, 6);
    h.t.send(id, &mut big);
    let (mut idle, idle_id) = h.connect();
    h.t.set_reading(idle_id, false);
    for _ in 0..10 {
        h.pass();
    }
    assert!(h.t.unsent(id) > 0);
    let addr = h.addr;
    let start = Instant::now();
    drop(h);
    assert!(start.elapsed() < Duration::from_secs(1), "{b:?}: drop took {:?}", start.elapsed());
    // Nothing listens once the transport is gone (an accept was armed).
    assert!(TcpStream::connect(addr).is_err(), "{b:?}: {addr} still accepts after the drop");
    for s in [&mut stuck, &mut idle] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    assert!(
                        !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
                        "{b:?}: connection outlived its transport"
                    );
                    break;
                }
            }
        }
    }
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod on_epoll {
            $(#[test] fn $name() { super::$name(super::Backend::Epoll) })*
        }
        mod on_uring {
            $(#[test] fn $name() { super::$name(super::Backend::Uring) })*
        }
        mod on_uring_tiny_pool {
            $(#[test] fn $name() { super::$name(super::Backend::UringTinyPool) })*
        }
    };
}

contract!(
    accept_and_echo,
    many_connections,
    large_transfer,
    gathered_output,
    reading_off_holds_data_back,
    pause_resume_stream,
    close_after_queued_output,
    close_discards_late_input,
    close_gives_up_on_stuck_output,
    close_lingers_until_deadline,
    half_close_keeps_output,
    peer_disconnect,
    waker_wakes_parked_poll,
    unsent_accounting,
    connection_limit,
    drop_with_io_in_flight,
);

#[test]
fn probe_explains_itself() {
    match uring::probe() {
        Ok(()) => {}
        Err(reason) => {
            assert!(!reason.is_empty());
            eprintln!("io_uring unavailable here: {reason}");
        }
    }
}
