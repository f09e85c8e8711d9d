//! Hung burst: an incident's worth of hangs coming due at once while the host churns. 6,000
//! connections leak together, spread over 1, 10 or 100 network namespaces (containers): their
//! servers never close (CLOSE_WAIT), half their clients close (orphaned FIN_WAIT2) and half
//! half-close (`shutdown(SHUT_WR)`, FIN_WAIT2 held open): 12,000 hangs. `tcpclose --json
//! --hung CLOSE_WAIT=1s --hung FIN_WAIT2=1s` must report them all while the bench's churn runs
//! in a namespace of its own, and keep reading the ring meanwhile. The same churn without leaks
//! is measured alongside, for comparison.

use std::{
    fs::File,
    io::{Read as _, Seek as _, SeekFrom},
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use tcpclose_tests::{churn, netns::Netns};

use super::{Bench, Lag, Mode, Tracer, holder::Holder};

/// Connections leaked at once (each makes two hangs).
pub(super) const CONNECTIONS: usize = 6_000;
/// Over how many namespaces the leaks spread, per measurement; 0: no leak (the baseline).
pub(super) const SPREADS: [usize; 4] = [0, 1, 10, 100];
/// How long the churn runs once the leaks are in place (the hangs come due after 1 s).
const CHURN: Duration = Duration::from_secs(5);
/// How long after the churn the reports may still come.
const REPORT_WAIT: Duration = Duration::from_secs(30);

/// One hung-burst measurement.
#[derive(Clone, Debug, Default)]
pub(super) struct HungBurst {
    pub(super) namespaces: usize,
    pub(super) hangs: u64,
    pub(super) reported: u64,
    /// From the leaks in place to the last hang reported, when all were.
    pub(super) all_reported_s: Option<f64>,
    pub(super) lost: u64,
    pub(super) lag: Option<Lag>,
}

/// Leaks [`CONNECTIONS`] over `namespaces` namespaces under churn (see the module's doc).
pub(super) fn hung_burst(bench: &Bench, namespaces: usize) -> Result<HungBurst> {
    let churn_netns = Netns::create("bench")?;
    let leak_namespaces = (0..namespaces)
        .map(|_| Netns::create("bench"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut cmd = Command::new(&bench.tcpclose);
    cmd.args([
        "--json",
        "--hung",
        "CLOSE_WAIT=1s",
        "--hung",
        "FIN_WAIT2=1s",
    ]);
    let mut tracer = Tracer::start(cmd, Mode::Teardowns, &bench.dir.0)?;
    let mut holders = leak_namespaces
        .iter()
        .enumerate()
        .map(|(i, netns)| {
            let count = CONNECTIONS / namespaces + usize::from(i < CONNECTIONS % namespaces);
            Holder::spawn_leaking(netns, count)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut hangs = 0;
    for holder in &mut holders {
        hangs += 2 * holder.wait_ready()? as u64;
    }
    let leaked = Instant::now();
    let mut reports = HungLines::new(tracer.stdout())?;
    let mut all_reported_s = None;
    thread::scope(|scope| -> Result<()> {
        let churning = scope.spawn(|| churn::timed(&churn_netns, bench.pairs, CHURN));
        while all_reported_s.is_none() && leaked.elapsed() < CHURN + REPORT_WAIT {
            if hangs > 0 && reports.count()? >= hangs {
                all_reported_s = Some(leaked.elapsed().as_secs_f64());
            }
            if hangs == 0 && churning.is_finished() {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        churning
            .join()
            .map_err(|_| anyhow!("the churn panicked"))??;
        Ok(())
    })?;
    let reported = reports.count()?;
    let delivered = tracer.stop()?;
    drop(holders);
    Ok(HungBurst {
        namespaces,
        hangs,
        reported,
        all_reported_s,
        lost: delivered.lost,
        lag: delivered.lag,
    })
}

/// Counts the `hung` records a tracer has written to its output file so far, reading only what
/// is new each time (the churn's teardown records make it hundreds of megabytes).
struct HungLines {
    file: File,
    /// The end of the last whole line read.
    at: u64,
    count: u64,
    buf: Vec<u8>,
}

impl HungLines {
    fn new(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            file,
            at: 0,
            count: 0,
            buf: Vec::new(),
        })
    }

    fn count(&mut self) -> Result<u64> {
        const HUNG: &[u8] = br#"{"type":"hung""#;
        self.file.seek(SeekFrom::Start(self.at))?;
        self.buf.clear();
        self.file.read_to_end(&mut self.buf)?;
        let Some(end) = self.buf.iter().rposition(|&b| b == b'\n') else {
            return Ok(self.count);
        };
        self.count += self.buf[..=end]
            .split(|&b| b == b'\n')
            .filter(|line| line.starts_with(HUNG))
            .count() as u64;
        self.at += end as u64 + 1;
        Ok(self.count)
    }
}
