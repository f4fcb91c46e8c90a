//! CPU pinning for the bench's own threads and the processes it starts.

use anyhow::Context;
use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;

fn cpu_set(cpu: usize) -> nix::Result<CpuSet> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    Ok(set)
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> anyhow::Result<()> {
    let set = cpu_set(cpu).with_context(|| format!("CPU {cpu} is out of range"))?;
    // Pid 0 = the calling thread.
    sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("pinning a thread to CPU {cpu}"))
}

/// A `pre_exec` hook body: pins the forked child before it executes, so every
/// thread the program later creates inherits the mask. Only calls
/// `sched_setaffinity(2)`, which is async-signal-safe.
pub fn pin_in_child(cpu: usize) -> std::io::Result<()> {
    let set = cpu_set(cpu).map_err(std::io::Error::from)?;
    sched_setaffinity(Pid::from_raw(0), &set).map_err(std::io::Error::from)
}

/// The `Cpus_allowed_list` of a process or thread (`/proc/<pid>` or
/// `/proc/self/task/<tid>`), e.g. "0" or "0-1".
pub fn allowed_cpus(proc_dir: &std::path::Path) -> Option<String> {
    let status = std::fs::read_to_string(proc_dir.join("status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).map(|v| v.trim().to_string())
}

/// The `/proc/self/task/<tid>` directory of this process's thread named `name`.
pub fn thread_dir(name: &str) -> Option<std::path::PathBuf> {
    std::fs::read_dir("/proc/self/task")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| std::fs::read_to_string(p.join("comm")).map(|c| c.trim() == name).unwrap_or(false))
}

/// A note for the report when `what` is not confined to `cpu`, else `None`.
pub fn check_pinned(what: &str, proc_dir: Option<std::path::PathBuf>, cpu: usize) -> Option<String> {
    let allowed = proc_dir.as_deref().and_then(allowed_cpus);
    match allowed {
        Some(a) if a == cpu.to_string() => None,
        Some(a) => Some(format!("WARNING: {what} may run on CPUs {a}, not only CPU {cpu}")),
        None => Some(format!("WARNING: could not check the CPU affinity of {what}")),
    }
}
