//! The JSON contract: the fields of every record type, pinned once here, checked against what the
//! printers write, against every example in the README, and against live runs on the real kernel
//! (the integration tests call [`check`]), so that neither the output nor its documentation can
//! drift without this failing. Fields may be added (here, in the printers and in the README
//! together), never renamed.

use std::collections::BTreeSet;

use serde_json::Value;

/// Where a socket lives: on every record about one socket, and on each line of the leak view.
const PLACEMENT: &[&str] = &["netns", "cgroup", "container_id", "pod_uid"];
/// A socket's two ends.
const ENDS: &[&str] = &["family", "laddr", "lport", "raddr", "rport"];

/// Each record type's own fields; [`fields`] adds the shared ones. A field ending in `?` appears
/// only in some modes (`group_by` and `group` with `--group-by`).
const OWN_FIELDS: &[(&str, &[&str])] = &[
    (
        "teardown",
        &[
            "time",
            "ts_ns",
            "side",
            "close",
            "phases",
            "teardown_ns",
            "lifetime_ns",
            "complete",
            "pid",
            "comm",
            "resolution_ns",
            "timewait_end",
            "reset",
            "fin_retransmits",
        ],
    ),
    (
        "transition",
        &[
            "ts_ns",
            "time",
            "skaddr",
            "old",
            "new",
            "in_old_ns",
            "pid",
            "comm",
        ],
    ),
    ("hung", &["age_ns", "again"]),
    ("resolved", &["stuck_ns"]),
    ("evicted", &["age_ns"]),
    (
        "leaks",
        &["time", "ts_ns", "interval_ns", "group_by?", "leaks"],
    ),
    (
        "histogram",
        &[
            "time", "ts_ns", "group_by", "group", "phase", "close", "count", "p50_ns", "p90_ns",
            "p99_ns", "p999_ns", "max_ns", "log2_us",
        ],
    ),
    (
        "summary",
        &[
            "programs",
            "transitions",
            "lost",
            "matched",
            "missed",
            "undecodable",
            "untracked",
            "teardowns",
            "hung_alerts",
            "hung_deferred",
            "census_corrected",
            "timewait_matched",
            "timewait_events",
            "timewait_lost",
            "cause_matched",
            "cause_events",
            "cause_lost",
            "evicted",
            "unfinished",
            "timewait_unseen",
            "output_lost",
            "in_progress",
            "duration_ns",
            "delay_p50_ns",
            "delay_p99_ns",
            "delay_max_ns",
            "largest_backlog_events",
            "largest_backlog_drain_ns",
        ],
    ),
];

/// What every record about a hung socket has (hung, resolved, evicted), besides its ends and
/// placement.
const ALERT: &[&str] = &[
    "time",
    "ts_ns",
    "state",
    "since",
    "since_ns",
    "age_is_lower_bound",
    "pid",
    "comm",
    "holders",
    "recv_queue",
    "send_queue",
    "retransmits",
    "zero_window",
];

/// The fields of a line of the leak view (`leaks[]`): a process's line says where its sockets
/// live, a group's line (`--group-by`) names its group.
const LEAK_FIELDS: &[&str] = &[
    "state",
    "pid",
    "comm",
    "group?",
    "hung_now",
    "new",
    "recv_queue",
    "netns?",
    "cgroup?",
    "container_id?",
    "pod_uid?",
];
/// The fields of a teardown's reset (`reset`, when not null).
const RESET_FIELDS: &[&str] = &["by", "reason"];
/// The fields of a holder of a hung socket (`holders[]`).
const HOLDER_FIELDS: &[&str] = &["pid", "comm"];

/// The record types, as their `type` field names them.
pub fn record_types() -> impl Iterator<Item = &'static str> {
    OWN_FIELDS.iter().map(|(kind, _)| *kind)
}

/// The fields a record of type `kind` has: always, and in some modes.
fn fields(kind: &str) -> Result<Fields, String> {
    let (_, own) = OWN_FIELDS
        .iter()
        .find(|(k, _)| *k == kind)
        .ok_or_else(|| format!("no record type {kind:?} in the contract"))?;
    let mut all = own.to_vec();
    all.push("type");
    if !matches!(kind, "leaks" | "histogram" | "summary") {
        all.extend(ENDS);
        all.extend(PLACEMENT);
    }
    if matches!(kind, "hung" | "resolved" | "evicted") {
        all.extend(ALERT);
    }
    Ok(Fields::of(&all))
}

/// A set of fields: those always present, and those present only in some modes.
#[derive(Debug)]
struct Fields {
    always: BTreeSet<&'static str>,
    sometimes: BTreeSet<&'static str>,
}

impl Fields {
    fn of(names: &[&'static str]) -> Self {
        let (sometimes, always): (BTreeSet<_>, BTreeSet<_>) =
            names.iter().partition(|name| name.ends_with('?'));
        Self {
            always,
            sometimes: sometimes
                .into_iter()
                .map(|name| name.trim_end_matches('?'))
                .collect(),
        }
    }

    /// `v`, an object, has exactly these fields.
    fn check(&self, v: &Value, what: &str) -> Result<(), String> {
        let keys: BTreeSet<&str> = v
            .as_object()
            .ok_or_else(|| format!("{what}: not an object: {v}"))?
            .keys()
            .map(String::as_str)
            .collect();
        let missing: Vec<_> = self.always.difference(&keys).collect();
        let unknown: Vec<_> = keys
            .iter()
            .filter(|k| !self.always.contains(*k) && !self.sometimes.contains(*k))
            .collect();
        if missing.is_empty() && unknown.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{what}: missing {missing:?}, not in the contract {unknown:?}: {v}"
            ))
        }
    }
}

/// Whether `v`, a record, has exactly the contract's fields for its type, and the objects nested
/// in it theirs; the error says what differs.
pub fn check(v: &Value) -> Result<(), String> {
    let kind = v["type"]
        .as_str()
        .ok_or_else(|| format!("a record without a type: {v}"))?;
    fields(kind)?.check(v, &format!("a {kind} record"))?;
    for (name, nested) in [
        ("holders", HOLDER_FIELDS),
        ("leaks", LEAK_FIELDS),
        ("log2_us", &["low_us", "high_us", "count"][..]),
    ] {
        for item in v[name].as_array().into_iter().flatten() {
            Fields::of(nested).check(item, &format!("{kind}.{name}[]"))?;
        }
    }
    if v["reset"].is_object() {
        Fields::of(RESET_FIELDS).check(&v["reset"], &format!("{kind}.reset"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::{Family, Placement, Task, TcpState, Transition},
        hang_check::Waiting,
        hung::{AlertKind, LeakView},
        render::{
            AlertPrinter, EventPrinter, Format, OwnedAlert, Summary, TeardownPrinter, WallClock,
            print_distributions,
        },
        stats::Distributions,
        teardown::{CloseKind, Phase, Teardown},
    };

    fn records(out: &[u8]) -> Vec<Value> {
        out.split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| {
                serde_json::from_slice(l)
                    .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(l)))
            })
            .collect()
    }

    const MS: u64 = 1_000_000;

    /// One record of each type, as tcpclose prints it.
    fn printed() -> Vec<Value> {
        let clock = || WallClock::with_offset(0);
        let mut out = Vec::new();

        let teardown = Teardown::sample(CloseKind::Passive, &[(Phase::CloseWait, 3 * MS)]);
        TeardownPrinter::new(Format::Json, clock(), false)
            .print(&mut out, &teardown)
            .unwrap();

        let transition = Transition {
            ts_ns: 2 * MS,
            skaddr: 0xffff_8880_1234_5678,
            family: Family::Ipv6,
            local: "[::1]:40000".parse().unwrap(),
            remote: "[::1]:8080".parse().unwrap(),
            old: TcpState::CloseWait,
            new: TcpState::LastAck,
            task: Task::new(42, 43, "server"),
            placement: Placement::default(),
        };
        EventPrinter::new(Format::Json, clock())
            .print(&mut out, &transition, Some(MS))
            .unwrap();

        let alert = |kind| OwnedAlert {
            waiting: Some(Waiting {
                recv_queue: 1001,
                send_queue: 0,
                retransmits: 0,
                zero_window: false,
            }),
            ..OwnedAlert::sample(kind)
        };
        let alerts = AlertPrinter::new(Format::Json, clock(), false);
        let hung = alert(AlertKind::Hung {
            age_ns: 4_000 * MS,
            again: false,
        });
        for a in [
            &hung,
            &alert(AlertKind::Resolved { stuck_ns: 9 * MS }),
            &alert(AlertKind::Evicted { age_ns: 7 * MS }),
        ] {
            alerts.print(&mut out, a).unwrap();
        }
        let mut view = LeakView::default();
        view.observe(&hung.alert, hung.holder().as_ref());
        alerts
            .print_leaks(&mut out, &view.report(10), None, 10 * MS, 10 * MS)
            .unwrap();

        let mut distributions = Distributions::new(None, 4);
        distributions.record(&teardown);
        print_distributions(
            &mut out,
            Format::Json,
            &clock(),
            5,
            None,
            &distributions.report(10),
        )
        .unwrap();

        Summary::default().print(Format::Json, &mut out).unwrap();
        records(&out)
    }

    #[test]
    fn every_record_type_has_the_contracts_fields() {
        let printed = printed();
        let kinds: BTreeSet<_> = printed.iter().filter_map(|v| v["type"].as_str()).collect();
        let contract: BTreeSet<_> = record_types().collect();
        assert_eq!(kinds, contract, "one record of each type was printed");
        for v in &printed {
            check(v).unwrap_or_else(|e| panic!("printed: {e}"));
        }
    }

    /// The JSON records in the README's code blocks, each folded over several lines for reading: a
    /// record starts on a line beginning with `{"type":`.
    fn readme_records() -> Vec<(usize, Value)> {
        let readme = include_str!("../../../README.md");
        let mut found = Vec::new();
        let mut current: Option<(usize, String)> = None;
        let mut in_block = false;
        for (n, line) in readme.lines().enumerate() {
            if line.starts_with("```") {
                in_block = !in_block;
            }
            let starts = in_block && line.starts_with("{\"type\":");
            if starts || !in_block || line.starts_with("```") {
                found.extend(current.take());
            }
            if starts {
                current = Some((n + 1, String::new()));
            }
            if let Some((_, text)) = &mut current {
                text.push_str(line.trim());
            }
        }
        found
            .into_iter()
            .map(|(n, text)| {
                let v = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("README.md:{n}: not JSON ({e}): {text}"));
                (n, v)
            })
            .collect()
    }

    #[test]
    fn the_readme_examples_have_the_contracts_fields() {
        let examples = readme_records();
        let kinds: BTreeSet<_> = examples
            .iter()
            .filter_map(|(_, v)| v["type"].as_str())
            .collect();
        let contract: BTreeSet<_> = record_types().collect();
        assert_eq!(kinds, contract, "the README shows a record of each type");
        for (line, v) in &examples {
            check(v).unwrap_or_else(|e| panic!("README.md:{line}: {e}"));
        }
    }
}
