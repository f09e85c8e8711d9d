//! Stress: `tcpclose --json` (default ring buffer) under a burst of churn from idle, stopped
//! under churn (how fast it drains the backlog), and following many open sockets (its memory).

use std::{
    fs, io, thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use tcpclose_tests::{churn, netns::Netns};

use super::{
    Bench, DRAIN, Mode,
    files::{read_proc, status_field},
    holder::{Holder, connections_per_process},
    tracer::{Lag, Tracer},
};

/// Burst: how long the freshly attached tracer idles before the churn starts, and how long the
/// churn lasts.
pub(super) const BURST_IDLE: Duration = Duration::from_secs(1);
pub(super) const BURST: Duration = Duration::from_secs(2);
/// Backlog drain: churn before the tracer is stopped, how long it stays stopped, churn after.
pub(super) const DRAIN_LEAD: Duration = Duration::from_secs(1);
pub(super) const DRAIN_STOP: Duration = Duration::from_millis(500);
pub(super) const DRAIN_TAIL: Duration = Duration::from_millis(1500);
/// RSS: connections held open at once (each is two sockets), and how long the tracer gets to
/// see them all before its memory is read.
pub(super) const HELD_CONNECTIONS: usize = 50_000;
pub(super) const HOLD_SEEN: Duration = Duration::from_secs(2);

/// A burst of churn on an idle tracer.
#[derive(Clone, Debug, Default)]
pub(super) struct Burst {
    pub(super) connections: u64,
    pub(super) events: u64,
    pub(super) lost: u64,
    pub(super) lag: Option<Lag>,
}

/// The tracer stopped under churn, then let go.
#[derive(Clone, Debug, Default)]
pub(super) struct Stopped {
    pub(super) events: u64,
    pub(super) lost: u64,
    pub(super) lag: Option<Lag>,
}

/// The tracer following many open sockets.
#[derive(Clone, Debug, Default)]
pub(super) struct Held {
    /// Sockets open in the namespace (both ends of each connection).
    pub(super) sockets: u64,
    /// Seconds it took to open them.
    pub(super) open_s: f64,
    pub(super) idle_rss_kib: u64,
    pub(super) rss_kib: u64,
    pub(super) hwm_kib: u64,
    /// Events the tracer delivered and lost meanwhile; sockets it evicted.
    pub(super) events: u64,
    pub(super) lost: u64,
    pub(super) evicted: u64,
}

/// Starts `tcpclose --json`, lets it idle, churns [`BURST`] at full speed, and reads what it
/// lost.
pub(super) fn burst(bench: &Bench, netns: &Netns) -> Result<Burst> {
    let mut tracer = start_tcpclose(bench)?;
    thread::sleep(BURST_IDLE);
    let churned = churn::timed(netns, bench.pairs, BURST)?;
    thread::sleep(DRAIN);
    let delivered = tracer.stop()?;
    Ok(Burst {
        connections: churned.connections,
        events: delivered.events,
        lost: delivered.lost,
        lag: delivered.lag,
    })
}

fn start_tcpclose(bench: &Bench) -> Result<Tracer> {
    let mode = Mode::Teardowns;
    let cmd = bench
        .tracer_command(mode)
        .context("tcpclose has a command")?;
    Tracer::start(cmd, mode, &bench.dir.0)
}

/// Under full churn, stops `tcpclose --json` (SIGSTOP) for [`DRAIN_STOP`], lets it go on
/// (SIGCONT), and reads from its summary how fast it caught up.
pub(super) fn stop_and_drain(bench: &Bench, netns: &Netns) -> Result<Stopped> {
    let mut tracer = start_tcpclose(bench)?;
    let pid = i32::try_from(tracer.pid()).context("pid out of range")?;
    thread::scope(|scope| -> Result<()> {
        let churning =
            scope.spawn(|| churn::timed(netns, bench.pairs, DRAIN_LEAD + DRAIN_STOP + DRAIN_TAIL));
        thread::sleep(DRAIN_LEAD);
        // Not in the middle of a catch-up (whose time would then include the stop).
        wait_asleep(tracer.pid());
        {
            let _stopped = Sigstopped::stop(pid)?;
            thread::sleep(DRAIN_STOP);
        }
        churning
            .join()
            .map_err(|_| anyhow!("the churn panicked"))??;
        Ok(())
    })?;
    thread::sleep(DRAIN);
    let delivered = tracer.stop()?;
    if delivered.lag.is_none() {
        bail!("tcpclose's summary has no delay_*_ns / largest_backlog_* (an older binary?)");
    }
    Ok(Stopped {
        events: delivered.events,
        lost: delivered.lost,
        lag: delivered.lag,
    })
}

/// Waits (at most 200 ms) until the main thread of `pid`, tcpclose's event loop, is asleep
/// (state `S`): waiting for the ring buffer or its timer, not draining a backlog. A drain that
/// returns a full batch is followed by another without sleeping.
fn wait_asleep(pid: u32) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(200) {
        let asleep = fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let (_, rest) = stat.rsplit_once(')')?;
                rest.split_whitespace().next().map(|state| state == "S")
            })
            .unwrap_or(false);
        if asleep {
            return;
        }
        thread::sleep(Duration::from_micros(200));
    }
}

/// A process stopped by SIGSTOP, continued (SIGCONT) when dropped.
struct Sigstopped(i32);

impl Sigstopped {
    fn stop(pid: i32) -> Result<Self> {
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        if unsafe { libc::kill(pid, libc::SIGSTOP) } != 0 {
            return Err(io::Error::last_os_error()).context("SIGSTOP to the tracer");
        }
        Ok(Self(pid))
    }
}

impl Drop for Sigstopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// Starts `tcpclose --json`, opens [`HELD_CONNECTIONS`] loopback connections in `netns` and
/// holds them, gives the tracer [`HOLD_SEEN`] to see them all, reads its memory, stops it, and
/// resets the connections (no timewait sockets left behind). The sockets are spread over
/// helper processes (`cargo xtask hold-connections`): a process may not hold more than
/// RLIMIT_NOFILE's hard limit, which root cannot raise without CAP_SYS_RESOURCE.
pub(super) fn hold(bench: &Bench, netns: &Netns) -> Result<Held> {
    let mut tracer = start_tcpclose(bench)?;
    let pid = tracer.pid();
    let idle_rss_kib = status_field(&read_proc(pid, "status")?, "VmRSS:").unwrap_or(0);
    let per_process = connections_per_process()?;
    let processes = HELD_CONNECTIONS.div_ceil(per_process);
    let started = Instant::now();
    let mut holders = (0..processes)
        .map(|i| {
            let count =
                HELD_CONNECTIONS / processes + usize::from(i < HELD_CONNECTIONS % processes);
            Holder::spawn(netns, count)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut sockets = 0;
    for holder in &mut holders {
        sockets += 2 * holder.wait_ready()? as u64;
    }
    let open_s = started.elapsed().as_secs_f64();
    thread::sleep(HOLD_SEEN);
    let status = read_proc(pid, "status")?;
    let (rss_kib, hwm_kib) = (
        status_field(&status, "VmRSS:").unwrap_or(0),
        status_field(&status, "VmHWM:").unwrap_or(0),
    );
    // The tracer stops before the connections close: what it reports covers their opening.
    let delivered = tracer.stop();
    drop(holders);
    let delivered = delivered?;
    Ok(Held {
        sockets,
        open_s,
        idle_rss_kib,
        rss_kib,
        hwm_kib,
        events: delivered.events,
        lost: delivered.lost,
        evicted: delivered.evicted,
    })
}
