//! The load generator: a few threads, each multiplexing its share of the
//! connections on one epoll instance (mio), pipelined.
//!
//! Closed loop keeps `depth` requests outstanding on every connection and
//! measures each latency from the moment the request was queued for sending.
//! Open loop gives every connection a fixed schedule (rate / connections) and
//! measures each latency from the request's *intended* send time, so a server
//! that stalls is charged for the whole queueing delay it caused (wrk2's fix
//! for coordinated omission). A connection never has more than `depth`
//! requests outstanding; a request whose turn comes while it is full is sent
//! as soon as a response frees a slot, and its clock has been running since
//! its turn.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::cli::Mode;
use crate::wire::{Parsed, Wire};

/// How long an open loop waits for the answers to requests sent before its end.
const OPEN_DRAIN: Duration = Duration::from_secs(1);
/// Longest single epoll wait, so deadlines are noticed even with no traffic.
const MAX_BLOCK: Duration = Duration::from_millis(50);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Latencies above an hour are recorded as an hour.
const HIST_MAX_NS: u64 = 3_600_000_000_000;

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub mode: Mode,
    /// Requests outstanding per connection (closed) or at most (open).
    pub depth: usize,
    /// Requests per second over all connections (open loop).
    pub rate: Option<u64>,
    pub warmup: Duration,
    /// Measurement length; `None` with `requests`.
    pub duration: Option<Duration>,
    /// Closed loop: measured responses to collect instead of a duration.
    pub requests: Option<u64>,
    /// Bound on the measurement when `requests` is used.
    pub max_time: Duration,
    pub threads: usize,
    /// Thread `i` is pinned to `client_cpus[i % len]`; empty = not pinned.
    pub client_cpus: Vec<usize>,
    /// Idle time a thread spins on `epoll_wait(0)` before it blocks.
    pub spin: Duration,
}

/// What the measured window produced, summed over threads.
pub struct LoadResult {
    /// Latencies of successful responses, in nanoseconds.
    pub hist: Histogram<u64>,
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Length of the measured window.
    pub elapsed: Duration,
    /// Time the load threads spent handling events rather than waiting, summed.
    pub client_busy: Duration,
    /// Open loop: requests whose turn came in the measured window but that were
    /// never sent because their connection was still waiting on earlier ones.
    /// Recorded in `hist` with the time they had waited by the end (a lower bound).
    pub unsent_at_end: u64,
    /// Open loop: sent requests still unanswered after the drain period, recorded
    /// in `hist` likewise.
    pub unanswered_at_end: u64,
}

/// Nanoseconds from `from` to `to`, at least 1 (the histogram's lowest value).
fn lower_bound_ns(from: Instant, to: Instant) -> u64 {
    (to.saturating_duration_since(from).as_nanos().min(HIST_MAX_NS as u128) as u64).max(1)
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_NS, 3).expect("constant histogram bounds are valid")
}

/// Connects one socket per entry of `addrs` (connection `i` to `addrs[i]`) and
/// drives them as `spec` says. Every connection is closed on return.
pub fn run(addrs: &[SocketAddr], wire: Arc<dyn Wire>, spec: &LoadSpec) -> anyhow::Result<LoadResult> {
    assert!(!addrs.is_empty() && spec.depth > 0 && spec.threads > 0);
    assert!(spec.duration.is_some() || spec.requests.is_some());
    let total = addrs.len();
    let threads = spec.threads.min(total);
    let mut shares: Vec<Vec<(usize, std::net::TcpStream)>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, addr) in addrs.iter().enumerate() {
        let s = std::net::TcpStream::connect_timeout(addr, CONNECT_TIMEOUT)
            .with_context(|| format!("connecting connection {i} to {addr}"))?;
        s.set_nodelay(true).context("setting TCP_NODELAY")?;
        s.set_nonblocking(true).context("making a socket nonblocking")?;
        shares[i % threads].push((i, s));
    }

    let barrier = Arc::new(Barrier::new(threads));
    let mut handles = Vec::with_capacity(threads);
    for (t, share) in shares.into_iter().enumerate() {
        let wire = Arc::clone(&wire);
        let barrier = Arc::clone(&barrier);
        let mut spec = spec.clone();
        // Split a request count so the threads together collect `requests`.
        spec.requests = spec.requests.map(|n| (n * share.len() as u64).div_ceil(total as u64));
        let h = std::thread::Builder::new()
            .name(format!("bench-load-{t}"))
            .spawn(move || -> anyhow::Result<LoadResult> {
                let cpu =
                    (!spec.client_cpus.is_empty()).then(|| spec.client_cpus[t % spec.client_cpus.len()]);
                let pinned = cpu.map(crate::pin::pin_current_thread).transpose();
                let worker = Worker::new(share, total, wire.as_ref(), &spec);
                // Every thread reaches the barrier, even one that failed, so none waits forever.
                barrier.wait();
                pinned?;
                worker?.run()
            })
            .context("spawning a load thread")?;
        handles.push(h);
    }

    let mut merged: Option<LoadResult> = None;
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(r)) => match merged.as_mut() {
                None => merged = Some(r),
                Some(m) => m.merge(r)?,
            },
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(anyhow!("a load thread panicked"));
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    merged.ok_or_else(|| anyhow!("no load thread ran"))
}

impl LoadResult {
    /// Adds another thread's share of the same window.
    fn merge(&mut self, o: LoadResult) -> anyhow::Result<()> {
        let elapsed = self.elapsed.max(o.elapsed);
        self.add(o)?;
        self.elapsed = elapsed;
        Ok(())
    }

    /// Adds a later, separate window (another round): times add up.
    pub fn append(&mut self, o: LoadResult) -> anyhow::Result<()> {
        self.add(o)
    }

    fn add(&mut self, o: LoadResult) -> anyhow::Result<()> {
        self.hist.add(&o.hist).map_err(|e| anyhow!("merging histograms: {e:?}"))?;
        self.ok += o.ok;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        self.elapsed += o.elapsed;
        self.client_busy += o.client_busy;
        self.unsent_at_end += o.unsent_at_end;
        self.unanswered_at_end += o.unanswered_at_end;
        Ok(())
    }
}

struct Conn {
    /// Global connection index: selects the request template and the schedule phase.
    idx: usize,
    stream: TcpStream,
    wbuf: Vec<u8>,
    wpos: usize,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    /// Outstanding requests: id and the instant latency is measured from.
    inflight: VecDeque<(u64, Instant)>,
    next_id: u64,
    /// Open loop: intended send time of this connection's next request.
    next_due: Instant,
}

impl Conn {
    fn push_request(&mut self, wire: &dyn Wire, from: Instant) {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        wire.encode(self.idx, id, &mut self.wbuf);
        self.inflight.push_back((id, from));
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        while self.wpos < self.wbuf.len() {
            match self.stream.write(&self.wbuf[self.wpos..]) {
                Ok(0) => bail!("connection {}: the server stopped accepting data", self.idx),
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).with_context(|| format!("connection {}: send failed", self.idx)),
            }
        }
        if self.wpos == self.wbuf.len() {
            self.wbuf.clear();
            self.wpos = 0;
        } else if self.wpos > self.wbuf.len() / 2 {
            self.wbuf.drain(..self.wpos);
            self.wpos = 0;
        }
        Ok(())
    }

    /// One `read(2)` into the free tail of the receive buffer. `Ok(false)` when
    /// the socket has nothing more for now: on `WouldBlock`, and also after a
    /// read that did not fill the space offered. A short read means the kernel
    /// buffer was empty at that moment, and on Linux every later arrival raises
    /// a new edge-triggered event, so nothing is missed; skipping the confirming
    /// `read` that would return `EAGAIN` saves a system call per response and
    /// keeps the generator cheaper per request than the servers it drives.
    fn read_some(&mut self, max_response: usize) -> anyhow::Result<bool> {
        if self.rend == self.rbuf.len() {
            if self.rstart > 0 {
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
            } else {
                // A response larger than the buffer: grow, within what a response can be.
                let cap = (self.rbuf.len() * 2).min(max_response + 64 * 1024);
                if cap <= self.rbuf.len() {
                    bail!("connection {}: response larger than {} bytes", self.idx, self.rbuf.len());
                }
                self.rbuf.resize(cap, 0);
            }
        }
        loop {
            match self.stream.read(&mut self.rbuf[self.rend..]) {
                Ok(0) => bail!("connection {}: the server closed the connection", self.idx),
                Ok(n) => {
                    let filled = self.rend + n == self.rbuf.len();
                    self.rend += n;
                    return Ok(filled);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).with_context(|| format!("connection {}: receive failed", self.idx)),
            }
        }
    }

    /// The outstanding request a response answers.
    fn take_inflight(&mut self, p: &Parsed) -> anyhow::Result<(u64, Instant)> {
        let pos =
            match p.id {
                None => 0,
                Some(id) => self.inflight.iter().position(|&(i, _)| i == id).ok_or_else(|| {
                    anyhow!("connection {}: response for unknown request id {id}", self.idx)
                })?,
            };
        self.inflight
            .remove(pos)
            .ok_or_else(|| anyhow!("connection {}: response without a request", self.idx))
    }
}

struct Worker<'a> {
    wire: &'a dyn Wire,
    conns: Vec<Conn>,
    poll: Poll,
    spec: LoadSpec,
    /// Open loop: time between two requests of one connection.
    interval: Duration,
    /// Connections over all threads (the schedule is staggered over them).
    total_conns: usize,
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    busy: Duration,
}

impl<'a> Worker<'a> {
    fn new(
        share: Vec<(usize, std::net::TcpStream)>,
        total_conns: usize,
        wire: &'a dyn Wire,
        spec: &LoadSpec,
    ) -> anyhow::Result<Self> {
        let poll = Poll::new().context("creating an epoll instance")?;
        let rbuf_len = (wire.max_response() * 2).clamp(64 * 1024, 4 << 20);
        let now = Instant::now();
        let mut conns = Vec::with_capacity(share.len());
        for (k, (idx, s)) in share.into_iter().enumerate() {
            let mut stream = TcpStream::from_std(s);
            poll.registry()
                .register(&mut stream, Token(k), Interest::READABLE | Interest::WRITABLE)
                .context("registering a connection with epoll")?;
            conns.push(Conn {
                idx,
                stream,
                wbuf: Vec::with_capacity(64 * 1024),
                wpos: 0,
                rbuf: vec![0; rbuf_len],
                rstart: 0,
                rend: 0,
                inflight: VecDeque::with_capacity(spec.depth),
                next_id: 1,
                next_due: now,
            });
        }
        let interval = match (spec.mode, spec.rate) {
            (Mode::Open, Some(rate)) => Duration::from_secs_f64(total_conns as f64 / rate as f64),
            (Mode::Open, None) => bail!("an open loop needs a rate"),
            (Mode::Closed, _) => Duration::ZERO,
        };
        Ok(Worker {
            wire,
            conns,
            poll,
            spec: spec.clone(),
            interval,
            total_conns,
            hist: new_histogram(),
            ok: 0,
            errors: 0,
            first_error: None,
            busy: Duration::ZERO,
        })
    }

    fn run(mut self) -> anyhow::Result<LoadResult> {
        let t0 = Instant::now();
        let warm_end = t0 + self.spec.warmup;
        let end = warm_end + self.spec.duration.unwrap_or(self.spec.max_time);
        let mut events = Events::with_capacity(self.conns.len().max(16));
        let mut result = match self.spec.mode {
            Mode::Closed => self.closed(&mut events, warm_end, end)?,
            Mode::Open => self.open(&mut events, t0, warm_end, end)?,
        };
        result.hist = std::mem::replace(&mut self.hist, new_histogram());
        result.ok = self.ok;
        result.errors = self.errors;
        result.first_error = self.first_error.take();
        result.client_busy = self.busy;
        Ok(result)
    }

    fn empty_result(elapsed: Duration) -> LoadResult {
        LoadResult {
            hist: new_histogram(),
            ok: 0,
            errors: 0,
            first_error: None,
            elapsed,
            client_busy: Duration::ZERO,
            unsent_at_end: 0,
            unanswered_at_end: 0,
        }
    }

    /// Waits for events: spins on a zero timeout while the last work was less
    /// than the spin budget ago (or the next send is too close for epoll's
    /// millisecond timeout), else blocks until `deadline` at the latest.
    fn wait(&mut self, events: &mut Events, last_work: Instant, deadline: Instant) -> anyhow::Result<()> {
        let now = Instant::now();
        let until = deadline.saturating_duration_since(now);
        let timeout = if now.duration_since(last_work) < self.spec.spin || until < Duration::from_millis(2) {
            Duration::ZERO
        } else {
            // epoll rounds up to whole milliseconds: wake a millisecond early and spin the rest.
            (until - Duration::from_millis(1)).min(MAX_BLOCK)
        };
        match self.poll.poll(events, Some(timeout)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {
                events.clear();
                Ok(())
            }
            Err(e) => Err(e).context("epoll_wait failed"),
        }
    }

    /// Reads, parses and accounts every response available on connection `k`.
    /// Returns how many responses completed. Whether one counts is decided by
    /// its completion time (closed loop) or its intended send time (`by_intended`, open loop).
    fn service(&mut self, k: usize, warm_end: Instant, by_intended: bool) -> anyhow::Result<usize> {
        let max_response = self.wire.max_response();
        let mut done = 0;
        loop {
            let more = self.conns[k].read_some(max_response)?;
            let now = Instant::now();
            loop {
                let c = &mut self.conns[k];
                let Some(p) = self.wire.parse(&c.rbuf[c.rstart..c.rend])? else { break };
                c.rstart += p.len;
                let (_, from) = c.take_inflight(&p)?;
                done += 1;
                let counted = if by_intended { from >= warm_end } else { now >= warm_end };
                if !counted {
                    continue;
                }
                match p.error {
                    None => {
                        self.ok += 1;
                        self.hist.saturating_record(lower_bound_ns(from, now));
                    }
                    Some(e) => {
                        self.errors += 1;
                        self.first_error.get_or_insert(e);
                    }
                }
            }
            let c = &mut self.conns[k];
            if c.rstart == c.rend {
                c.rstart = 0;
                c.rend = 0;
            }
            if !more {
                return Ok(done);
            }
        }
    }

    fn closed(&mut self, events: &mut Events, warm_end: Instant, end: Instant) -> anyhow::Result<LoadResult> {
        let target = self.spec.requests;
        let now = Instant::now();
        for c in &mut self.conns {
            for _ in 0..self.spec.depth {
                c.push_request(self.wire, now);
            }
            c.flush()?;
        }
        let mut last_work = Instant::now();
        let stop = loop {
            let now = Instant::now();
            if now >= end {
                break end;
            }
            if target.is_some_and(|n| self.ok + self.errors >= n) {
                break now;
            }
            self.wait(events, last_work, end)?;
            if events.is_empty() {
                continue;
            }
            let start = Instant::now();
            for ev in events.iter() {
                let k = ev.token().0;
                let done = self.service(k, warm_end, false)?;
                let c = &mut self.conns[k];
                let now = Instant::now();
                for _ in 0..done {
                    c.push_request(self.wire, now);
                }
                c.flush()?;
            }
            last_work = Instant::now();
            self.busy += last_work - start;
        };
        Ok(Self::empty_result(stop.saturating_duration_since(warm_end)))
    }

    fn open(
        &mut self,
        events: &mut Events,
        t0: Instant,
        warm_end: Instant,
        end: Instant,
    ) -> anyhow::Result<LoadResult> {
        // Stagger the connections' schedules evenly over one interval.
        for c in &mut self.conns {
            c.next_due = t0 + self.interval.mul_f64(c.idx as f64 / self.total_conns as f64);
        }
        let mut last_work = Instant::now();
        while Instant::now() < end {
            let start = Instant::now();
            let sent = self.send_due(start, end)?;
            let next = self.next_due(end);
            if sent {
                last_work = Instant::now();
                self.busy += last_work - start;
            }
            self.wait(events, last_work, next)?;
            if events.is_empty() {
                continue;
            }
            let start = Instant::now();
            for ev in events.iter() {
                let k = ev.token().0;
                self.service(k, warm_end, true)?;
                // Writable edges land here too.
                self.conns[k].flush()?;
            }
            last_work = Instant::now();
            self.busy += last_work - start;
        }

        // Requests whose turn came in the measured window but that never went
        // out: the server was too slow to free a slot. Each is charged the time
        // it had waited by the end, a lower bound on its latency; leaving them
        // out would hide exactly the delay an open loop exists to show.
        let mut unsent = 0u64;
        let step_ns = self.interval.as_nanos().max(1);
        for c in &self.conns {
            let mut first = c.next_due;
            if first < warm_end {
                let skip = warm_end.duration_since(first).as_nanos().div_ceil(step_ns);
                first += Duration::from_nanos((skip * step_ns).min(u64::MAX as u128) as u64);
            }
            if first >= end {
                continue;
            }
            let n = end.duration_since(first).as_nanos().div_ceil(step_ns) as u64;
            unsent += n;
            // One record per request, or per run of `stride` neighbours when
            // there are very many (their waits differ by < stride intervals).
            let stride = (n / 100_000).max(1);
            let mut i = 0;
            while i < n {
                let at = first + Duration::from_nanos((i as u128 * step_ns).min(u64::MAX as u128) as u64);
                self.hist.saturating_record_n(lower_bound_ns(at, end), stride.min(n - i));
                i += stride;
            }
        }
        // Collect answers to what was sent; nothing new goes out.
        let drain_end = Instant::now() + OPEN_DRAIN;
        let mut last_work = Instant::now();
        while self.conns.iter().any(|c| !c.inflight.is_empty()) && Instant::now() < drain_end {
            self.wait(events, last_work, drain_end)?;
            if events.is_empty() {
                continue;
            }
            for ev in events.iter() {
                let k = ev.token().0;
                self.service(k, warm_end, true)?;
                self.conns[k].flush()?;
            }
            last_work = Instant::now();
        }
        // Sent but never answered: charged likewise, up to now.
        let now = Instant::now();
        let mut unanswered = 0u64;
        for c in &self.conns {
            for &(_, from) in c.inflight.iter().filter(|&&(_, from)| from >= warm_end) {
                unanswered += 1;
                self.hist.saturating_record(lower_bound_ns(from, now));
            }
        }
        let mut r = Self::empty_result(end.saturating_duration_since(warm_end));
        r.unsent_at_end = unsent;
        r.unanswered_at_end = unanswered;
        Ok(r)
    }

    /// Queues every request whose turn has come on a connection with a free
    /// slot, and sends them. Returns whether anything was sent.
    fn send_due(&mut self, now: Instant, end: Instant) -> anyhow::Result<bool> {
        let mut any = false;
        for c in &mut self.conns {
            let mut queued = false;
            while c.inflight.len() < self.spec.depth && c.next_due <= now && c.next_due < end {
                let due = c.next_due;
                c.push_request(self.wire, due);
                c.next_due += self.interval;
                queued = true;
            }
            if queued {
                c.flush()?;
                any = true;
            }
        }
        Ok(any)
    }

    /// The earliest intended send time among connections that could send, or `end`.
    fn next_due(&self, end: Instant) -> Instant {
        self.conns
            .iter()
            .filter(|c| c.inflight.len() < self.spec.depth)
            .map(|c| c.next_due)
            .min()
            .unwrap_or(end)
            .min(end)
    }
}
