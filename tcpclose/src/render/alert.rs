//! Lines about hung teardowns: a socket that has stayed too long in a teardown state (`hung`),
//! and the same socket when it finally moves on (`resolved`).

use std::{
    borrow::Cow,
    io::{self, Write},
    net::IpAddr,
};

use jiff::{Timestamp, tz::TimeZone};
use serde::Serialize;

use super::{
    AddressColumns, Format, SharedColumns, WallClock,
    ansi::{BOLD_RED, GREEN, RESET, YELLOW},
    human,
};
use crate::{
    cgroups::{CgroupInfo, Cgroups},
    event::{Placement, Task},
    hang_check::Waiting,
    hung::{Alert, AlertKind, Holder, Leak},
};

/// An alert with what tcpclose found out about its owner.
#[derive(Clone, Debug)]
pub struct OwnedAlert {
    pub alert: Alert,
    /// Processes holding the socket now (from sock_diag and `/proc/*/fd`); empty when the
    /// socket has no file (an orphan, a timewait socket) or the lookup found none.
    pub holders: Vec<Holder>,
    /// What the socket waited on at its last check (full sockets whose hang was checked).
    pub waiting: Option<Waiting>,
}

impl OwnedAlert {
    /// The process to name, as a holder: see [`OwnedAlert::owner`].
    pub fn holder(&self) -> Option<Holder> {
        self.owner().map(|(pid, comm)| Holder {
            pid,
            comm: comm.into_owned(),
        })
    }

    /// The process to name: the first holder found now, else the task of the last system call.
    fn owner(&self) -> Option<(u32, Cow<'_, str>)> {
        match self.holders.first() {
            Some(h) => Some((h.pid, Cow::Borrowed(h.comm.as_str()))),
            None => self.alert.owner.as_ref().map(|o: &Task| (o.pid, o.comm())),
        }
    }
}

/// What a hung socket waits on, for its text line: `  recv-q 1001, send-q 0`, then the
/// retransmissions and a zero window when there are.
fn waiting_text(w: &Waiting) -> String {
    let mut text = format!("  recv-q {}, send-q {}", w.recv_queue, w.send_queue);
    if w.retransmits > 0 {
        text.push_str(&format!(", {} retransmits", w.retransmits));
    }
    if w.zero_window {
        text.push_str(", peer window 0");
    }
    text
}

#[derive(Serialize)]
struct AlertRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    time: Timestamp,
    ts_ns: u64,
    state: &'static str,
    /// Wall-clock time the socket entered `state`.
    since: Timestamp,
    since_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    age_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stuck_ns: Option<u64>,
    /// The socket was already in `state` when tcpclose first saw it: the age is at least this.
    age_is_lower_bound: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    again: Option<bool>,
    family: &'static str,
    laddr: IpAddr,
    lport: u16,
    raddr: IpAddr,
    rport: u16,
    pid: Option<u32>,
    comm: Option<Cow<'a, str>>,
    /// Every process holding the socket now (a socket may be shared after fork).
    holders: &'a [Holder],
    /// What it waits on, at its last check (`null`: not checked, or a timewait socket).
    recv_queue: Option<u32>,
    send_queue: Option<u32>,
    retransmits: Option<u8>,
    zero_window: Option<bool>,
    #[serde(flatten)]
    placement: PlacementRecord,
}

/// Where a socket lives, as JSON records name it: `netns`, `cgroup`, `container_id`, `pod_uid`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PlacementRecord {
    pub netns: Option<u32>,
    pub cgroup: Option<String>,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
}

impl PlacementRecord {
    pub fn new(placement: Placement, cgroups: &Cgroups) -> Self {
        let info = placement.cgroup().and_then(|id| cgroups.info(id));
        Self::of(placement.netns(), info.as_deref())
    }

    pub fn of(netns: Option<u32>, info: Option<&CgroupInfo>) -> Self {
        Self {
            netns,
            cgroup: info.map(|i| i.path.clone()),
            container_id: info.and_then(|i| i.container_id.clone()),
            pod_uid: info.and_then(|i| i.pod_uid.clone()),
        }
    }
}

/// Writes [`OwnedAlert`]s as text lines that stand out, or as JSON lines.
pub struct AlertPrinter {
    format: Format,
    colour: bool,
    clock: WallClock,
    zone: TimeZone,
    cgroups: Cgroups,
    /// The address columns, shared with the teardown lines printed among the alerts.
    columns: AddressColumns,
}

impl AlertPrinter {
    pub fn new(format: Format, clock: WallClock, colour: bool) -> Self {
        Self {
            format,
            colour,
            clock,
            zone: TimeZone::system(),
            cgroups: Cgroups::none(),
            columns: AddressColumns::new(None),
        }
    }

    /// Prints its lines among another printer's, in its columns and under its header.
    pub fn among(mut self, columns: SharedColumns) -> Self {
        self.columns = columns.0;
        self
    }

    /// Names the sockets' cgroups, containers and pods with `cgroups`.
    pub fn with_cgroups(mut self, cgroups: Cgroups) -> Self {
        self.cgroups = cgroups;
        self
    }

    /// The handle the printer names cgroups with.
    pub fn cgroups(&self) -> &Cgroups {
        &self.cgroups
    }

    /// Prints the leak view: per state, the processes (or the groups of `group_by`: containers,
    /// pods, cgroups, namespaces) with the most sockets hung now and the most that became hung
    /// during the last `interval_ns`. Text output skips an empty view.
    pub fn print_leaks(
        &self,
        out: &mut impl Write,
        leaks: &[Leak],
        group_by: Option<&'static str>,
        now_ns: u64,
        interval_ns: u64,
    ) -> io::Result<()> {
        match self.format {
            Format::Json => {
                #[derive(Serialize)]
                struct Row<'a> {
                    #[serde(flatten)]
                    leak: &'a Leak,
                    #[serde(flatten)]
                    placement: Option<PlacementRecord>,
                }
                #[derive(Serialize)]
                struct Record<'a> {
                    #[serde(rename = "type")]
                    kind: &'static str,
                    time: Timestamp,
                    ts_ns: u64,
                    interval_ns: u64,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    group_by: Option<&'static str>,
                    leaks: Vec<Row<'a>>,
                }
                let leaks = leaks
                    .iter()
                    .map(|leak| Row {
                        leak,
                        placement: leak
                            .placement
                            .map(|p| PlacementRecord::new(p, &self.cgroups)),
                    })
                    .collect();
                serde_json::to_writer(
                    &mut *out,
                    &Record {
                        kind: "leaks",
                        time: self.clock.timestamp(now_ns),
                        ts_ns: now_ns,
                        interval_ns,
                        group_by,
                        leaks,
                    },
                )?;
                out.write_all(b"\n")
            }
            Format::Text if leaks.is_empty() => Ok(()),
            Format::Text if group_by.is_some() => {
                let by = group_by.unwrap_or_default();
                writeln!(
                    out,
                    "\n-- hung sockets by {by}: now, and new in the last {} --",
                    human(interval_ns)
                )?;
                let width = leaks
                    .iter()
                    .map(|l| l.group.as_deref().map_or(1, str::len))
                    .max()
                    .unwrap_or(0)
                    .max(by.len());
                writeln!(
                    out,
                    "{:<11} {:<width$} {:>8} {:>8}",
                    "STATE",
                    by.to_ascii_uppercase(),
                    "HUNG",
                    "NEW"
                )?;
                for l in leaks {
                    writeln!(
                        out,
                        "{:<11} {:<width$} {:>8} {:>8}",
                        l.state,
                        l.group.as_deref().unwrap_or("?"),
                        l.hung_now,
                        l.new
                    )?;
                }
                Ok(())
            }
            Format::Text => {
                writeln!(
                    out,
                    "\n-- hung sockets by process: now, and new in the last {} --",
                    human(interval_ns)
                )?;
                // A CONTAINER column only when a line's sockets are in a container or pod.
                let containers: Vec<Option<String>> = leaks
                    .iter()
                    .map(|l| {
                        let info = l.placement?.cgroup().and_then(|id| self.cgroups.info(id))?;
                        info.container_name().map(str::to_owned)
                    })
                    .collect();
                let column = containers.iter().any(Option::is_some);
                // RECV-Q: bytes its hung sockets hold unread, as their checks found them.
                write!(
                    out,
                    "{:<11} {:>7} {:<15} {:>8} {:>8} {:>10}",
                    "STATE", "PID", "COMM", "HUNG", "NEW", "RECV-Q"
                )?;
                writeln!(out, "{}", if column { "  CONTAINER" } else { "" })?;
                for (l, container) in leaks.iter().zip(&containers) {
                    let pid = l.pid.map_or_else(|| "?".to_owned(), |p| p.to_string());
                    write!(
                        out,
                        "{:<11} {pid:>7} {:<15} {:>8} {:>8} {:>10}",
                        l.state,
                        l.comm.as_deref().unwrap_or("?"),
                        l.hung_now,
                        l.new,
                        l.recv_queue.unwrap_or(0)
                    )?;
                    match container {
                        Some(name) => writeln!(out, "  {name}")?,
                        None if column => writeln!(out, "  -")?,
                        None => writeln!(out)?,
                    }
                }
                Ok(())
            }
        }
    }

    pub fn print(&self, out: &mut impl Write, a: &OwnedAlert) -> io::Result<()> {
        let alert = &a.alert;
        let owner = a.owner();
        match self.format {
            Format::Json => {
                let (kind, age_ns, stuck_ns, again) = match alert.kind {
                    AlertKind::Hung { age_ns, again } => ("hung", Some(age_ns), None, Some(again)),
                    AlertKind::Resolved { stuck_ns } => ("resolved", None, Some(stuck_ns), None),
                    AlertKind::Evicted { age_ns } => ("evicted", Some(age_ns), None, None),
                };
                let record = AlertRecord {
                    kind,
                    time: self.clock.timestamp(alert.ts_ns),
                    ts_ns: alert.ts_ns,
                    state: alert.phase.name(),
                    since: self.clock.timestamp(alert.since_ns),
                    since_ns: alert.since_ns,
                    age_ns,
                    stuck_ns,
                    age_is_lower_bound: alert.since_is_lower_bound,
                    again,
                    family: alert.family.name(),
                    laddr: alert.local.ip(),
                    lport: alert.local.port(),
                    raddr: alert.remote.ip(),
                    rport: alert.remote.port(),
                    pid: owner.as_ref().map(|o| o.0),
                    comm: owner.map(|o| o.1),
                    holders: &a.holders,
                    recv_queue: a.waiting.map(|w| w.recv_queue),
                    send_queue: a.waiting.map(|w| w.send_queue),
                    retransmits: a.waiting.map(|w| w.retransmits),
                    zero_window: a.waiting.map(|w| w.zero_window),
                    placement: PlacementRecord::new(alert.placement, &self.cgroups),
                };
                serde_json::to_writer(&mut *out, &record)?;
                out.write_all(b"\n")
            }
            Format::Text => {
                let time = self
                    .clock
                    .timestamp(alert.ts_ns)
                    .to_zoned(self.zone.clone())
                    .strftime("%H:%M:%S%.3f");
                let (pid, comm) = match owner {
                    Some((pid, comm)) => (pid.to_string(), comm),
                    None => ("?".to_owned(), Cow::Borrowed("?")),
                };
                let at_least = if alert.since_is_lower_bound { ">" } else { "" };
                let (label, colour, what) = match alert.kind {
                    AlertKind::Hung { age_ns, again } => (
                        if again { "STILL HUNG" } else { "HUNG" },
                        BOLD_RED,
                        format!("in {} for {at_least}{}", alert.phase.name(), human(age_ns)),
                    ),
                    AlertKind::Resolved { stuck_ns } => (
                        "RESOLVED",
                        GREEN,
                        format!(
                            "left {} after {at_least}{}",
                            alert.phase.name(),
                            human(stuck_ns)
                        ),
                    ),
                    AlertKind::Evicted { age_ns } => (
                        "EVICTED",
                        YELLOW,
                        format!(
                            "no longer followed, in {} for {at_least}{} (table full: --max-sockets)",
                            alert.phase.name(),
                            human(age_ns)
                        ),
                    ),
                };
                let label = format!("{label:<10}");
                let label = if self.colour {
                    format!("{colour}{label}{RESET}")
                } else {
                    label
                };
                let mut others = a.waiting.as_ref().map(waiting_text).unwrap_or_default();
                if a.holders.len() > 1 {
                    others.push_str(&format!(" (+{} more processes)", a.holders.len() - 1));
                }
                let info = alert
                    .placement
                    .cgroup()
                    .and_then(|id| self.cgroups.info(id));
                if let Some(container) = info.as_deref().and_then(CgroupInfo::container_name) {
                    others.push_str(&format!("  [{container}]"));
                }
                let (local, remote) = (alert.local.to_string(), alert.remote.to_string());
                let w = self.columns.start_line(out, &local, &remote)?;
                writeln!(
                    out,
                    "{time:<12} {pid:>7} {comm:<15} {local:<w$} -> {remote:<w$}  {label} {what}{others}"
                )
            }
        }
    }
}

#[cfg(test)]
impl OwnedAlert {
    /// For tests: a CLOSE_WAIT socket 127.0.0.1:8080 <- 127.0.0.1:40000, stuck since 1 s,
    /// reported at 5 s, held by `leaky` (pid 42), not checked.
    pub(crate) fn sample(kind: AlertKind) -> Self {
        Self {
            alert: Alert {
                kind,
                phase: crate::teardown::Phase::CloseWait,
                ts_ns: 5_000_000_000,
                since_ns: 1_000_000_000,
                since_is_lower_bound: false,
                family: crate::event::Family::Ipv4,
                local: "127.0.0.1:8080".parse().unwrap(),
                remote: "127.0.0.1:40000".parse().unwrap(),
                owner: None,
                key: crate::hung::SocketKey::Full(1),
                placement: crate::event::Placement::default(),
            },
            holders: vec![Holder {
                pid: 42,
                comm: "leaky".into(),
            }],
            waiting: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::teardown::Phase;

    const MS: u64 = 1_000_000;

    fn alert(kind: AlertKind) -> OwnedAlert {
        OwnedAlert::sample(kind)
    }

    /// The per-process leak view names each line's container, in text and in JSON, only when
    /// its sockets are in one.
    #[test]
    fn leak_lines_say_where_their_sockets_are() {
        const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let cgroups = Cgroups::fixed(&[
            (7, &*format!("/system.slice/docker-{ID}.scope")),
            (8, "/user.slice"),
        ]);
        let mut view = crate::hung::LeakView::default();
        for (cgroup, pid) in [(7, 42), (7, 42), (8, 43)] {
            let mut a = alert(AlertKind::Hung {
                age_ns: MS,
                again: false,
            });
            a.alert.placement = crate::event::Placement { netns: 9, cgroup };
            a.holders[0].pid = pid;
            view.observe(&a.alert, a.holder().as_ref());
        }
        let leaks = view.report(10);
        let printer = |format| {
            AlertPrinter::new(format, WallClock::with_offset(0), false)
                .with_cgroups(cgroups.clone())
        };
        let mut text = Vec::new();
        printer(Format::Text)
            .print_leaks(&mut text, &leaks, None, 10 * MS, 10 * MS)
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        // Set apart from what came before by an empty line, as the distributions are.
        let lines: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(text.lines().next(), Some(""), "{text}");
        assert!(lines[1].ends_with("RECV-Q  CONTAINER"), "{text}");
        assert!(
            lines[2].contains(" 42 ") && lines[2].ends_with("  0123456789ab"),
            "{text}"
        );
        assert!(
            lines[3].contains(" 43 ") && lines[3].ends_with("  -"),
            "{text}"
        );

        let mut json = Vec::new();
        printer(Format::Json)
            .print_leaks(&mut json, &leaks, None, 10 * MS, 10 * MS)
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let first = &json["leaks"][0];
        assert_eq!(first["pid"], 42, "{json}");
        assert_eq!(first["hung_now"], 2, "{json}");
        assert_eq!(first["netns"], 9, "{json}");
        assert_eq!(first["container_id"], ID, "{json}");
        assert_eq!(
            first["cgroup"],
            format!("/system.slice/docker-{ID}.scope"),
            "{json}"
        );
        assert_eq!(first["pod_uid"], serde_json::Value::Null, "{json}");
        assert_eq!(json["leaks"][1]["cgroup"], "/user.slice", "{json}");
        assert_eq!(
            json["leaks"][1]["container_id"],
            serde_json::Value::Null,
            "{json}"
        );
    }

    #[test]
    fn json_records_follow_the_contract() {
        let p = AlertPrinter::new(Format::Json, WallClock::with_offset(0), false);
        let mut out = Vec::new();
        p.print(
            &mut out,
            &alert(AlertKind::Hung {
                age_ns: 4_000 * MS,
                again: false,
            }),
        )
        .unwrap();
        p.print(&mut out, &alert(AlertKind::Resolved { stuck_ns: 9 * MS }))
            .unwrap();
        p.print(&mut out, &alert(AlertKind::Evicted { age_ns: 7 * MS }))
            .unwrap();
        let lines: Vec<serde_json::Value> = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        let hung = &lines[0];
        assert_eq!(hung["type"], "hung");
        assert_eq!(hung["state"], "CLOSE_WAIT");
        assert_eq!(hung["since"], "1970-01-01T00:00:01Z");
        assert_eq!(hung["age_ns"], 4_000 * MS);
        assert_eq!(hung["age_is_lower_bound"], false);
        assert_eq!(hung["pid"], 42);
        assert_eq!(hung["comm"], "leaky");
        assert_eq!(hung["lport"], 8080);
        assert_eq!(hung["raddr"], "127.0.0.1");
        assert_eq!(hung["holders"][0]["pid"], 42);
        let resolved = &lines[1];
        assert_eq!(resolved["type"], "resolved");
        assert_eq!(resolved["stuck_ns"], 9 * MS);
        assert!(resolved.get("age_ns").is_none());
        let evicted = &lines[2];
        assert_eq!(evicted["type"], "evicted");
        assert_eq!(evicted["age_ns"], 7 * MS);
        assert_eq!(evicted["state"], "CLOSE_WAIT");
        assert!(evicted.get("stuck_ns").is_none());
    }

    /// What a checked hung socket waits on: in the text line and in the JSON record, `null`
    /// where it was not checked.
    #[test]
    fn a_checked_hang_says_what_the_socket_waits_on() {
        let mut a = alert(AlertKind::Hung {
            age_ns: 4_000 * MS,
            again: false,
        });
        a.waiting = Some(Waiting {
            recv_queue: 1001,
            send_queue: 5,
            retransmits: 2,
            zero_window: true,
        });
        let printed = |format, a: &OwnedAlert| {
            let mut out = Vec::new();
            AlertPrinter::new(format, WallClock::with_offset(0), false)
                .print(&mut out, a)
                .unwrap();
            String::from_utf8(out).unwrap()
        };
        let text = printed(Format::Text, &a);
        assert!(
            text.contains(
                "in CLOSE_WAIT for 4.00s  recv-q 1001, send-q 5, 2 retransmits, peer window 0"
            ),
            "{text}"
        );
        let json: serde_json::Value = serde_json::from_str(&printed(Format::Json, &a)).unwrap();
        assert_eq!(json["recv_queue"], 1001, "{json}");
        assert_eq!(json["send_queue"], 5, "{json}");
        assert_eq!(json["retransmits"], 2, "{json}");
        assert_eq!(json["zero_window"], true, "{json}");
        a.waiting = None;
        let json: serde_json::Value = serde_json::from_str(&printed(Format::Json, &a)).unwrap();
        assert!(json["recv_queue"].is_null(), "{json}");
    }

    #[test]
    fn text_stands_out_and_names_the_owner() {
        let p = AlertPrinter::new(Format::Text, WallClock::with_offset(0), true);
        let mut out = Vec::new();
        let mut a = alert(AlertKind::Hung {
            age_ns: 4_000 * MS,
            again: false,
        });
        a.alert.since_is_lower_bound = true;
        p.print(&mut out, &a).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("42 leaky"), "{text}");
        assert!(
            !text.contains("recv-q"),
            "not checked: nothing said: {text}"
        );
        assert!(text.contains("\x1b[1;31mHUNG"), "{text}");
        assert!(text.contains("in CLOSE_WAIT for >4.00s"), "{text}");
        let mut out = Vec::new();
        p.print(&mut out, &alert(AlertKind::Evicted { age_ns: 4_000 * MS }))
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("EVICTED"), "{text}");
        assert!(
            text.contains(
                "no longer followed, in CLOSE_WAIT for 4.00s (table full: --max-sockets)"
            ),
            "{text}"
        );
    }

    /// A HUNG line's addresses line up with the teardown lines printed among them, however wide
    /// an earlier line (IPv6) made the columns, and the header comes first when a HUNG line does.
    #[test]
    fn alert_lines_share_the_teardown_lines_address_columns() {
        use crate::{
            render::TeardownPrinter,
            teardown::{CloseKind, Teardown},
        };
        let mut teardowns = TeardownPrinter::new(Format::Text, WallClock::with_offset(0), false);
        let alerts = AlertPrinter::new(Format::Text, WallClock::with_offset(0), false)
            .among(teardowns.alert_columns());
        let columns = |line: &str| {
            let arrow = line
                .find(" -> ")
                .unwrap_or_else(|| panic!("no arrow: {line:?}"));
            let after_remote = arrow + 4 + line[arrow + 4..].find(' ').unwrap_or(0);
            let next = after_remote + line[after_remote..].find(|c| c != ' ').unwrap_or(0);
            (arrow, next)
        };
        let mut out = Vec::new();
        alerts
            .print(
                &mut out,
                &alert(AlertKind::Hung {
                    age_ns: MS,
                    again: false,
                }),
            )
            .unwrap();
        let mut teardown = Teardown::sample(CloseKind::Passive, &[(Phase::CloseWait, MS)]);
        teardowns.print(&mut out, &teardown).unwrap();
        teardown.local = "[2001:db8::1234:5678:9abc]:8080".parse().unwrap();
        teardowns.print(&mut out, &teardown).unwrap();
        alerts
            .print(&mut out, &alert(AlertKind::Resolved { stuck_ns: MS }))
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("TIME "),
            "the header first, above the HUNG line:\n{text}"
        );
        let lines: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(lines.len(), 4, "{text}");
        // The HUNG line and the teardown line under it; the wider IPv6 line and the RESOLVED
        // line under it.
        for pair in [&lines[..2], &lines[2..]] {
            let (alerts, teardowns): (Vec<&str>, Vec<&str>) =
                pair.iter().partition(|l| !l.contains("passive"));
            let (teardown, alert) = (columns(teardowns[0]), columns(alerts[0]));
            assert_eq!(teardown.0, alert.0, "the arrows line up:\n{text}");
            assert_eq!(
                teardown.1,
                alert.1 - 1,
                "the remote columns end together:\n{text}"
            );
        }
    }
}
