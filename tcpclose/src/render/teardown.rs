//! One line per finished connection: the default output.

use std::{
    borrow::Cow,
    fmt::Write as _,
    io::{self, Write},
    net::IpAddr,
};

use jiff::{Timestamp, tz::TimeZone};
use serde::Serialize;

use super::{Format, WallClock};
use crate::teardown::{CloseKind, Phase, Phases, Side, Teardown, TimewaitEnd};

/// Writes [`Teardown`] records as aligned text (optionally coloured) or JSON lines.
pub struct TeardownPrinter {
    format: Format,
    colour: bool,
    clock: WallClock,
    zone: TimeZone,
    header_done: bool,
    /// Width of the address columns; grows to fit IPv6 addresses.
    addr_width: usize,
    /// Reused per line.
    line: String,
}

#[derive(Serialize)]
struct TeardownRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    time: Timestamp,
    ts_ns: u64,
    family: &'static str,
    laddr: IpAddr,
    lport: u16,
    raddr: IpAddr,
    rport: u16,
    side: Option<&'static str>,
    close: &'static str,
    phases: PhasesJson<'a>,
    teardown_ns: Option<u64>,
    lifetime_ns: Option<u64>,
    complete: bool,
    pid: Option<u32>,
    comm: Option<Cow<'a, str>>,
    resolution_ns: Option<u64>,
    timewait_end: Option<&'static str>,
}

const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
const CYAN: &str = "\x1b[36m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

impl TeardownPrinter {
    /// `colour` adds ANSI colours to text output (only ever for a terminal).
    pub fn new(format: Format, clock: WallClock, colour: bool) -> Self {
        Self {
            format,
            colour,
            clock,
            zone: TimeZone::system(),
            header_done: false,
            addr_width: 21,
            line: String::new(),
        }
    }

    pub fn print(&mut self, out: &mut impl Write, t: &Teardown) -> io::Result<()> {
        match self.format {
            Format::Json => {
                let record = TeardownRecord {
                    kind: "teardown",
                    time: self.clock.timestamp(t.end_ns),
                    ts_ns: t.end_ns,
                    family: t.family.name(),
                    laddr: t.local.ip(),
                    lport: t.local.port(),
                    raddr: t.remote.ip(),
                    rport: t.remote.port(),
                    side: t.side.map(side_name),
                    close: t.close.name(),
                    phases: PhasesJson(&t.phases),
                    teardown_ns: t.teardown_ns,
                    lifetime_ns: t.lifetime_ns,
                    complete: t.complete,
                    pid: t.owner.map(|o| o.pid),
                    comm: t.owner.as_ref().map(|o| o.comm()),
                    resolution_ns: t.resolution_ns,
                    timewait_end: t.timewait_end.map(|end| match end {
                        TimewaitEnd::Expired => "expired",
                        TimewaitEnd::Killed => "killed",
                    }),
                };
                serde_json::to_writer(&mut *out, &record)?;
                out.write_all(b"\n")
            }
            Format::Text => self.print_text(out, t),
        }
    }

    fn print_text(&mut self, out: &mut impl Write, t: &Teardown) -> io::Result<()> {
        let local = t.local.to_string();
        let remote = t.remote.to_string();
        self.addr_width = self.addr_width.max(local.len()).max(remote.len());
        let w = self.addr_width;
        if !self.header_done {
            self.header_done = true;
            writeln!(
                out,
                "{:<12} {:>7} {:<15} {:<w$}    {:<w$} {:<6} {:<12} {:>8}  PHASES",
                "TIME", "PID", "COMM", "LOCAL", "REMOTE", "SIDE", "CLOSE", "TEARDOWN"
            )?;
        }
        let line = &mut self.line;
        line.clear();
        let time = self
            .clock
            .timestamp(t.end_ns)
            .to_zoned(self.zone.clone())
            .strftime("%H:%M:%S%.3f");
        let (pid, comm) = match &t.owner {
            Some(o) => (o.pid.to_string(), o.comm()),
            None => (String::new(), Cow::Borrowed("")),
        };
        let side = t.side.map_or("-", side_name);
        let total = t.teardown_ns.map_or_else(|| "-".to_owned(), human);
        // Writing into a String cannot fail.
        let _ = write!(
            line,
            "{time:<12} {pid:>7} {comm:<15} {local:<w$} -> {remote:<w$} {side:<6} "
        );
        let close = format!("{:<12}", t.close.name());
        match (self.colour, close_colour(t.close)) {
            (true, Some(colour)) => {
                let _ = write!(line, "{colour}{close}{RESET}");
            }
            _ => line.push_str(&close),
        }
        let _ = write!(line, " {total:>8} ");
        for (phase, ns) in t.phases.iter() {
            // `~`: the boundary between FIN_WAIT2 and TIME_WAIT came from the timer's expiry in
            // jiffies, not from an event.
            let approx =
                t.resolution_ns.is_some() && matches!(phase, Phase::FinWait2 | Phase::TimeWait);
            let _ = write!(
                line,
                " {} {}{}",
                phase.name(),
                if approx { "~" } else { "" },
                human(ns)
            );
        }
        let mut notes = Vec::new();
        if t.timewait_end == Some(TimewaitEnd::Killed) {
            notes.push("timewait killed");
        }
        if !t.complete {
            notes.push("partial");
        }
        if !notes.is_empty() {
            let notes = notes.join(", ");
            if self.colour {
                let _ = write!(line, "  {DIM}({notes}){RESET}");
            } else {
                let _ = write!(line, "  ({notes})");
            }
        }
        line.push('\n');
        out.write_all(line.as_bytes())
    }
}

/// The phases as a JSON object, in the order of [`Phase::ALL`], without building a map.
struct PhasesJson<'a>(&'a Phases);

impl Serialize for PhasesJson<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut map = serializer.serialize_map(None)?;
        for (phase, ns) in self.0.iter() {
            map.serialize_entry(phase.name(), &ns)?;
        }
        map.end()
    }
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::Client => "client",
        Side::Server => "server",
    }
}

fn close_colour(close: CloseKind) -> Option<&'static str> {
    match close {
        CloseKind::Reset | CloseKind::Failed => Some(RED),
        CloseKind::FinTimeout => Some(YELLOW),
        CloseKind::Simultaneous => Some(CYAN),
        CloseKind::Active | CloseKind::Passive => None,
    }
}

/// A duration in the unit that reads best: `850ns`, `532us`, `1.14ms`, `12.3ms`, `300ms`,
/// `2.01s`, `60.2s`, `5m02s`. Three significant digits at most.
pub fn human(ns: u64) -> String {
    let f = ns as f64;
    match ns {
        0..1_000 => format!("{ns}ns"),
        1_000..1_000_000 => format!("{:.0}us", f / 1e3),
        1_000_000..10_000_000 => format!("{:.2}ms", f / 1e6),
        10_000_000..100_000_000 => format!("{:.1}ms", f / 1e6),
        100_000_000..1_000_000_000 => format!("{:.0}ms", f / 1e6),
        1_000_000_000..10_000_000_000 => format!("{:.2}s", f / 1e9),
        10_000_000_000..100_000_000_000 => format!("{:.1}s", f / 1e9),
        _ => {
            let s = ns / 1_000_000_000;
            format!("{}m{:02}s", s / 60, s % 60)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::{Family, Task},
        teardown::Phases,
    };

    const MS: u64 = 1_000_000;

    fn teardown() -> Teardown {
        let mut phases = Phases::default();
        phases.add(Phase::FinWait1, 1_140_000);
        phases.add(Phase::FinWait2, 300 * MS);
        phases.add(Phase::TimeWait, 60_000 * MS);
        Teardown {
            end_ns: 2_000_000_123,
            family: Family::Ipv4,
            local: "127.0.0.1:40000".parse().unwrap(),
            remote: "127.0.0.1:8080".parse().unwrap(),
            side: Some(Side::Client),
            close: CloseKind::Active,
            phases,
            teardown_ns: Some(60_301 * MS),
            lifetime_ns: Some(61_000 * MS),
            complete: true,
            owner: Some(Task::new(42, 43, "curl")),
            resolution_ns: Some(4 * MS),
            timewait_end: Some(TimewaitEnd::Expired),
        }
    }

    #[test]
    fn json_line_follows_the_contract() {
        let mut p = TeardownPrinter::new(
            Format::Json,
            WallClock::with_offset(1_700_000_000_000_000_000),
            false,
        );
        let mut out = Vec::new();
        p.print(&mut out, &teardown()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["type"], "teardown");
        assert_eq!(v["time"], "2023-11-14T22:13:22.000000123Z");
        assert_eq!(v["ts_ns"], 2_000_000_123u64);
        assert_eq!(v["family"], "ipv4");
        assert_eq!(v["laddr"], "127.0.0.1");
        assert_eq!(v["lport"], 40000);
        assert_eq!(v["rport"], 8080);
        assert_eq!(v["side"], "client");
        assert_eq!(v["close"], "active");
        assert_eq!(
            v["phases"],
            serde_json::json!({"FIN_WAIT1": 1_140_000u64, "FIN_WAIT2": 300 * MS, "TIME_WAIT": 60_000 * MS})
        );
        assert_eq!(v["teardown_ns"], 60_301 * MS);
        assert_eq!(v["lifetime_ns"], 61_000 * MS);
        assert_eq!(v["complete"], true);
        assert_eq!(v["pid"], 42);
        assert_eq!(v["comm"], "curl");
        assert_eq!(v["resolution_ns"], 4 * MS);
        assert_eq!(v["timewait_end"], "expired");

        let mut unknown = teardown();
        unknown.owner = None;
        unknown.side = None;
        unknown.lifetime_ns = None;
        unknown.complete = false;
        unknown.resolution_ns = None;
        unknown.timewait_end = None;
        let mut out = Vec::new();
        p.print(&mut out, &unknown).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        for key in [
            "pid",
            "comm",
            "side",
            "lifetime_ns",
            "resolution_ns",
            "timewait_end",
        ] {
            assert!(v[key].is_null(), "{key}: {}", v[key]);
        }
        assert_eq!(v["complete"], false);
    }

    #[test]
    fn text_lines_align_and_colour_only_when_asked() {
        let mut p = TeardownPrinter::new(Format::Text, WallClock::with_offset(0), false);
        let mut out = Vec::new();
        p.print(&mut out, &teardown()).unwrap();
        let mut reset = teardown();
        reset.close = CloseKind::Reset;
        reset.owner = None;
        reset.complete = false;
        p.print(&mut out, &reset).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(!text.contains('\x1b'));
        let col = |line: &str, what: &str| line.find(what).unwrap();
        assert_eq!(col(lines[0], "CLOSE"), col(lines[1], "active"));
        assert_eq!(col(lines[1], "active"), col(lines[2], "reset"));
        assert_eq!(col(lines[0], "REMOTE"), col(lines[1], "127.0.0.1:8080"));
        assert!(lines[1].contains("    42 curl"), "{}", lines[1]);
        assert!(
            lines[1].contains("60.3s  FIN_WAIT1 1.14ms FIN_WAIT2 ~300ms TIME_WAIT ~60.0s"),
            "{}",
            lines[1]
        );
        assert!(lines[2].ends_with("(partial)"), "{}", lines[2]);

        let mut p = TeardownPrinter::new(Format::Text, WallClock::with_offset(0), true);
        let mut out = Vec::new();
        p.print(&mut out, &reset).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("\x1b[31mreset"), "{text}");
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(850), "850ns");
        assert_eq!(human(532_400), "532us");
        assert_eq!(human(1_140_000), "1.14ms");
        assert_eq!(human(12_340_000), "12.3ms");
        assert_eq!(human(300_400_000), "300ms");
        assert_eq!(human(2_010_000_000), "2.01s");
        assert_eq!(human(60_190_000_000), "60.2s");
        assert_eq!(human(302_000_000_000), "5m02s");
    }
}
