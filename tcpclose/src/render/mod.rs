//! What tcpclose prints: text for people, JSON lines for programs. No I/O beyond the writer it is
//! handed.

use std::{
    borrow::Cow,
    io::{self, Write},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use jiff::{Timestamp, tz::TimeZone};
use serde::Serialize;

mod json;
/// ANSI colours of the text output, only ever written to a terminal.
mod ansi {
    pub const RED: &str = "\x1b[31m";
    pub const BOLD_RED: &str = "\x1b[1;31m";
    pub const GREEN: &str = "\x1b[32m";
    pub const YELLOW: &str = "\x1b[33m";
    pub const CYAN: &str = "\x1b[36m";
    pub const DIM: &str = "\x1b[2m";
    pub const RESET: &str = "\x1b[0m";
}

mod teardown;

mod alert;

pub mod contract;
mod histogram;

pub use alert::{AlertPrinter, OwnedAlert, PlacementRecord};
pub use histogram::print_distributions;
pub use teardown::{TeardownPrinter, human};

use crate::{cgroups::Cgroups, event::Transition};

/// Converts the kernel's CLOCK_MONOTONIC timestamps (`bpf_ktime_get_ns`) to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC, in nanoseconds, read once at start-up.
    offset_ns: i128,
}

impl WallClock {
    pub fn now() -> Self {
        Self::with_offset(clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC))
    }

    pub fn with_offset(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    pub fn timestamp(&self, monotonic_ns: u64) -> Timestamp {
        Timestamp::from_nanosecond(i128::from(monotonic_ns) + self.offset_ns)
            .unwrap_or(Timestamp::UNIX_EPOCH)
    }
}

/// Reads a clock; returns 0 if the clock is unavailable (never on Linux for these two).
pub fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0;
    }
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// Output format chosen on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

/// The address columns of a text output and its header line, shared by the printers whose lines
/// go to one output: a HUNG line lines up with the teardown lines around it, and the header comes
/// first whichever of them prints first. The columns are as wide as the widest address so far (an
/// IPv6 one widens them); they never narrow, so that the lines stay aligned with the header and
/// one another.
#[derive(Clone, Debug)]
struct AddressColumns(Arc<ColumnsState>);

#[derive(Debug)]
struct ColumnsState {
    width: AtomicUsize,
    header_done: AtomicBool,
    /// The header for columns this wide; `None`: no header.
    header: Option<fn(usize) -> String>,
}

impl AddressColumns {
    fn new(header: Option<fn(usize) -> String>) -> Self {
        Self(Arc::new(ColumnsState {
            // 255.255.255.255:65535
            width: AtomicUsize::new(21),
            header_done: AtomicBool::new(false),
            header,
        }))
    }

    /// Widens the columns to fit `local` and `remote`; returns their width.
    fn fit(&self, local: &str, remote: &str) -> usize {
        let needed = local.len().max(remote.len());
        // The printers sharing them run on one thread: no ordering needed.
        self.0
            .width
            .fetch_max(needed, Ordering::Relaxed)
            .max(needed)
    }

    /// Whether the header is due: once, before the first line.
    fn header_due(&self) -> bool {
        !self.0.header_done.swap(true, Ordering::Relaxed)
    }

    /// Starts a line about `local` and `remote`: widens the columns to fit them and writes the
    /// header first if no line came before. Returns the columns' width.
    fn start_line(&self, out: &mut impl Write, local: &str, remote: &str) -> io::Result<usize> {
        let width = self.fit(local, remote);
        if let Some(header) = self.0.header
            && self.header_due()
        {
            writeln!(out, "{}", header(width))?;
        }
        Ok(width)
    }
}

/// The columns of an output that belongs to one printer: alert lines take the teardown lines'
/// (see [`TeardownPrinter::alert_columns`]).
pub struct SharedColumns(AddressColumns);

/// Writes one line per transition (`--events`).
pub struct EventPrinter {
    format: Format,
    clock: WallClock,
    zone: TimeZone,
    columns: AddressColumns,
    /// Reused per line, so that printing allocates nothing per event.
    local: String,
    remote: String,
    pid: String,
    ms: String,
    /// Reused per JSON line.
    json: Vec<u8>,
    time: json::TimeText,
    cgroups: Cgroups,
}

impl EventPrinter {
    pub fn new(format: Format, clock: WallClock) -> Self {
        Self {
            format,
            clock,
            zone: TimeZone::system(),
            columns: AddressColumns::new(Some(|w| {
                format!(
                    "{:<12} {:>7} {:<15} {:<w$} {:<w$} {:>11}    {:<12} {:>10}",
                    "TIME", "PID", "COMM", "LADDR:LPORT", "RADDR:RPORT", "OLD", "NEW", "MS"
                )
            })),
            local: String::new(),
            remote: String::new(),
            pid: String::new(),
            ms: String::new(),
            json: Vec::new(),
            time: json::TimeText::default(),
            cgroups: Cgroups::none(),
        }
    }

    /// Names the sockets' cgroups, containers and pods with `cgroups`.
    pub fn with_cgroups(mut self, cgroups: Cgroups) -> Self {
        self.cgroups = cgroups;
        self
    }

    /// Prints `t`; `in_old_ns` is the time the socket spent in `t.old`, when known.
    pub fn print(
        &mut self,
        out: &mut impl Write,
        t: &Transition,
        in_old_ns: Option<u64>,
    ) -> io::Result<()> {
        let owner = t.owner();
        match self.format {
            Format::Json => {
                let line = &mut self.json;
                line.clear();
                let at = self.clock.timestamp(t.ts_ns);
                write_transition_json(line, &mut self.time, at, t, in_old_ns, &self.cgroups)?;
                out.write_all(line)
            }
            Format::Text => {
                use std::fmt::Write as _;
                let (local, remote, pid, ms) = (
                    &mut self.local,
                    &mut self.remote,
                    &mut self.pid,
                    &mut self.ms,
                );
                local.clear();
                remote.clear();
                pid.clear();
                ms.clear();
                // Writing into a String cannot fail.
                let _ = write!(local, "{}", t.local);
                let _ = write!(remote, "{}", t.remote);
                let w = self.columns.start_line(out, local, remote)?;
                let time = self
                    .clock
                    .timestamp(t.ts_ns)
                    .to_zoned(self.zone.clone())
                    .strftime("%H:%M:%S%.3f");
                let comm = match owner {
                    Some(task) => {
                        let _ = write!(pid, "{}", task.pid);
                        task.comm()
                    }
                    None => Cow::Borrowed(""),
                };
                if let Some(ns) = in_old_ns {
                    write_ms(ms, ns);
                }
                writeln!(
                    out,
                    "{time:<12} {pid:>7} {comm:<15} {local:<w$} {remote:<w$} {:>11} -> {:<12} {ms:>10}",
                    t.old, t.new
                )
            }
        }
    }
}

/// Milliseconds with microsecond precision, as tcpstates prints them.
pub fn format_ms(ns: u64) -> String {
    let mut s = String::new();
    write_ms(&mut s, ns);
    s
}

fn write_ms(out: &mut String, ns: u64) {
    use std::fmt::Write as _;
    // Writing into a String cannot fail.
    let _ = write!(out, "{}.{:03}", ns / 1_000_000, ns / 1_000 % 1_000);
}

/// What a run saw and what it could not deliver; printed when tracing ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// The kernel programs that ran: `btf` (typed) or `raw` (`--programs`).
    pub programs: &'static str,
    /// Transitions received and decoded.
    pub transitions: u64,
    /// Transitions the kernel program dropped because the ring buffer was full.
    pub lost: u64,
    /// Transitions that passed the kernel filters (`transitions + lost + undecodable`).
    pub matched: u64,
    /// Tracepoint hits (transitions and timers alike) the kernel did not hand to tcpclose's
    /// programs because one was already running on that CPU: an interrupt changed a socket's
    /// state while a program ran, and BPF's recursion protection skipped the nested run. Never
    /// matched nor received; a socket whose transition was missed may be reported incomplete.
    pub missed: u64,
    /// Records the loader could not decode (see the warning printed with the first one).
    pub undecodable: u64,
    /// Transitions of sockets not followed because the socket table was full (--events).
    pub untracked: u64,
    /// Teardown records printed.
    pub teardowns: u64,
    /// Hung and resolved alerts printed.
    pub hung_alerts: u64,
    /// Hangs whose report waited for a later sweep because too many checks were under way
    /// (memory for them is bounded): reported late, not lost.
    pub hung_deferred: u64,
    /// Sockets in a teardown state that a census of the kernel's sockets (made when events were
    /// missed or lost) found unfollowed, or followed in another state: followed from then on as
    /// the kernel has them, for their hangs.
    pub census_corrected: u64,
    /// Timewait timer events the timer programs accepted (`timewait_events + timewait_lost`),
    /// received, and dropped because the ring buffer was full.
    pub timewait_matched: u64,
    pub timewait_events: u64,
    pub timewait_lost: u64,
    /// Resets and FIN retransmissions of traced sockets the cause programs accepted
    /// (`cause_events + cause_lost`), received, and dropped because the ring buffer was full.
    pub cause_matched: u64,
    pub cause_events: u64,
    pub cause_lost: u64,
    /// Sockets dropped from the full table (the longest idle first): no record for them.
    pub evicted: u64,
    /// Lives cut short without a record because an event was lost.
    pub unfinished: u64,
    /// Records printed without their timewait phases: the timewait socket was never seen.
    pub timewait_unseen: u64,
    /// Output lines dropped because standard output did not keep up (its reader stopped
    /// reading): tracing went on rather than lose kernel events.
    pub output_lost: u64,
    /// Connections still closing when tracing ended (e.g. in TIME_WAIT): not printed.
    pub in_progress: u64,
    pub duration_ns: u64,
    /// Delay from the kernel to the correlator, in ns: each time the ring buffer is drained,
    /// how long the oldest record handled had waited (CLOCK_MONOTONIC when the drain started
    /// minus the record's `ts_ns`); the median, 99th percentile (two significant digits) and
    /// max over the drains that handled records. All 0 when none did.
    pub delay_p50_ns: u64,
    pub delay_p99_ns: u64,
    pub delay_max_ns: u64,
    /// The largest backlog the reader caught up with: a run of drains that each handed the
    /// reader a full batch (4096 records), ended by one that handed fewer. The records handled
    /// in it (including those that arrived meanwhile), and the ns from the start of its first
    /// drain to the end of its last: `largest_backlog_events / largest_backlog_drain_ns` is how
    /// fast tcpclose drains a backlog. Both 0 when the reader never fell a batch behind (a
    /// catch-up cut short by the end of tracing is not counted).
    pub largest_backlog_events: u64,
    pub largest_backlog_drain_ns: u64,
}

impl Summary {
    pub fn print(&self, format: Format, out: &mut impl Write) -> io::Result<()> {
        match format {
            Format::Json => {
                #[derive(Serialize)]
                struct Record<'a> {
                    #[serde(rename = "type")]
                    kind: &'static str,
                    #[serde(flatten)]
                    summary: &'a Summary,
                }
                serde_json::to_writer(
                    &mut *out,
                    &Record {
                        kind: "summary",
                        summary: self,
                    },
                )?;
                out.write_all(b"\n")
            }
            Format::Text => {
                write!(out, "tcpclose: {} transitions", self.transitions)?;
                if self.teardowns > 0 || self.in_progress > 0 {
                    write!(out, ", {} teardowns", self.teardowns)?;
                }
                write!(
                    out,
                    " in {:.1}s ({} programs), {} lost (ring buffer full)",
                    self.duration_ns as f64 / 1e9,
                    self.programs,
                    self.lost + self.timewait_lost + self.cause_lost
                )?;
                let notes = [
                    (self.missed, "missed (kernel BPF recursion protection)"),
                    (self.undecodable, "undecodable"),
                    (self.untracked, "of untracked sockets (table full)"),
                    (self.evicted, "sockets evicted (table full)"),
                    (self.unfinished, "lives cut short by a lost event"),
                    (self.timewait_unseen, "without their timewait socket"),
                    (self.in_progress, "still closing (not printed)"),
                    (self.hung_alerts, "hung/resolved alerts"),
                    (
                        self.hung_deferred,
                        "hung reports deferred (too many checks under way)",
                    ),
                    (self.output_lost, "output lines dropped (stdout too slow)"),
                ];
                for (n, what) in notes {
                    if n > 0 {
                        write!(out, ", {n} {what}")?;
                    }
                }
                writeln!(out)?;
                if self.delay_max_ns > 0 {
                    write!(
                        out,
                        "tcpclose: kernel-to-reader delay p50 {}, p99 {}, max {}",
                        human(self.delay_p50_ns),
                        human(self.delay_p99_ns),
                        human(self.delay_max_ns)
                    )?;
                    if self.largest_backlog_events > 0 {
                        write!(
                            out,
                            "; largest backlog {} events, drained in {} ({:.2}M events/s)",
                            self.largest_backlog_events,
                            human(self.largest_backlog_drain_ns),
                            self.largest_backlog_events as f64
                                / self.largest_backlog_drain_ns.max(1) as f64
                                * 1e3
                        )?;
                    }
                    writeln!(out)?;
                }
                Ok(())
            }
        }
    }
}

/// One transition as a JSON line (the record's contract: field names and order, `null` for what
/// is unknown), written by hand like the teardown records (see [`json`]).
fn write_transition_json(
    line: &mut Vec<u8>,
    time: &mut json::TimeText,
    at: Timestamp,
    t: &Transition,
    in_old_ns: Option<u64>,
    cgroups: &Cgroups,
) -> io::Result<()> {
    use json::{json_ends, json_escaped, json_hex, json_placement, json_str, json_u64};
    line.extend_from_slice(b"{\"type\":\"transition\",\"ts_ns\":");
    json_u64(line, Some(t.ts_ns));
    line.extend_from_slice(b",\"time\":\"");
    time.write(line, at)?;
    line.extend_from_slice(b"\",\"skaddr\":");
    json_hex(line, t.skaddr);
    json_ends(line, t.family, t.local, t.remote)?;
    line.extend_from_slice(b",\"old\":");
    json_str(line, Some(t.old.name()));
    line.extend_from_slice(b",\"new\":");
    json_str(line, Some(t.new.name()));
    line.extend_from_slice(b",\"in_old_ns\":");
    json_u64(line, in_old_ns);
    let owner = t.owner();
    line.extend_from_slice(b",\"pid\":");
    json_u64(line, owner.map(|task| u64::from(task.pid)));
    line.extend_from_slice(b",\"comm\":");
    match owner {
        Some(task) => json_escaped(line, &task.comm())?,
        None => line.extend_from_slice(b"null"),
    }
    json_placement(line, t.placement, cgroups)?;
    line.extend_from_slice(b"}\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Family, Task, TcpState};

    #[test]
    fn address_columns_widen_for_ipv6_and_never_narrow() {
        let c = AddressColumns::new(None);
        assert!(c.header_due());
        assert!(!c.header_due(), "once");
        assert_eq!(c.fit("10.0.0.1:80", "10.0.0.2:5000"), 21);
        let v6 = "[2001:db8::1234:5678:9abc]:443";
        assert_eq!(c.fit("[::1]:80", v6), v6.len());
        assert_eq!(c.fit("10.0.0.1:80", "10.0.0.2:5000"), v6.len());
    }

    /// The encoding written by hand is the one serde would write, byte for byte: same fields,
    /// same order, same escaping.
    #[test]
    fn json_line_is_what_serde_would_write() {
        use serde::Serialize;

        fn hex<S: serde::Serializer>(addr: &u64, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_str(&format_args!("{addr:#x}"))
        }
        #[derive(Serialize)]
        struct Oracle<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            ts_ns: u64,
            time: Timestamp,
            #[serde(serialize_with = "hex")]
            skaddr: u64,
            family: &'static str,
            laddr: std::net::IpAddr,
            lport: u16,
            raddr: std::net::IpAddr,
            rport: u16,
            old: &'static str,
            new: &'static str,
            in_old_ns: Option<u64>,
            pid: Option<u32>,
            comm: Option<Cow<'a, str>>,
            #[serde(flatten)]
            placement: PlacementRecord,
        }
        let clock = WallClock::with_offset(1_700_000_000_000_000_000);
        let cgroups = Cgroups::fixed(&[(
            9,
            "/system.slice/docker-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope",
        )]);
        let oracle = |t: &Transition, in_old_ns: Option<u64>| {
            let owner = t.owner();
            let mut line = serde_json::to_vec(&Oracle {
                kind: "transition",
                ts_ns: t.ts_ns,
                time: clock.timestamp(t.ts_ns),
                skaddr: t.skaddr,
                family: t.family.name(),
                laddr: t.local.ip(),
                lport: t.local.port(),
                raddr: t.remote.ip(),
                rport: t.remote.port(),
                old: t.old.name(),
                new: t.new.name(),
                in_old_ns,
                pid: owner.map(|task| task.pid),
                comm: owner.map(|task| task.comm()),
                placement: PlacementRecord::new(t.placement, &cgroups),
            })
            .unwrap();
            line.push(b'\n');
            line
        };
        let mut odd = transition();
        odd.task = Task::new(7, 8, "a\"b\\c\u{1}\u{7f}é");
        odd.local = "[2001:db8::1]:443".parse().unwrap();
        odd.remote = "[::ffff:10.0.0.1]:5".parse().unwrap();
        odd.family = Family::Ipv6;
        odd.skaddr = 0;
        odd.ts_ns = 5 * 1_000_000_000;
        let mut softirq = transition();
        softirq.old = TcpState::Established;
        softirq.new = TcpState::CloseWait;
        softirq.skaddr = 0xf;
        softirq.placement = crate::event::Placement {
            netns: 4_026_531_840,
            cgroup: 9,
        };
        let mut p = EventPrinter::new(Format::Json, clock).with_cgroups(cgroups.clone());
        for (t, in_old_ns) in [
            (transition(), Some(200_123_456)),
            (odd, Some(0)),
            (softirq, None),
        ] {
            let mut out = Vec::new();
            p.print(&mut out, &t, in_old_ns).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&oracle(&t, in_old_ns))
            );
        }
    }

    fn transition() -> Transition {
        Transition {
            ts_ns: 2_000_000_123,
            skaddr: 0xffff_8880_1234_5678,
            family: Family::Ipv4,
            local: "127.0.0.1:40000".parse().unwrap(),
            remote: "127.0.0.1:8080".parse().unwrap(),
            old: TcpState::CloseWait,
            new: TcpState::LastAck,
            task: Task::new(42, 43, "server"),
            placement: crate::event::Placement::default(),
        }
    }

    #[test]
    fn json_line_follows_the_contract() {
        let mut p = EventPrinter::new(
            Format::Json,
            WallClock::with_offset(1_700_000_000_000_000_000),
        );
        let mut out = Vec::new();
        p.print(&mut out, &transition(), Some(200_123_456)).unwrap();
        let line = String::from_utf8(out).unwrap();
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["type"], "transition");
        assert_eq!(v["ts_ns"], 2_000_000_123u64);
        assert_eq!(v["time"], "2023-11-14T22:13:22.000000123Z");
        assert_eq!(v["skaddr"], "0xffff888012345678");
        assert_eq!(v["family"], "ipv4");
        assert_eq!(v["laddr"], "127.0.0.1");
        assert_eq!(v["lport"], 40000);
        assert_eq!(v["raddr"], "127.0.0.1");
        assert_eq!(v["rport"], 8080);
        assert_eq!(v["old"], "CLOSE_WAIT");
        assert_eq!(v["new"], "LAST_ACK");
        assert_eq!(v["in_old_ns"], 200_123_456u64);
        assert_eq!(v["pid"], 42);
        assert_eq!(v["comm"], "server");
    }

    #[test]
    fn unknown_duration_and_owner_are_null_in_json_and_blank_in_text() {
        let mut t = transition();
        t.old = TcpState::Established;
        t.new = TcpState::CloseWait;
        let mut out = Vec::new();
        EventPrinter::new(Format::Json, WallClock::with_offset(0))
            .print(&mut out, &t, None)
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v["in_old_ns"].is_null());
        assert!(v["pid"].is_null());
        assert!(v["comm"].is_null());

        let mut out = Vec::new();
        EventPrinter::new(Format::Text, WallClock::with_offset(0))
            .print(&mut out, &t, None)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        let line = text.lines().nth(1).unwrap();
        assert!(line.contains("ESTABLISHED -> CLOSE_WAIT"), "{line}");
        assert!(!line.contains("server"), "{line}");
        assert!(
            line.trim_end().ends_with("CLOSE_WAIT"),
            "no MS column value: {line}"
        );
    }

    #[test]
    fn text_columns_line_up_under_the_header() {
        let mut p = EventPrinter::new(Format::Text, WallClock::with_offset(0));
        let mut out = Vec::new();
        p.print(&mut out, &transition(), Some(200_123_456)).unwrap();
        let text = String::from_utf8(out).unwrap();
        let mut lines = text.lines();
        let header = lines.next().unwrap();
        let line = lines.next().unwrap();
        assert_eq!(header.len(), line.len(), "{header}\n{line}");
        assert_eq!(header.find("LADDR"), line.find("127.0.0.1:40000"));
        assert!(line.contains("CLOSE_WAIT -> LAST_ACK"));
        assert!(line.ends_with("200.123"), "{line}");
        assert!(line.contains(" 42 server "), "{line}");
    }

    #[test]
    fn milliseconds_keep_microseconds() {
        assert_eq!(format_ms(0), "0.000");
        assert_eq!(format_ms(1_500), "0.001");
        assert_eq!(format_ms(200_123_456), "200.123");
        assert_eq!(format_ms(61_000_000_000), "61000.000");
    }

    #[test]
    fn summary_json_has_type_and_counts() {
        let s = Summary {
            transitions: 10,
            lost: 2,
            matched: 12,
            ..Summary::default()
        };
        let mut out = Vec::new();
        s.print(Format::Json, &mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["type"], "summary");
        assert_eq!(v["transitions"], 10);
        assert_eq!(v["lost"], 2);
        assert_eq!(v["matched"], 12);
    }

    #[test]
    fn summary_reports_delay_and_backlog() {
        let s = Summary {
            transitions: 10,
            delay_p50_ns: 1_500_000,
            delay_p99_ns: 45_000_000,
            delay_max_ns: 52_000_000,
            largest_backlog_events: 250_000,
            largest_backlog_drain_ns: 100_000_000,
            ..Summary::default()
        };
        let mut out = Vec::new();
        s.print(Format::Json, &mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["delay_p50_ns"], 1_500_000);
        assert_eq!(v["delay_p99_ns"], 45_000_000);
        assert_eq!(v["delay_max_ns"], 52_000_000);
        assert_eq!(v["largest_backlog_events"], 250_000);
        assert_eq!(v["largest_backlog_drain_ns"], 100_000_000);

        let mut out = Vec::new();
        s.print(Format::Text, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let mut lines = text.lines();
        assert!(
            lines.next().unwrap().contains(" 0 lost (ring buffer full)"),
            "{text}"
        );
        assert_eq!(
            lines.next(),
            Some(
                "tcpclose: kernel-to-reader delay p50 1.50ms, p99 45.0ms, max 52.0ms; \
                 largest backlog 250000 events, drained in 100ms (2.50M events/s)"
            ),
            "{text}"
        );
        assert_eq!(lines.next(), None);

        // Nothing drained: one line, as before.
        let mut out = Vec::new();
        Summary::default().print(Format::Text, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap().lines().count(), 1);
    }
}
