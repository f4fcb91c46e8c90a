//! Pinning the calling thread to one CPU.

use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;

pub fn pin_current_thread(cpu: usize) -> nix::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &set)
}

pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
