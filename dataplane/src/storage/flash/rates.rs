//! A tier's I/O rates over the last second, as `pollenctl tiers` shows
//! them: completions counted in 100 ms buckets, each stamped with its tick
//! since the engine opened, and divided by the time the window really
//! covers when read.
//!
//! The stamps are what let a reader on another thread compute the rates at
//! any moment from a copy the core published earlier: a core that went idle
//! and parked publishes nothing more, and its buckets simply age out of the
//! window, so the rates fall to zero once the load stops.

use std::time::{Duration, Instant};

/// The width of a bucket.
const TICK: Duration = Duration::from_millis(100);
/// Full ticks in the window (one second), besides the one in progress.
const WINDOW_TICKS: u64 = 10;
const BUCKETS: usize = WINDOW_TICKS as usize + 1;
/// No bucket holds this tick: an empty bucket.
const EMPTY: u64 = u64::MAX;

/// Completed operations and bytes per second, over the last second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoRates {
    pub read_iops: u64,
    pub write_iops: u64,
    pub read_bytes_per_sec: u64,
    pub write_bytes_per_sec: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    read_ops: u64,
    write_ops: u64,
    read_bytes: u64,
    write_bytes: u64,
}

/// Completions of the last ~1.1 s in buckets of 100 ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoWindow {
    /// Tick 0 starts here (the engine's open).
    base: Instant,
    /// The tick each bucket counts, `EMPTY` if none; bucket `t % BUCKETS`
    /// holds tick `t`.
    ticks: [u64; BUCKETS],
    counts: [Counts; BUCKETS],
}

impl IoWindow {
    pub fn new(base: Instant) -> IoWindow {
        IoWindow { base, ticks: [EMPTY; BUCKETS], counts: [Counts::default(); BUCKETS] }
    }

    fn tick(&self, at: Instant) -> u64 {
        let ns = at.saturating_duration_since(self.base).as_nanos() / TICK.as_nanos();
        u64::try_from(ns).unwrap_or(EMPTY - 1)
    }

    fn bucket(&mut self, at: Instant) -> &mut Counts {
        let t = self.tick(at);
        let i = (t % BUCKETS as u64) as usize;
        if self.ticks[i] != t {
            self.ticks[i] = t;
            self.counts[i] = Counts::default();
        }
        &mut self.counts[i]
    }

    // Completions are counted in time order (`at` never goes back by a
    // window): a bucket taken for a later tick forgets the earlier one.

    /// A read of `bytes` completed at `at`.
    pub fn read(&mut self, at: Instant, bytes: u64) {
        let c = self.bucket(at);
        c.read_ops += 1;
        c.read_bytes += bytes;
    }

    /// A write of `bytes` completed at `at`.
    pub fn write(&mut self, at: Instant, bytes: u64) {
        let c = self.bucket(at);
        c.write_ops += 1;
        c.write_bytes += bytes;
    }

    /// Per-second rates over the last second before `now`: the current
    /// tick and the `WINDOW_TICKS` before it, divided by the time from the
    /// first of them (or the open, if later) to `now`, between 1 and 1.1 s
    /// once the engine has run a second.
    pub fn rates(&self, now: Instant) -> IoRates {
        let t = self.tick(now);
        let first = t.saturating_sub(WINDOW_TICKS);
        let mut sum = Counts::default();
        for (tick, c) in self.ticks.iter().zip(&self.counts) {
            if *tick != EMPTY && (first..=t).contains(tick) {
                sum.read_ops += c.read_ops;
                sum.write_ops += c.write_ops;
                sum.read_bytes += c.read_bytes;
                sum.write_bytes += c.write_bytes;
            }
        }
        let start = self.base + TICK * u32::try_from(first).unwrap_or(u32::MAX);
        // Never less than a tick: a window of a few microseconds right after
        // the open would turn one operation into a huge rate.
        let span = now.saturating_duration_since(start).max(TICK).as_nanos();
        let per_sec = |n: u64| u64::try_from(u128::from(n) * 1_000_000_000 / span).unwrap_or(u64::MAX);
        IoRates {
            read_iops: per_sec(sum.read_ops),
            write_iops: per_sec(sum.write_ops),
            read_bytes_per_sec: per_sec(sum.read_bytes),
            write_bytes_per_sec: per_sec(sum.write_bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn steady_load_gives_its_rate_per_second() {
        let t0 = Instant::now();
        let mut w = IoWindow::new(t0);
        // 500 reads of 4 KiB and 250 writes of 64 KiB a second, for 3 s.
        for k in 0..1500u64 {
            w.read(t0 + ms(2 * k), 4096);
            if k % 2 == 0 {
                w.write(t0 + ms(2 * k), 65536);
            }
        }
        let r = w.rates(t0 + ms(3000));
        // The window covers 1.0..1.1 s; the count over it is a second's
        // worth, give or take one bucket at each end.
        for (got, per_sec) in [(r.read_iops, 500), (r.write_iops, 250)] {
            assert!((per_sec * 8 / 10..=per_sec * 11 / 10).contains(&got), "{got} vs {per_sec}: {r:?}");
        }
        assert_eq!(r.read_bytes_per_sec / r.read_iops.max(1), 4096, "{r:?}");
        assert_eq!(r.write_bytes_per_sec / r.write_iops.max(1), 65536, "{r:?}");
    }

    #[test]
    fn rates_fall_to_zero_once_the_load_stops() {
        let t0 = Instant::now();
        let mut w = IoWindow::new(t0);
        for k in 0..1000u64 {
            w.write(t0 + ms(k), 100);
        }
        assert!(w.rates(t0 + ms(1000)).write_iops > 0);
        // Half a second after the last write, about half a second of it is left.
        let half = w.rates(t0 + ms(1500)).write_iops;
        assert!((400..=600).contains(&half), "{half}");
        assert_eq!(w.rates(t0 + ms(2200)), IoRates::default());
        assert_eq!(w.rates(t0 + ms(60_000)), IoRates::default());
    }

    #[test]
    fn a_young_engine_divides_by_the_time_it_has_run() {
        let t0 = Instant::now();
        let mut w = IoWindow::new(t0);
        for k in 0..100u64 {
            w.read(t0 + ms(2 * k), 1);
        }
        // 100 reads in the first 200 ms: 500 a second, not 100.
        let r = w.rates(t0 + ms(200));
        assert!((450..=550).contains(&r.read_iops), "{r:?}");
        // A bucket reused a window later starts from zero.
        let mut w = IoWindow::new(t0);
        w.read(t0, 1);
        w.read(t0 + TICK * BUCKETS as u32, 1);
        assert_eq!(w.rates(t0 + TICK * BUCKETS as u32).read_iops, 1);
    }
}
