//! The report: the medians of the rounds as markdown tables (churn, kernel programs, stress
//! figures against their targets), and notes on how each figure was measured.

use std::{fs, thread};

use tcpclose_common::{DEFAULT_RING_BYTES, TRANSITION_EVENT_SIZE};

use super::{
    Bench, DRAIN, Mode, Options, Part, Results, Sample, Traced,
    holder::{HOLD_ADDRS, HOLD_PORTS},
    hung_burst::{self, HungBurst},
    stress::{BURST, BURST_IDLE, DRAIN_LEAD, DRAIN_STOP, DRAIN_TAIL, HELD_CONNECTIONS, HOLD_SEEN},
    tracer::{Lag, TCPSTATES_PATHS},
};

/// Targets the stress figures are held to.
const TARGET_DRAIN_PER_S: f64 = 2.5e6;
const TARGET_DELAY_P99_NS: f64 = 100e6;
/// The reader's longest delay while thousands of hangs come due.
const TARGET_HUNG_DELAY_MAX_NS: f64 = 250e6;
const TARGET_RSS_MIB: f64 = 64.0;

pub(super) fn report(bench: &Bench, options: &Options, results: &Results) {
    println!();
    println!("{}", machine_facts(bench, options));
    if bench.runs(Part::Churn) {
        println!();
        println!("Churn, kernel.bpf_stats_enabled=0:");
        println!();
        print_main_table(bench, results);
    }
    if bench.runs(Part::Stats) {
        println!();
        println!("Kernel programs, separate runs with kernel.bpf_stats_enabled=1:");
        println!();
        print_stats_table(bench, results);
        println!();
        print_program_table(bench, &results.stats);
    }
    let stress = stress_rows(bench, results);
    if !stress.is_empty() {
        println!();
        println!("tcpclose under stress (default ring buffer), medians of the rounds:");
        println!();
        print_stress_table(&stress);
    }
    println!();
    print_notes(bench, results);
}

fn machine_facts(bench: &Bench, options: &Options) -> String {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    let cores = thread::available_parallelism().map_or(0, usize::from);
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into());
    let parts: Vec<&str> = bench
        .parts
        .iter()
        .map(|p| match p {
            Part::Churn => "churn",
            Part::Stats => "stats",
            Part::Burst => "burst",
            Part::Drain => "drain",
            Part::Rss => "rss",
            Part::HungBurst => "hung-burst",
        })
        .collect();
    format!(
        "Linux {kernel}, {cores} cores ({cpu}). Loopback churn: {} client/server pairs (threads) \
         in a network namespace of their own (fresh per run), server closes first; {} \
         interleaved rounds of {} s ({}); medians. Tracers in the host namespace, output to a \
         file.",
        bench.pairs,
        options.rounds,
        options.seconds,
        parts.join(", "),
    )
}

fn print_main_table(bench: &Bench, results: &Results) {
    let samples = &results.churn;
    let rate = |s: &Sample| Some(s.connections_per_s);
    let cpu = |s: &Sample| Some(s.cpu_ns_per_connection / 1e3);
    let (base_rate, base_cpu) = (
        median_of(samples, Mode::Untraced, rate),
        median_of(samples, Mode::Untraced, cpu),
    );
    println!(
        "| mode | conn/s (min-max) | vs untraced | CPU us/conn | vs untraced | events/s | lost \
         (all runs) | tracer CPU ns/event | BPF ns/event (bpf_stats runs) | wakeups/s | peak RSS |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for mode in Mode::ALL {
        if mode == Mode::Tcpstates && bench.tcpstates.is_none() {
            println!(
                "| {} | not installed (`apt-get install libbpf-tools`) | | | | | | | | | |",
                mode.name()
            );
            continue;
        }
        if mode == Mode::Baseline && bench.baseline.is_none() {
            continue;
        }
        let (mode_rate, mode_cpu) = (
            median_of(samples, mode, rate),
            median_of(samples, mode, cpu),
        );
        let traced = |f: fn(&Traced) -> f64| median_of(samples, mode, |s| s.traced.as_ref().map(f));
        let bpf = median_of(&results.stats, mode, |s| {
            s.traced.as_ref()?.bpf_ns_per_event
        });
        println!(
            "| {} | {} ({}) | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            mode.name(),
            number(mode_rate),
            spread(samples, mode, rate),
            ratio(mode_rate, base_rate),
            mode_cpu.map_or("-".into(), |us| format!("{us:.2}")),
            ratio(mode_cpu, base_cpu),
            number(traced(|t| t.events_per_s)),
            lost(samples, mode),
            number(traced(|t| t.cpu_ns_per_event)),
            number(bpf),
            number(traced(|t| t.wakeups_per_s)),
            traced(|t| t.peak_rss_kib as f64).map_or("-".into(), mib),
        );
    }
}

/// The statistics runs: their churn rate against the same tracer's with statistics off (what
/// statistics cost), and the programs' time per event.
fn print_stats_table(bench: &Bench, results: &Results) {
    let rate = |s: &Sample| Some(s.connections_per_s);
    let bpf = |s: &Sample| s.traced.as_ref()?.bpf_ns_per_event;
    // The programs' time per connection: per event times events per connection (the typed and
    // the raw programs deliver different numbers of timewait events per connection).
    let bpf_per_connection = |s: &Sample| {
        let t = s.traced.as_ref()?;
        let per_event = t.bpf_ns_per_event?;
        (s.connections_per_s > 0.0).then(|| per_event * t.events_per_s / s.connections_per_s)
    };
    println!(
        "| mode | conn/s, bpf_stats on (min-max) | vs same mode, bpf_stats off (per round) | lost \
         (all runs) | BPF ns/event (min-max) | BPF ns/connection |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for mode in bench.modes().into_iter().filter(|&m| m != Mode::Untraced) {
        // Per round (the two runs are next to each other), then the median: steadier than the
        // ratio of the medians on a machine whose load drifts.
        let ratios: Vec<f64> = of_mode(&results.stats, mode)
            .zip(of_mode(&results.churn, mode))
            .filter(|(_, off)| off.connections_per_s > 0.0)
            .map(|(on, off)| on.connections_per_s / off.connections_per_s)
            .collect();
        println!(
            "| {} | {} ({}) | {} | {} | {} ({}) | {} |",
            mode.name(),
            number(median_of(&results.stats, mode, rate)),
            spread(&results.stats, mode, rate),
            median(ratios).map_or("-".into(), |r| format!("{r:.2}")),
            lost(&results.stats, mode),
            number(median_of(&results.stats, mode, bpf)),
            spread(&results.stats, mode, bpf),
            number(median_of(&results.stats, mode, bpf_per_connection)),
        );
    }
}

fn ratio(value: Option<f64>, base: Option<f64>) -> String {
    match (value, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{:.2}", v / b),
        _ => "-".into(),
    }
}

/// `min-max` of `f` over the runs of `mode`.
fn spread(samples: &[(Mode, Sample)], mode: Mode, f: impl Fn(&Sample) -> Option<f64>) -> String {
    let values: Vec<f64> = of_mode(samples, mode).filter_map(f).collect();
    min_max(&values, |v| number(Some(v)))
}

fn min_max(values: &[f64], show: impl Fn(f64) -> String) -> String {
    let min = values.iter().copied().reduce(f64::min);
    let max = values.iter().copied().reduce(f64::max);
    match (min, max) {
        (Some(min), Some(max)) => format!("{}-{}", show(min), show(max)),
        _ => "-".into(),
    }
}

/// Events lost over all runs of `mode`, and their share of the events.
fn lost(samples: &[(Mode, Sample)], mode: Mode) -> String {
    let traced: Vec<&Traced> = of_mode(samples, mode)
        .filter_map(|s| s.traced.as_ref())
        .collect();
    if traced.is_empty() {
        return "-".into();
    }
    let lost: u64 = traced.iter().map(|t| t.lost).sum();
    let events: u64 = traced.iter().map(|t| t.events).sum();
    if lost == 0 {
        return "0".into();
    }
    format!(
        "{lost} ({:.1}%)",
        100.0 * lost as f64 / (events + lost) as f64
    )
}

fn print_program_table(bench: &Bench, samples: &[(Mode, Sample)]) {
    println!("| mode | kernel program | runs/s | ns/run |");
    println!("|---|---|---:|---:|");
    for mode in bench.modes() {
        let mut names: Vec<&String> = of_mode(samples, mode)
            .filter_map(|s| s.traced.as_ref())
            .flat_map(|t| t.programs.keys())
            .collect();
        names.sort();
        names.dedup();
        for name in names {
            let stat = |i: usize| {
                median_of(samples, mode, |s| {
                    let (runs, ns) = s.traced.as_ref()?.programs.get(name)?;
                    Some(if i == 0 { *runs } else { *ns })
                })
            };
            println!(
                "| {} | {name} | {} | {} |",
                mode.name(),
                number(stat(0)),
                number(stat(1))
            );
        }
    }
}

/// What a stress figure is held to.
#[derive(Clone, Copy)]
enum Target {
    None,
    /// Zero in every round.
    Zero,
    AtMost(f64),
    AtLeast(f64),
}

/// One line of the stress table: a figure per round.
struct Row {
    what: String,
    values: Vec<f64>,
    show: fn(f64) -> String,
    target: Target,
}

impl Row {
    fn new(what: impl Into<String>, values: Vec<f64>, show: fn(f64) -> String) -> Self {
        Self {
            what: what.into(),
            values,
            show,
            target: Target::None,
        }
    }

    fn target(self, target: Target) -> Self {
        Self { target, ..self }
    }
}

fn stress_rows(bench: &Bench, results: &Results) -> Vec<Row> {
    let count = |v: f64| number(Some(v));
    let mut rows = Vec::new();
    let lag_of_runs = |mode: Mode| -> Vec<Lag> {
        of_mode(&results.churn, mode)
            .filter_map(|s| s.traced.as_ref()?.lag)
            .collect()
    };
    if bench.runs(Part::Burst) {
        let b = &results.burst;
        rows.push(
            Row::new(
                format!(
                    "burst: events lost in {} s of full churn from idle",
                    BURST.as_secs()
                ),
                b.iter().map(|b| b.lost as f64).collect(),
                count,
            )
            .target(Target::Zero),
        );
        rows.push(Row::new(
            "burst: events delivered",
            b.iter().map(|b| b.events as f64).collect(),
            count,
        ));
        rows.push(Row::new(
            "burst: delay p99",
            b.iter()
                .filter_map(|b| b.lag)
                .map(|l| l.delay_p99_ns as f64)
                .collect(),
            ms,
        ));
        rows.push(Row::new(
            "burst: delay max",
            b.iter()
                .filter_map(|b| b.lag)
                .map(|l| l.delay_max_ns as f64)
                .collect(),
            ms,
        ));
    }
    if bench.runs(Part::Drain) {
        let lags: Vec<Lag> = results.drain.iter().filter_map(|d| d.lag).collect();
        rows.push(
            Row::new(
                format!(
                    "drain after {} ms SIGSTOP: events/s",
                    DRAIN_STOP.as_millis()
                ),
                lags.iter().filter_map(Lag::drain_per_s).collect(),
                count,
            )
            .target(Target::AtLeast(TARGET_DRAIN_PER_S)),
        );
        rows.push(Row::new(
            "drain: backlog (events in the largest catch-up)",
            lags.iter().map(|l| l.backlog_events as f64).collect(),
            count,
        ));
        rows.push(Row::new(
            "drain: catch-up time",
            lags.iter().map(|l| l.backlog_drain_ns as f64).collect(),
            ms,
        ));
        rows.push(Row::new(
            "drain: delay max (the stop included)",
            lags.iter().map(|l| l.delay_max_ns as f64).collect(),
            ms,
        ));
        rows.push(
            Row::new(
                "drain: events lost",
                results.drain.iter().map(|d| d.lost as f64).collect(),
                count,
            )
            .target(Target::Zero),
        );
        rows.push(Row::new(
            "drain: events delivered",
            results.drain.iter().map(|d| d.events as f64).collect(),
            count,
        ));
    }
    if bench.runs(Part::Churn) {
        for mode in [Mode::Teardowns, Mode::Events] {
            let lags = lag_of_runs(mode);
            let name = mode.name();
            rows.push(Row::new(
                format!("delay p50 at full churn, {name}"),
                lags.iter().map(|l| l.delay_p50_ns as f64).collect(),
                ms,
            ));
            rows.push(
                Row::new(
                    format!("delay p99 at full churn, {name}"),
                    lags.iter().map(|l| l.delay_p99_ns as f64).collect(),
                    ms,
                )
                .target(Target::AtMost(TARGET_DELAY_P99_NS)),
            );
            rows.push(Row::new(
                format!("delay max at full churn, {name}"),
                lags.iter().map(|l| l.delay_max_ns as f64).collect(),
                ms,
            ));
        }
    }
    if bench.runs(Part::Rss) {
        let r = &results.rss;
        let sockets = r.iter().map(|h| h.sockets).max().unwrap_or(0);
        rows.push(
            Row::new(
                format!(
                    "RSS following {} open sockets: VmRSS",
                    number(Some(sockets as f64))
                ),
                r.iter().map(|h| h.rss_kib as f64).collect(),
                mib,
            )
            .target(Target::AtMost(TARGET_RSS_MIB * 1024.0)),
        );
        rows.push(Row::new(
            "RSS: VmHWM",
            r.iter().map(|h| h.hwm_kib as f64).collect(),
            mib,
        ));
        rows.push(Row::new(
            "RSS: VmRSS idle, before the connections",
            r.iter().map(|h| h.idle_rss_kib as f64).collect(),
            mib,
        ));
        rows.push(Row::new(
            "RSS: seconds to open the connections",
            r.iter().map(|h| h.open_s).collect(),
            |s| format!("{s:.1}"),
        ));
        rows.push(
            Row::new(
                "RSS: events lost while they opened",
                r.iter().map(|h| h.lost as f64).collect(),
                count,
            )
            .target(Target::Zero),
        );
        rows.push(
            Row::new(
                "RSS: sockets evicted",
                r.iter().map(|h| h.evicted as f64).collect(),
                count,
            )
            .target(Target::Zero),
        );
    }
    if bench.runs(Part::HungBurst) {
        rows.extend(hung_burst_rows(&results.hung_burst));
    }
    rows
}

/// The hung burst's rows: per spread over namespaces, the reports and the reader's delay.
fn hung_burst_rows(runs: &[HungBurst]) -> Vec<Row> {
    let count = |v: f64| number(Some(v));
    let seconds = |v: f64| format!("{v:.1} s");
    let mut rows = Vec::new();
    for spread in hung_burst::SPREADS {
        let of: Vec<&HungBurst> = runs.iter().filter(|r| r.namespaces == spread).collect();
        let what = match spread {
            0 => "hung burst: the churn alone".to_owned(),
            1 => format!(
                "hung burst: {} hangs in 1 namespace",
                2 * hung_burst::CONNECTIONS
            ),
            n => format!(
                "hung burst: {} hangs over {n} namespaces",
                2 * hung_burst::CONNECTIONS
            ),
        };
        let lag = |f: fn(&Lag) -> u64| -> Vec<f64> {
            of.iter()
                .filter_map(|r| r.lag.as_ref())
                .map(|l| f(l) as f64)
                .collect()
        };
        if spread > 0 {
            rows.push(
                Row::new(
                    format!("{what}: hangs not reported"),
                    of.iter()
                        .map(|r| (r.hangs - r.reported.min(r.hangs)) as f64)
                        .collect(),
                    count,
                )
                .target(Target::Zero),
            );
            rows.push(Row::new(
                format!("{what}: all reported after the leak"),
                of.iter().filter_map(|r| r.all_reported_s).collect(),
                seconds,
            ));
        }
        rows.push(
            Row::new(
                format!("{what}: lost"),
                of.iter().map(|r| r.lost as f64).collect(),
                count,
            )
            .target(Target::Zero),
        );
        rows.push(
            Row::new(
                format!("{what}: kernel-to-reader delay p99"),
                lag(|l| l.delay_p99_ns),
                ms,
            )
            .target(Target::AtMost(TARGET_DELAY_P99_NS)),
        );
        rows.push(
            Row::new(
                format!("{what}: kernel-to-reader delay max"),
                lag(|l| l.delay_max_ns),
                ms,
            )
            .target(Target::AtMost(TARGET_HUNG_DELAY_MAX_NS)),
        );
    }
    rows
}

fn print_stress_table(rows: &[Row]) {
    println!("| measurement | median | min-max | per round | target | met |");
    println!("|---|---:|---:|---|---:|---|");
    for row in rows {
        let median = median(row.values.clone());
        let (target, met) = match row.target {
            Target::None => (String::new(), None),
            Target::Zero => ("0".into(), Some(row.values.iter().all(|&v| v == 0.0))),
            Target::AtMost(t) => (format!("<= {}", (row.show)(t)), median.map(|m| m <= t)),
            Target::AtLeast(t) => (format!(">= {}", (row.show)(t)), median.map(|m| m >= t)),
        };
        let met = match (met, row.values.is_empty()) {
            (_, true) => "",
            (Some(true), _) => "yes",
            (Some(false), _) => "NO",
            (None, _) => "",
        };
        let per_round: Vec<String> = row.values.iter().map(|&v| (row.show)(v)).collect();
        println!(
            "| {} | {} | {} | {} | {target} | {met} |",
            row.what,
            median.map_or("-".into(), row.show),
            min_max(&row.values, row.show),
            if per_round.is_empty() {
                "-".into()
            } else {
                per_round.join(", ")
            },
        );
    }
}

fn print_notes(bench: &Bench, results: &Results) {
    if bench.runs(Part::Churn) {
        print_churn_notes();
    }
    if bench.runs(Part::Stats) {
        if bench.runs(Part::Churn) {
            println!();
        }
        print_stats_notes();
    }
    if !results.burst.is_empty() || !results.drain.is_empty() || !results.rss.is_empty() {
        println!();
        print_stress_notes();
    }
    let evicted: u64 = results
        .churn
        .iter()
        .chain(&results.stats)
        .filter_map(|(_, s)| s.traced.as_ref())
        .map(|t| t.evicted)
        .sum();
    if evicted > 0 {
        println!(
            "\ntcpclose evicted {evicted} sockets from its full table (`--max-sockets`) over all \
             churn runs."
        );
    }
    if bench.tcpstates.is_none() {
        println!("\ntcpstates was not found in {TCPSTATES_PATHS:?} or on PATH.");
    }
    if let Some(baseline) = &bench.baseline {
        println!("\nbaseline: {} (`--json`)", baseline.display());
    }
}

fn print_churn_notes() {
    println!(
        "conn/s: connections the churn completed per second, medians with the range over runs. \
         CPU/conn: CPU time of the churn's threads (CLOCK_THREAD_CPUTIME_ID, kernel work in their \
         context included) plus the tracer's, per connection; less sensitive than conn/s to \
         other load on the machine. events: TCP state changes the tracer delivered (tcpclose: \
         summary `transitions`; tcpstates: output lines). lost: dropped in the kernel with the \
         buffer full (tcpclose: `lost` + `timewait_lost`; tcpstates: its `lost N events` \
         warnings). tracer CPU: utime + stime of the tracer (/proc/PID/stat, clock ticks) from \
         the start of the churn to {} ms after it, start-up excluded. wakeups: voluntary \
         context switches of the tracer's threads (/proc/PID/task/*/status), a proxy. peak RSS: \
         VmHWM just before SIGINT.",
        DRAIN.as_millis()
    );
}

fn print_stats_notes() {
    println!(
        "bpf_stats: kernel.bpf_stats_enabled makes the kernel read the clock twice around every \
         program run, which slows the traced churn; the churn runs above have it off. Each \
         round measures each tracer once more, the same way, with it on: BPF ns/event is the \
         run time of the tracer's kernel programs (bpf_prog_info run_time_ns, between the start \
         and the end of the churn) per event delivered, and the program table gives their runs \
         and ns per run; `vs same mode, bpf_stats off` is what the statistics themselves cost \
         the churn (the median over rounds of the ratio of the two runs, which are next to each \
         other in each round). The sysctl is put back as it was at the end (also on error or Ctrl-C)."
    );
}

fn print_stress_notes() {
    println!(
        "Stress, each in a fresh namespace with `tcpclose --json` (default ring buffer) \
             started for it. burst: the tracer idles {} s once attached, then {} s of full churn; \
             lost is its summary's `lost` + `timewait_lost`, per round. drain: {} s into full \
             churn the tracer gets SIGSTOP (once its event loop is asleep, not amid a catch-up), {} \
         ms later SIGCONT, and the churn goes on {} s; \
             tcpclose itself measures its largest catch-up (consecutive drains of the ring that \
             each return a full batch of 4096 records, ended by one that returns fewer: records \
             handled, including those that arrived meanwhile, over the time from its first \
             drain's start to its last's end; summary `largest_backlog_events` / \
             `largest_backlog_drain_ns`); the default ring ({} MiB) holds about {} transition \
             records (8-byte header each), beyond which the kernel drops events. delay: for each drain of the ring, CLOCK_MONOTONIC at \
             its start minus the `ts_ns` of the oldest record it handled, in an hdrhistogram \
             (summary `delay_p50_ns`, `delay_p99_ns`, `delay_max_ns`, per drain, not per event); \
             the full-churn rows come from the churn runs. RSS: {} connections ({} sockets) \
             opened to {} listener ports at 127.0.0.1-{} and held, {} s for the tracer to see \
             them, then its VmRSS and VmHWM (/proc/PID/status); the connections are reset after \
             the tracer stopped. They are held by a few helper processes (RLIMIT_NOFILE's hard \
             limit bounds each).",
        BURST_IDLE.as_secs(),
        BURST.as_secs(),
        DRAIN_LEAD.as_secs(),
        DRAIN_STOP.as_millis(),
        DRAIN_TAIL.as_secs_f64(),
        DEFAULT_RING_BYTES >> 20,
        number(Some(ring_records() as f64)),
        number(Some(HELD_CONNECTIONS as f64)),
        number(Some(2.0 * HELD_CONNECTIONS as f64)),
        HOLD_PORTS,
        HOLD_ADDRS,
        HOLD_SEEN.as_secs(),
    );
}

/// Transition records the default ring buffer holds: each takes an 8-byte header and its size
/// rounded up to 8 bytes.
fn ring_records() -> usize {
    DEFAULT_RING_BYTES as usize / (8 + TRANSITION_EVENT_SIZE.next_multiple_of(8))
}

fn of_mode(samples: &[(Mode, Sample)], mode: Mode) -> impl Iterator<Item = &Sample> {
    samples
        .iter()
        .filter(move |(m, _)| *m == mode)
        .map(|(_, s)| s)
}

fn median_of(
    samples: &[(Mode, Sample)],
    mode: Mode,
    f: impl Fn(&Sample) -> Option<f64>,
) -> Option<f64> {
    median(of_mode(samples, mode).filter_map(f).collect())
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[mid]),
        _ => Some((v[mid - 1] + v[mid]) / 2.0),
    }
}

/// Nanoseconds as milliseconds.
pub(super) fn ms(ns: f64) -> String {
    let ms = ns / 1e6;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.1} ms")
    }
}

/// KiB as MiB.
fn mib(kib: f64) -> String {
    format!("{:.1} MiB", kib / 1024.0)
}

/// A rounded number with thousands separated, `-` for none.
pub(super) fn number(value: Option<f64>) -> String {
    let Some(value) = value else {
        return "-".into();
    };
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if value < -0.5 {
        out.insert(0, '-');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_numbers() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(number(Some(2_500_000.4)), "2,500,000");
        assert_eq!(number(Some(-1234.0)), "-1,234");
        assert_eq!(number(None), "-");
        assert_eq!(ms(45_300_000.0), "45.3 ms");
        assert_eq!(ms(1_234_000.0), "1.23 ms");
        assert_eq!(mib(65_536.0), "64.0 MiB");
    }
}
