//! `cargo xtask soak`: tcpclose (default mode, `--json`) under full churn for minutes, checking
//! that it stops cleanly, that its summary reconciles and that its memory stays flat.
//!
//! The churn is the bench's (the tests library's timed churn), in a fresh network namespace every
//! [`SAMPLE`] (so that timewait sockets never reach `tcp_max_tw_buckets`); tcpclose's RSS is
//! sampled between namespaces.
//!
//! Memory passes when it does not grow: the median sample of the last third of the run is at
//! most [`GROWTH_MARGIN`] above the highest of the middle third, and no sample is above a
//! ceiling worked out from what tcpclose may hold (see [`ceiling_kib`]). When the level is
//! reached does not matter, nor does a peak that is given back: each namespace's deletion floods
//! the tables at a random moment, and the tables shrink again once it is over. A leak raises
//! the whole last third.

use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use tcpclose_tests::{TempDir, churn, netns::Netns};

use crate::bench::{self, Mode, Tracer};

/// How often tcpclose's RSS is sampled.
const SAMPLE: Duration = Duration::from_secs(10);
/// How much higher the last third's median RSS may be than the middle third's peak.
const GROWTH_MARGIN: f64 = 0.05;
/// The socket tables' bound, given to tcpclose (its default).
const MAX_SOCKETS: u64 = 256 * 1024;
/// Bytes a followed socket takes at most in tcpclose's tables, room included: a dense table's
/// entry (about 150 bytes for a timewait socket) plus its index (16 bytes a bucket), with the
/// room of a table that has just doubled. Measured: 100,000 sockets held take 22 MiB.
const SOCKET_BYTES: u64 = 2 * 200;
/// Bytes a pending kill takes, room included (3 maps: 40 + 16 + 16 bytes an entry).
const KILL_BYTES: u64 = 2 * 80;
/// Timewait sockets a namespace can hold (`net.ipv4.tcp_max_tw_buckets` as the bench's
/// namespaces have it): the most that one namespace's deletion kills at once.
const KILLS_AT_ONCE: u64 = 131_072;

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
    let dir = TempDir::create("soak")?;
    let mut cmd = Command::new(tcpclose);
    cmd.arg("--json")
        .args(["--max-sockets", &MAX_SOCKETS.to_string()]);
    let mut tracer = Tracer::start(cmd, Mode::Teardowns, &dir.0)?;
    let idle = bench::status_field(&bench::read_proc(tracer.pid(), "status")?, "VmRSS:")
        .context("no VmRSS")?;
    let ceiling = ceiling_kib(idle);

    // (seconds since start, VmRSS in KiB)
    let mut samples: Vec<(u64, u64)> = Vec::new();
    let mut connections = 0;
    let started = Instant::now();
    while started.elapsed() < run {
        let netns = Netns::create("soak")?;
        connections += churn::timed(&netns, options.pairs, SAMPLE)?.connections;
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
    let stderr = fs::read_to_string(tracer.stderr()).context("reading tcpclose's errors")?;
    let summary = bench::summary(tracer.stdout())?;
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
    failures.extend(memory_failures(&samples, ceiling));
    println!(
        "tcpclose --json, {:.0} s of churn ({} pairs, {:.0} conn/s)",
        elapsed,
        options.pairs,
        connections as f64 / elapsed,
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
    println!("RSS: {idle} KiB idle at start, ceiling {ceiling} KiB");
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

/// The most RSS tcpclose may have (KiB), from `idle_kib` at start: its ring buffer (whose data
/// pages the kernel maps twice) and output queue full, its socket tables full
/// ([`MAX_SOCKETS`]), and one namespace's timewait sockets killed at once.
fn ceiling_kib(idle_kib: u64) -> u64 {
    let bytes = 2 * u64::from(tcpclose_common::DEFAULT_RING_BYTES)
        + tcpclose_common::OUTPUT_QUEUE_BYTES as u64
        + MAX_SOCKETS * SOCKET_BYTES
        + KILLS_AT_ONCE * KILL_BYTES;
    idle_kib + bytes / 1024
}

/// What is wrong with the RSS samples `(seconds, KiB)`: growth from the middle third of the run
/// to the last, or a sample above `ceiling` KiB.
fn memory_failures(samples: &[(u64, u64)], ceiling: u64) -> Vec<String> {
    let mut failures = Vec::new();
    if let Some(&(at, rss)) = samples.iter().find(|(_, rss)| *rss > ceiling) {
        failures.push(format!(
            "RSS {rss} KiB at {at} s, above the ceiling of {ceiling} KiB"
        ));
    }
    let third = samples.len() / 3;
    if third == 0 {
        failures.push(format!(
            "{} RSS samples: too few to judge growth",
            samples.len()
        ));
        return failures;
    }
    let middle = samples[third..2 * third]
        .iter()
        .map(|&(_, rss)| rss)
        .max()
        .unwrap_or(0);
    let mut last: Vec<u64> = samples[2 * third..].iter().map(|&(_, rss)| rss).collect();
    last.sort_unstable();
    let last = last[last.len() / 2];
    if last as f64 > middle as f64 * (1.0 + GROWTH_MARGIN) {
        failures.push(format!(
            "RSS grew: a median of {last} KiB in the last third of the run, a peak of {middle} \
             KiB in the middle third"
        ));
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(rss: &[u64]) -> Vec<(u64, u64)> {
        rss.iter()
            .enumerate()
            .map(|(i, &r)| (10 * i as u64, r))
            .collect()
    }

    #[test]
    fn memory_that_levels_off_late_passes_and_growth_fails() {
        // Reaches its level late, then stays: not growth.
        let late = samples(&[50, 100, 120, 120, 140, 148, 149, 150, 149]);
        assert!(memory_failures(&late, 1_000).is_empty());
        // A peak given back in the last third: not growth.
        let peak = samples(&[50, 100, 120, 120, 125, 120, 118, 150, 121]);
        assert!(memory_failures(&peak, 1_000).is_empty());
        // Climbs through the last third.
        let growing = samples(&[50, 100, 120, 120, 125, 130, 140, 150, 160]);
        let failures = memory_failures(&growing, 1_000);
        assert!(
            failures.len() == 1 && failures[0].contains("grew"),
            "{failures:?}"
        );
        // Above the ceiling.
        let failures = memory_failures(&late, 149);
        assert!(
            failures.iter().any(|f| f.contains("ceiling")),
            "{failures:?}"
        );
        assert!(!memory_failures(&samples(&[1, 2]), 10).is_empty());
    }
}
