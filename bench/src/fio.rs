//! The fio peer for the block workloads: the same random-access pattern, size,
//! queue depth and bytes of the same file, through io_uring with O_DIRECT,
//! pinned to the server CPU. It runs after Pollen's rounds, once the node has
//! stopped, so the two never share the file at the same time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::Value;

use crate::cli::Op;
use crate::report::{Latency, Measured};

/// One fio invocation.
#[derive(Debug, Clone)]
pub struct FioJob {
    pub bin: PathBuf,
    pub file: PathBuf,
    pub op: Op,
    /// Bytes per I/O.
    pub bs: usize,
    pub iodepth: usize,
    /// Where in the file the working set starts, and its length: the bytes
    /// Pollen's blocks occupy.
    pub offset: u64,
    pub size: u64,
    pub runtime: Duration,
    pub ramp: Duration,
    pub cpu: usize,
}

impl FioJob {
    /// The arguments after the program name.
    pub fn args(&self) -> Vec<String> {
        let rw = match self.op {
            Op::Randread | Op::Get => "randread",
            Op::Randwrite | Op::Put => "randwrite",
            Op::Mixed => "randrw",
        };
        // fio takes whole seconds for time_based runs; ramp_time likewise is
        // given in ms so a short warm-up is kept.
        let secs = self.runtime.as_secs_f64().round().max(1.0) as u64;
        let mut v = vec![
            "--name=pollen-bench".to_string(),
            format!("--filename={}", self.file.display()),
            "--ioengine=io_uring".into(),
            "--direct=1".into(),
            format!("--rw={rw}"),
        ];
        if self.op == Op::Mixed {
            // One latency distribution over reads and writes, like Pollen's histogram.
            v.push(format!("--rwmixread={}", self.op.read_pct()));
            v.push("--unified_rw_reporting=mixed".into());
        }
        v.extend([
            format!("--bs={}", self.bs),
            format!("--iodepth={}", self.iodepth),
            "--numjobs=1".into(),
            format!("--offset={}", self.offset),
            format!("--size={}", self.size),
            "--time_based".into(),
            format!("--runtime={secs}s"),
            format!("--ramp_time={}ms", self.ramp.as_millis()),
            format!("--cpus_allowed={}", self.cpu),
            "--output-format=json".into(),
        ]);
        v
    }

    /// The command line as one shell-pastable string.
    pub fn command_line(&self) -> String {
        std::iter::once(self.bin.display().to_string()).chain(self.args()).collect::<Vec<_>>().join(" ")
    }

    /// Runs fio and reads its JSON report.
    pub fn run(&self) -> anyhow::Result<Measured> {
        let out = Command::new(&self.bin)
            .args(self.args())
            .output()
            .with_context(|| format!("running {}", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "fio exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim().lines().last().unwrap_or("")
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        // fio may print notes before the JSON document.
        let start = text.find('{').ok_or_else(|| anyhow!("fio printed no JSON"))?;
        let v: Value = serde_json::from_str(&text[start..]).context("parsing fio's JSON output")?;
        parse(&v, self.op, self.bs)
    }
}

/// Finds fio: `bin` itself when it names a path, else the first match on PATH.
pub fn find(bin: &Path) -> Option<PathBuf> {
    crate::redis::find(bin)
}

/// fio's job report as a `Measured`: IOPS, completion-latency percentiles
/// (`clat_ns`: submission to completion, as fio reports them), and fio's own
/// CPU share as `server_busy`.
pub fn parse(v: &Value, op: Op, bs: usize) -> anyhow::Result<Measured> {
    let job = v["jobs"].get(0).ok_or_else(|| anyhow!("fio's JSON has no job"))?;
    let dirs: Vec<&Value> = if job.get("mixed").is_some() {
        vec![&job["mixed"]]
    } else {
        match op.read_pct() {
            100 => vec![&job["read"]],
            0 => vec![&job["write"]],
            _ => vec![&job["read"], &job["write"]],
        }
    };
    let num = |x: &Value, what: &str| x.as_f64().ok_or_else(|| anyhow!("fio's JSON lacks {what}"));
    let mut iops = 0.0;
    let mut ios = 0u64;
    let mut runtime_ms = 0f64;
    for d in &dirs {
        iops += num(&d["iops"], "iops")?;
        ios += num(&d["total_ios"], "total_ios")? as u64;
        runtime_ms = runtime_ms.max(num(&d["runtime"], "runtime")?);
    }
    // Latency percentiles from the dominant direction (reads, unless none).
    let c = &dirs[0]["clat_ns"];
    let pct = |p: &str| -> anyhow::Result<u64> {
        Ok(num(&c["percentile"][p], &format!("the {p} percentile"))? as u64)
    };
    let latency = Latency {
        min: num(&c["min"], "clat min")? as u64,
        p50: pct("50.000000")?,
        p90: pct("90.000000")?,
        p99: pct("99.000000")?,
        p99_9: pct("99.900000")?,
        max: num(&c["max"], "clat max")? as u64,
    };
    let error = job["error"].as_i64().unwrap_or(0);
    let cpu = job["usr_cpu"].as_f64().unwrap_or(0.0) + job["sys_cpu"].as_f64().unwrap_or(0.0);
    let elapsed_s = runtime_ms / 1e3;
    Ok(Measured {
        requests: ios,
        errors: u64::from(error != 0),
        first_error: (error != 0).then(|| format!("fio job error {error}")),
        elapsed_s,
        throughput_ops: iops,
        throughput_mib: iops * bs as f64 / (1 << 20) as f64,
        latency_ns: latency,
        client_busy: 0.0,
        server_busy: Some((cpu / 100.0).clamp(0.0, 1.0)),
        unsent_at_end: 0,
        unanswered_at_end: 0,
        rounds: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(op: Op) -> FioJob {
        FioJob {
            bin: "fio".into(),
            file: "/var/tmp/flash.img".into(),
            op,
            bs: 4096,
            iodepth: 32,
            offset: 327680,
            size: 256 << 20,
            runtime: Duration::from_secs(10),
            ramp: Duration::from_millis(200),
            cpu: 0,
        }
    }

    #[test]
    fn command_lines() {
        let c = job(Op::Randread).command_line();
        assert!(c.starts_with("fio --name=pollen-bench --filename=/var/tmp/flash.img --ioengine=io_uring"));
        for f in
            ["--direct=1", "--rw=randread", "--bs=4096", "--iodepth=32", "--numjobs=1", "--offset=327680"]
        {
            assert!(c.contains(f), "{f} missing from {c}");
        }
        assert!(c.contains("--time_based --runtime=10s --ramp_time=200ms --cpus_allowed=0"));
        assert!(!c.contains("rwmixread"));
        let m = job(Op::Mixed).command_line();
        assert!(m.contains("--rw=randrw --rwmixread=70 --unified_rw_reporting=mixed"));
    }

    #[test]
    fn parses_a_report() {
        let v: Value = serde_json::from_str(
            r#"{"jobs":[{"error":0,"usr_cpu":10.0,"sys_cpu":30.0,
                "read":{"iops":1000.5,"total_ios":10005,"runtime":10000,
                  "clat_ns":{"min":1000,"max":90000,"percentile":{"50.000000":20000,"90.000000":30000,
                  "99.000000":40000,"99.900000":50000}}},
                "write":{"iops":0,"total_ios":0,"runtime":0,"clat_ns":{"min":0,"max":0,"percentile":{}}}}]}"#,
        )
        .unwrap();
        let m = parse(&v, Op::Randread, 4096).unwrap();
        assert_eq!((m.requests, m.errors, m.latency_ns.p50, m.latency_ns.p99_9), (10005, 0, 20000, 50000));
        assert!((m.throughput_ops - 1000.5).abs() < 1e-9 && (m.elapsed_s - 10.0).abs() < 1e-9);
        assert!((m.server_busy.unwrap() - 0.4).abs() < 1e-9);
        assert!(parse(&v, Op::Randwrite, 4096).is_err(), "an empty direction has no percentiles");
    }
}
