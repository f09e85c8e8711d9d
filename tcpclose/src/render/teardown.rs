//! One line per finished connection: the default output.

use std::{
    borrow::Cow,
    fmt::Write as _,
    io::{self, Write},
};

use jiff::{Timestamp, tz::TimeZone};

use super::{
    AddressColumns, Format, SharedColumns, WallClock,
    ansi::{CYAN, DIM, RED, RESET, YELLOW},
    json::{TimeText, json_ends, json_escaped, json_placement, json_str, json_u64},
};
use crate::{
    cgroups::{CgroupInfo, Cgroups},
    reset_reasons::{ResetReasons, spoken},
    teardown::{CloseKind, Phase, Reset, ResetBy, Side, Teardown, TimewaitEnd},
};

/// Writes [`Teardown`] records as aligned text (optionally coloured) or JSON lines.
pub struct TeardownPrinter {
    format: Format,
    colour: bool,
    clock: WallClock,
    zone: TimeZone,
    columns: AddressColumns,
    /// Reused per line.
    line: String,
    /// Reused per JSON line.
    json: Vec<u8>,
    time: TimeText,
    cgroups: Cgroups,
    reasons: ResetReasons,
}

impl TeardownPrinter {
    /// `colour` adds ANSI colours to text output (only ever for a terminal).
    pub fn new(format: Format, clock: WallClock, colour: bool) -> Self {
        Self {
            format,
            colour,
            clock,
            zone: TimeZone::system(),
            columns: AddressColumns::new(Some(|w| {
                format!(
                    "{:<12} {:>7} {:<15} {:<w$}    {:<w$} {:<6} {:<12} {:>8}  PHASES",
                    "TIME", "PID", "COMM", "LOCAL", "REMOTE", "SIDE", "CLOSE", "TEARDOWN"
                )
            })),
            line: String::new(),
            json: Vec::new(),
            time: TimeText::default(),
            cgroups: Cgroups::none(),
            reasons: ResetReasons::default(),
        }
    }

    /// Names the kernel's reasons for the resets it sends with `reasons`.
    pub fn with_reset_reasons(mut self, reasons: ResetReasons) -> Self {
        self.set_reset_reasons(reasons);
        self
    }

    /// See [`Self::with_reset_reasons`].
    pub fn set_reset_reasons(&mut self, reasons: ResetReasons) {
        self.reasons = reasons;
    }

    /// Names the sockets' cgroups, containers and pods with `cgroups`.
    pub fn with_cgroups(mut self, cgroups: Cgroups) -> Self {
        self.cgroups = cgroups;
        self
    }

    /// Its columns, for the alerts printed among its lines (see
    /// [`AlertPrinter::among`](super::AlertPrinter::among)).
    pub fn alert_columns(&self) -> SharedColumns {
        SharedColumns(self.columns.clone())
    }

    pub fn print(&mut self, out: &mut impl Write, t: &Teardown) -> io::Result<()> {
        match self.format {
            Format::Json => {
                let line = &mut self.json;
                line.clear();
                let at = self.clock.timestamp(t.end_ns);
                write_json(line, &mut self.time, at, t, &self.cgroups, &self.reasons)?;
                out.write_all(line)
            }
            Format::Text => self.print_text(out, t),
        }
    }

    fn print_text(&mut self, out: &mut impl Write, t: &Teardown) -> io::Result<()> {
        let local = t.local.to_string();
        let remote = t.remote.to_string();
        let w = self.columns.start_line(out, &local, &remote)?;
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
            match t.fin_retransmits.get(phase) {
                0 => {}
                1 => line.push_str(" (FIN retransmitted once)"),
                n => {
                    let _ = write!(line, " (FIN retransmitted {n} times)");
                }
            }
        }
        if let Some(reset) = &t.reset {
            let _ = write!(line, "  {}", reset_text(reset, &self.reasons));
        }
        let mut notes = Vec::new();
        let container = t.placement.cgroup().and_then(|id| self.cgroups.info(id));
        let container = container.as_deref().and_then(CgroupInfo::container_name);
        if let Some(container) = container {
            let _ = write!(line, "  [{container}]");
        }
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

/// One teardown as a JSON line (the record's contract: field names and order, `null` for what is
/// unknown). Written by hand rather than through serde: at full churn this is the tracer's
/// hottest output, and only `comm` needs escaping.
fn write_json(
    line: &mut Vec<u8>,
    time: &mut TimeText,
    at: Timestamp,
    t: &Teardown,
    cgroups: &Cgroups,
    reasons: &ResetReasons,
) -> io::Result<()> {
    line.extend_from_slice(b"{\"type\":\"teardown\",\"time\":\"");
    time.write(line, at)?;
    line.extend_from_slice(b"\",\"ts_ns\":");
    json_u64(line, Some(t.end_ns));
    json_ends(line, t.family, t.local, t.remote)?;
    line.extend_from_slice(b",\"side\":");
    json_str(line, t.side.map(side_name));
    line.extend_from_slice(b",\"close\":");
    json_str(line, Some(t.close.name()));
    line.extend_from_slice(b",\"phases\":{");
    for (i, (phase, ns)) in t.phases.iter().enumerate() {
        if i > 0 {
            line.push(b',');
        }
        json_str(line, Some(phase.name()));
        line.push(b':');
        json_u64(line, Some(ns));
    }
    line.extend_from_slice(b"},\"teardown_ns\":");
    json_u64(line, t.teardown_ns);
    line.extend_from_slice(b",\"lifetime_ns\":");
    json_u64(line, t.lifetime_ns);
    line.extend_from_slice(if t.complete {
        b",\"complete\":true,\"pid\":"
    } else {
        b",\"complete\":false,\"pid\":"
    });
    json_u64(line, t.owner.map(|o| u64::from(o.pid)));
    line.extend_from_slice(b",\"comm\":");
    match &t.owner {
        // Any bytes a task may name itself: escaped as JSON strings must be.
        Some(owner) => json_escaped(line, &owner.comm())?,
        None => line.extend_from_slice(b"null"),
    }
    line.extend_from_slice(b",\"resolution_ns\":");
    json_u64(line, t.resolution_ns);
    line.extend_from_slice(b",\"timewait_end\":");
    json_str(
        line,
        t.timewait_end.map(|end| match end {
            TimewaitEnd::Expired => "expired",
            TimewaitEnd::Killed => "killed",
        }),
    );
    line.extend_from_slice(b",\"reset\":");
    match &t.reset {
        None => line.extend_from_slice(b"null"),
        Some(reset) => {
            line.extend_from_slice(b"{\"by\":");
            json_str(line, Some(reset.by.name()));
            line.extend_from_slice(b",\"reason\":");
            json_str(line, reason_name(reset, reasons).as_deref());
            line.push(b'}');
        }
    }
    line.extend_from_slice(b",\"fin_retransmits\":{");
    for (i, (phase, n)) in t.fin_retransmits.iter().enumerate() {
        if i > 0 {
            line.push(b',');
        }
        json_str(line, Some(phase.name()));
        line.push(b':');
        json_u64(line, Some(u64::from(n)));
    }
    line.push(b'}');
    json_placement(line, t.placement, cgroups)?;
    line.extend_from_slice(b"}\n");
    Ok(())
}

/// The kernel's reason for a reset, by its name in this kernel (its number where the kernel
/// names none by that value).
fn reason_name<'a>(reset: &Reset, reasons: &'a ResetReasons) -> Option<Cow<'a, str>> {
    let value = reset.reason?;
    Some(match reasons.name(value) {
        Some(name) => Cow::Borrowed(name),
        None => Cow::Owned(value.to_string()),
    })
}

/// A reset as the text line says it: `reset by peer`, `reset (abort on close)`, `reset sent`.
fn reset_text(reset: &Reset, reasons: &ResetReasons) -> String {
    match (reset.by, reason_name(reset, reasons)) {
        (ResetBy::Peer, _) => "reset by peer".to_owned(),
        (ResetBy::Local, Some(reason)) => format!("reset ({})", spoken(&reason)),
        (ResetBy::Local, None) => "reset sent".to_owned(),
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
        let phases = [
            (Phase::FinWait1, 1_140_000),
            (Phase::FinWait2, 300 * MS),
            (Phase::TimeWait, 60_000 * MS),
        ];
        Teardown {
            end_ns: 2_000_000_123,
            local: "127.0.0.1:40000".parse().unwrap(),
            remote: "127.0.0.1:8080".parse().unwrap(),
            side: Some(Side::Client),
            teardown_ns: Some(60_301 * MS),
            lifetime_ns: Some(61_000 * MS),
            owner: Some(Task::new(42, 43, "curl")),
            resolution_ns: Some(4 * MS),
            timewait_end: Some(TimewaitEnd::Expired),
            ..Teardown::sample(CloseKind::Active, &phases)
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
        assert_eq!(v["reset"], serde_json::Value::Null);
        assert_eq!(v["fin_retransmits"], serde_json::json!({}));

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

    /// The encoding written by hand is the one serde would write, byte for byte: same fields,
    /// same order, same escaping.
    #[test]
    fn json_line_is_what_serde_would_write() {
        use serde::Serialize;

        #[derive(Serialize)]
        struct Oracle<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            time: Timestamp,
            ts_ns: u64,
            family: &'static str,
            laddr: std::net::IpAddr,
            lport: u16,
            raddr: std::net::IpAddr,
            rport: u16,
            side: Option<&'static str>,
            close: &'static str,
            phases: serde_json::Map<String, serde_json::Value>,
            teardown_ns: Option<u64>,
            lifetime_ns: Option<u64>,
            complete: bool,
            pid: Option<u32>,
            comm: Option<Cow<'a, str>>,
            resolution_ns: Option<u64>,
            timewait_end: Option<&'static str>,
            reset: Option<OracleReset>,
            fin_retransmits: serde_json::Map<String, serde_json::Value>,
            #[serde(flatten)]
            placement: crate::render::PlacementRecord,
        }
        #[derive(Serialize)]
        struct OracleReset {
            by: &'static str,
            reason: Option<String>,
        }
        let reasons = ResetReasons::from_enumerators([("SK_RST_REASON_TCP_ABORT_ON_CLOSE", 11)]);
        let clock = WallClock::with_offset(1_700_000_000_000_000_000);
        let cgroups = crate::cgroups::Cgroups::fixed(&[
            (
                7,
                "/kubepods/besteffort/pod3a1b2c3d-1111-2222-3333-444455556666/\
                 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            ),
            (8, "/odd \"name\"\\\u{1}/é"),
        ]);
        let oracle = |t: &Teardown| {
            let mut line = serde_json::to_vec(&Oracle {
                kind: "teardown",
                time: clock.timestamp(t.end_ns),
                ts_ns: t.end_ns,
                family: t.family.name(),
                laddr: t.local.ip(),
                lport: t.local.port(),
                raddr: t.remote.ip(),
                rport: t.remote.port(),
                side: t.side.map(side_name),
                close: t.close.name(),
                phases: t
                    .phases
                    .iter()
                    .map(|(p, ns)| (p.name().to_owned(), ns.into()))
                    .collect(),
                teardown_ns: t.teardown_ns,
                lifetime_ns: t.lifetime_ns,
                complete: t.complete,
                pid: t.owner.map(|o| o.pid),
                comm: t.owner.as_ref().map(|o| o.comm()),
                resolution_ns: t.resolution_ns,
                timewait_end: t.timewait_end.map(|e| match e {
                    TimewaitEnd::Expired => "expired",
                    TimewaitEnd::Killed => "killed",
                }),
                reset: t.reset.map(|r| OracleReset {
                    by: r.by.name(),
                    reason: r
                        .reason
                        .map(|v| reasons.name(v).map_or_else(|| v.to_string(), str::to_owned)),
                }),
                fin_retransmits: t
                    .fin_retransmits
                    .iter()
                    .map(|(p, n)| (p.name().to_owned(), n.into()))
                    .collect(),
                placement: crate::render::PlacementRecord::new(t.placement, &cgroups),
            })
            .unwrap();
            line.push(b'\n');
            line
        };
        let mut cases = vec![teardown()];
        let mut odd = teardown();
        odd.owner = Some(Task::new(7, 8, "a\"b\\c\u{1}\u{7f}é"));
        odd.local = "[2001:db8::1]:443".parse().unwrap();
        odd.remote = "[::ffff:10.0.0.1]:5".parse().unwrap();
        odd.family = Family::Ipv6;
        odd.end_ns = 5 * 1_000_000_000;
        odd.phases = Phases::default();
        odd.placement = crate::event::Placement {
            netns: 4_026_531_840,
            cgroup: 8,
        };
        cases.push(odd);
        let mut contained = teardown();
        contained.placement = crate::event::Placement {
            netns: 4_026_532_999,
            cgroup: 7,
        };
        cases.push(contained);
        let mut bare = teardown();
        bare.owner = None;
        bare.side = None;
        bare.teardown_ns = None;
        bare.lifetime_ns = None;
        bare.resolution_ns = None;
        bare.timewait_end = Some(TimewaitEnd::Killed);
        bare.close = CloseKind::FinTimeout;
        bare.end_ns = 999_999_999_999;
        cases.push(bare);
        for (by, reason) in [
            (ResetBy::Local, Some(11)),
            (ResetBy::Local, Some(12)),
            (ResetBy::Local, None),
            (ResetBy::Peer, None),
        ] {
            let mut reset = teardown();
            reset.close = CloseKind::Reset;
            reset.reset = Some(Reset { by, reason });
            reset
                .fin_retransmits
                .count(crate::event::TcpState::FinWait1);
            reset.fin_retransmits.count(crate::event::TcpState::LastAck);
            cases.push(reset);
        }
        let mut p = TeardownPrinter::new(Format::Json, clock, false)
            .with_cgroups(cgroups.clone())
            .with_reset_reasons(reasons.clone());
        for t in &cases {
            let mut out = Vec::new();
            p.print(&mut out, t).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&oracle(t))
            );
        }
    }

    #[test]
    fn time_text_is_jiffs() {
        let mut time = TimeText::default();
        // Same second, other second, whole seconds, every count of trailing zeros.
        let mut ns: i128 = 1_700_000_000_000_000_000;
        for step in [
            0,
            1,
            10,
            120,
            1_000,
            45_000,
            600_000,
            1_000_000,
            999_999_999,
            1,
            7,
        ] {
            ns += step;
            for extra in [0, 100_000_000, 120_000_000, 123_456_789, 999_000_000] {
                let at = Timestamp::from_nanosecond(ns + extra).unwrap();
                let mut line = Vec::new();
                time.write(&mut line, at).unwrap();
                assert_eq!(String::from_utf8(line).unwrap(), at.to_string());
            }
        }
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
    fn text_lines_say_who_reset_and_which_fins_were_retransmitted() {
        let reasons = ResetReasons::from_enumerators([("SK_RST_REASON_TCP_ABORT_ON_CLOSE", 11)]);
        let mut p = TeardownPrinter::new(Format::Text, WallClock::with_offset(0), false)
            .with_reset_reasons(reasons);
        let line = |p: &mut TeardownPrinter, t: &Teardown| {
            let mut out = Vec::new();
            p.print(&mut out, t).unwrap();
            String::from_utf8(out)
                .unwrap()
                .lines()
                .last()
                .unwrap()
                .to_owned()
        };
        let mut t = teardown();
        for _ in 0..4 {
            t.fin_retransmits.count(crate::event::TcpState::FinWait1);
        }
        let text = line(&mut p, &t);
        assert!(
            text.contains("FIN_WAIT1 1.14ms (FIN retransmitted 4 times) FIN_WAIT2"),
            "{text}"
        );
        t.fin_retransmits = Default::default();
        t.fin_retransmits.count(crate::event::TcpState::FinWait1);
        assert!(line(&mut p, &t).contains("(FIN retransmitted once)"));
        for (reset, said) in [
            (
                Reset {
                    by: ResetBy::Peer,
                    reason: None,
                },
                "reset by peer",
            ),
            (
                Reset {
                    by: ResetBy::Local,
                    reason: Some(11),
                },
                "reset (abort on close)",
            ),
            (
                Reset {
                    by: ResetBy::Local,
                    reason: None,
                },
                "reset sent",
            ),
        ] {
            let mut t = teardown();
            t.close = CloseKind::Reset;
            t.reset = Some(reset);
            let text = line(&mut p, &t);
            assert!(
                text.ends_with(&format!("TIME_WAIT ~60.0s  {said}")),
                "{text}"
            );
        }
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
