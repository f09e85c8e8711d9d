//! `cargo xtask soak`: tcpclose (default mode, `--json`) under full churn for minutes, checking
//! that it stops cleanly, that its summary reconciles and that its memory stays flat.
//!
//! The churn is the bench's, in a fresh network namespace every [`SAMPLE`] (so that timewait
//! sockets never reach `tcp_max_tw_buckets`); tcpclose's RSS is sampled between namespaces.

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::bench::{self, Mode, Netns, TempDir, Tracer};

/// How often tcpclose's RSS is sampled.
const SAMPLE: Duration = Duration::from_secs(10);
/// How far below their max the RSS samples after warm-up may be.
const RSS_TOLERANCE: f64 = 0.10;

/// What `cargo xtask soak` was asked for.
pub struct Options {
    pub minutes: u64,
    pub pairs: usize,
}

pub fn soak(tcpclose: &Path, options: &Options) -> Result<()> {
    if options.minutes == 0 || options.pairs == 0 {
        bail!("--minutes and --pairs must be at least 1");
    }
    let run = Duration::from_secs(options.minutes * 60);
    let warm_up = Duration::from_secs(60).min(run / 2);
    let dir = TempDir::create()?;
    let mut cmd = Command::new(tcpclose);
    cmd.arg("--json");
    let mut tracer = Tracer::start(cmd, Mode::Teardowns, &dir.0)?;

    // (seconds since start, VmRSS in KiB)
    let mut samples: Vec<(u64, u64)> = Vec::new();
    let mut connections = 0;
    let started = Instant::now();
    while started.elapsed() < run {
        let netns = Netns::create()?;
        connections += bench::churn(&netns, options.pairs, SAMPLE)?.connections;
        drop(netns);
        let status = bench::read_proc(tracer.pid(), "status")?;
        let rss = bench::status_field(&status, "VmRSS:").context("no VmRSS")?;
        let at = started.elapsed().as_secs();
        eprintln!("soak: {at:>4} s: RSS {rss} KiB, {connections} connections");
        samples.push((at, rss));
    }
    let elapsed = started.elapsed().as_secs_f64();

    // Fails (and the soak with it) unless tcpclose exits successfully after SIGINT.
    tracer.stop()?;
    let stderr = fs::read_to_string(&tracer.stderr).context("reading tcpclose's errors")?;
    let summary = summary(&tracer.stdout)?;
    let n = |name: &str| summary.get(name).and_then(Value::as_u64).unwrap_or(0);

    let mut failures = Vec::new();
    if stderr.contains("panicked") {
        failures.push(format!("tcpclose panicked: {}", stderr.trim()));
    }
    let received = n("transitions") + n("lost") + n("undecodable");
    if n("matched") != received {
        failures.push(format!(
            "matched {} != transitions + lost + undecodable {received}",
            n("matched")
        ));
    }
    let timewait = n("timewait_events") + n("timewait_lost");
    if n("timewait_matched") != timewait {
        failures.push(format!(
            "timewait_matched {} != timewait_events + timewait_lost {timewait}",
            n("timewait_matched")
        ));
    }
    let warm: Vec<u64> = samples
        .iter()
        .filter(|(at, _)| Duration::from_secs(*at) > warm_up)
        .map(|&(_, rss)| rss)
        .collect();
    // Flat: every sample after warm-up (the last included) within 10% of their max.
    match (warm.iter().min(), warm.iter().max()) {
        (Some(&min), Some(&max)) if (min as f64) < max as f64 * (1.0 - RSS_TOLERANCE) => {
            failures.push(format!("RSS not flat after warm-up: {min}..{max} KiB"));
        }
        (Some(_), Some(_)) => {}
        _ => failures.push("no RSS sample after warm-up".into()),
    }

    println!(
        "tcpclose --json, {:.0} s of churn ({} pairs, {:.0} conn/s), warm-up {} s",
        elapsed,
        options.pairs,
        connections as f64 / elapsed,
        warm_up.as_secs()
    );
    println!(
        "events: {} transitions ({:.0}/s), {} timewait; lost {} + {} timewait; undecodable {}",
        n("transitions"),
        n("transitions") as f64 / elapsed,
        n("timewait_events"),
        n("lost"),
        n("timewait_lost"),
        n("undecodable")
    );
    if let Some(lag) = bench::lag_of(&summary) {
        println!(
            "kernel-to-reader delay: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; largest backlog \
             {} events drained in {:.1} ms ({:.0} events/s)",
            lag.delay_p50_ns as f64 / 1e6,
            lag.delay_p99_ns as f64 / 1e6,
            lag.delay_max_ns as f64 / 1e6,
            lag.backlog_events,
            lag.backlog_drain_ns as f64 / 1e6,
            lag.drain_per_s().unwrap_or(0.0)
        );
    }
    let rss: Vec<String> = samples
        .iter()
        .map(|(at, rss)| format!("{at}s:{rss}"))
        .collect();
    println!("RSS KiB: {}", rss.join(" "));
    if failures.is_empty() {
        println!("verdict: PASS");
        Ok(())
    } else {
        for failure in &failures {
            println!("FAIL: {failure}");
        }
        bail!("soak failed ({} checks)", failures.len())
    }
}

/// tcpclose's `summary` record, the last line of its JSON output.
fn summary(stdout: &Path) -> Result<Value> {
    let tail = bench::read_tail(stdout, 64 * 1024)?;
    let line = tail
        .lines()
        .rev()
        .find(|line| line.contains(r#""type":"summary""#))
        .context("tcpclose printed no summary record")?;
    serde_json::from_str(line).context("parsing tcpclose's summary")
}
