//! The default text output, end to end against the real kernel: a tracer printing text runs beside
//! one printing JSON, on the same traffic (an active close, a passive close that hangs in
//! CLOSE_WAIT and is then resolved, their timewait sockets killed), and every line of the text
//! must say what the matching JSON record says, in its columns: the teardown lines, the HUNG and
//! RESOLVED lines (aligned with the teardown lines above them), the leak view and the
//! distributions at exit (printed once), and the summary on standard error.
//!
//! The two tracers run their own programs, so their timestamps differ by the time between two
//! program runs (in the emulated guest, up to a fraction of a millisecond when an interrupt comes
//! between them): durations are compared to the rounding of the text (three significant digits)
//! plus that slack, never for equality.

use std::{
    net::{SocketAddr, TcpStream},
    process::Command,
    thread,
    time::Duration,
};

use serde_json::Value;
use tcpclose::render::human;
use tcpclose_tests::{
    TempDir, Tracing, about, binary,
    netns::Place,
    tcp_state::*,
    timing::{MS, POLL, wait_for},
    tracer::ToFiles,
};

/// Between the two tracers' timestamps of one event, for each end of a phase (the 6.1 guest's
/// CI run saw a FIN_WAIT1 of 1.39 ms for one and 0.97 ms for the other).
const SLACK_NS: f64 = 2_000_000.0;

fn ends(s: &TcpStream) -> (SocketAddr, SocketAddr) {
    (s.local_addr().expect("local"), s.peer_addr().expect("peer"))
}

/// A duration as the text prints it (see [`human`]), in ns.
fn parse_duration(text: &str) -> f64 {
    let text = text.trim_start_matches(['~', '>']);
    if let Some((m, s)) = text.split_once('m').filter(|(_, s)| s.ends_with('s'))
        && !s.is_empty()
        && !text.ends_with("ms")
    {
        let m: f64 = m.parse().unwrap_or_else(|_| panic!("minutes in {text:?}"));
        let s: f64 = s[..s.len() - 1]
            .parse()
            .unwrap_or_else(|_| panic!("seconds in {text:?}"));
        return (m * 60.0 + s) * 1e9;
    }
    let (number, scale) = [("ns", 1.0), ("us", 1e3), ("ms", 1e6), ("s", 1e9)]
        .into_iter()
        .find_map(|(unit, scale)| text.strip_suffix(unit).map(|n| (n, scale)))
        .unwrap_or_else(|| panic!("no unit in {text:?}"));
    number
        .parse::<f64>()
        .unwrap_or_else(|_| panic!("not a duration: {text:?}"))
        * scale
}

/// `text`, a duration the text printed, is `ns` to its rounding (three significant digits).
fn same_duration(text: &str, ns: u64, what: &str, line: &str) {
    let printed = parse_duration(text);
    let ns = ns as f64;
    assert!(
        (printed - ns).abs() <= ns * 0.006 + SLACK_NS,
        "{what}: {text} in the text, {} by the JSON: {line}",
        human(ns as u64)
    );
}

/// A line about one socket: its owner's columns (time, pid, comm: fixed widths, as the header
/// sets them), then its words from the local address on, and where its arrow is.
struct Line<'a> {
    text: &'a str,
    time: &'a str,
    pid: &'a str,
    comm: &'a str,
    words: Vec<&'a str>,
    arrow: usize,
}

/// Where the local address starts: after `{time:<12} {pid:>7} {comm:<15} `.
const LOCAL_COLUMN: usize = 37;

impl<'a> Line<'a> {
    fn of(text: &'a str) -> Self {
        let column = |from: usize, to: usize| text.get(from..to).unwrap_or_default().trim();
        Self {
            text,
            time: column(0, 12),
            pid: column(13, 20),
            comm: column(21, 36),
            words: text
                .get(LOCAL_COLUMN..)
                .unwrap_or_default()
                .split_whitespace()
                .collect(),
            arrow: text
                .find(" -> ")
                .unwrap_or_else(|| panic!("no arrow: {text:?}")),
        }
    }

    /// About the socket `r` describes: both ends in their columns.
    fn about(&self, r: &Value) -> bool {
        let addr = |ip: &Value, port: &Value| match (ip.as_str(), port.as_u64()) {
            (Some(ip), Some(port)) if ip.contains(':') => format!("[{ip}]:{port}"),
            (Some(ip), Some(port)) => format!("{ip}:{port}"),
            _ => panic!("no address in {r}"),
        };
        self.words.len() > 3
            && self.words[0] == addr(&r["laddr"], &r["lport"])
            && self.words[1] == "->"
            && self.words[2] == addr(&r["raddr"], &r["rport"])
    }

    /// The time, and the owner the record names (`unknown` where it names none).
    fn check_owner(&self, r: &Value, unknown: &str) {
        assert!(
            self.time.len() == 12
                && self
                    .time
                    .chars()
                    .all(|c| c.is_ascii_digit() || ":.".contains(c)),
            "HH:MM:SS.mmm first: {}",
            self.text
        );
        let pid = r["pid"]
            .as_u64()
            .map_or(unknown.to_owned(), |p| p.to_string());
        assert_eq!(self.pid, pid, "pid: {}\n{r}", self.text);
        assert_eq!(
            self.comm,
            r["comm"].as_str().unwrap_or(unknown),
            "comm: {}\n{r}",
            self.text
        );
    }
}

/// The teardown line about `r`: side, close kind, total and each phase as the record has them.
fn check_teardown(line: &Line, r: &Value) {
    line.check_owner(r, "");
    let w = &line.words;
    assert_eq!(Some(w[3]), r["side"].as_str(), "side: {}", line.text);
    assert_eq!(Some(w[4]), r["close"].as_str(), "close: {}", line.text);
    let total = r["teardown_ns"].as_u64().expect("teardown_ns");
    same_duration(w[5], total, "teardown", line.text);
    let phases = r["phases"].as_object().expect("phases");
    let printed: Vec<(&str, &str)> = w[6..]
        .chunks(2)
        .take_while(|pair| pair.len() == 2 && !pair[0].starts_with('('))
        .map(|pair| (pair[0], pair[1]))
        .collect();
    assert_eq!(printed.len(), phases.len(), "phases: {}\n{r}", line.text);
    for (name, text) in printed {
        let ns = phases[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name} printed, not in the record: {}\n{r}", line.text));
        same_duration(text, ns, name, line.text);
    }
    if r["timewait_end"] == "killed" {
        assert!(line.text.ends_with("(timewait killed)"), "{}", line.text);
    }
}

#[test]
fn text_lines_say_what_the_json_records_say() {
    let place = Place::new("text");
    let port = place.port();
    let args = ["--port", &port, "--hung", "CLOSE_WAIT=1s"];
    let json = Tracing::start(&args);
    let dir = TempDir::new("text");
    let mut cmd = Command::new(binary());
    cmd.args(args);
    let mut text = ToFiles::start(&mut cmd, dir.path(), Duration::from_secs(180))
        .expect("starting the text tracer");

    let mut pairs = place.connections(2).into_iter();
    let (active_client, active_server) = pairs.next().expect("a pair");
    let (leaking_client, leaking_server) = pairs.next().expect("a pair");
    let leaked = ends(&leaking_client);

    // The server closes first; the client leaves its socket in CLOSE_WAIT past the threshold.
    drop(leaking_server);
    place.wait_for_state(leaked, Some(CLOSE_WAIT), 0, Duration::from_secs(2), POLL);
    let hung = |records: &[Value]| {
        records
            .iter()
            .any(|r| r["type"] == "hung" && about(r, leaked))
    };
    json.wait_for(
        "the CLOSE_WAIT leak reported",
        Duration::from_secs(10),
        hung,
    );
    // Each tracer sweeps for hangs on its own: the text one may come a little later.
    let said_hung = || {
        std::fs::read_to_string(&text.stdout)
            .is_ok_and(|out| out.lines().any(|l| l.contains(" HUNG ")))
    };
    wait_for(
        "the text tracer's HUNG line",
        0,
        Duration::from_secs(10),
        POLL,
        said_hung,
    );
    drop(leaking_client);
    // The client closes first: an active close, and a passive one for the server.
    drop(active_client);
    thread::sleep(Duration::from_millis(50));
    drop(active_server);
    let closed = |records: &[Value]| {
        records
            .iter()
            .any(|r| r["type"] == "resolved" && about(r, leaked))
            && records
                .iter()
                .filter(|r| r["type"] == "teardown" && r["close"] == "passive")
                .count()
                == 2
    };
    json.wait_for(
        "the leak resolved, both passive closes",
        Duration::from_secs(10),
        closed,
    );
    thread::sleep(Duration::from_millis(200));
    place.kill_time_wait();
    thread::sleep(Duration::from_millis(300));

    let run = json.stop();
    run.check_clean();
    // The JSON run's records, as the JSON contract has them: teardown, hung, resolved, leaks,
    // histogram and summary records, each with its fields.
    let kinds: std::collections::BTreeSet<&str> = run
        .records
        .iter()
        .filter_map(|r| r["type"].as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "hung",
            "histogram",
            "leaks",
            "resolved",
            "summary",
            "teardown"
        ]
        .into(),
        "{:#?}",
        run.records
    );
    for r in &run.records {
        tcpclose::render::contract::check(r).unwrap_or_else(|e| panic!("{e}"));
    }
    text.stop(Duration::from_secs(20)).expect("the text tracer");
    let stdout = std::fs::read_to_string(&text.stdout).expect("the text output");
    let stderr = text.errors();
    let all = format!("{stdout}\n-- stderr --\n{stderr}");

    let teardowns: Vec<&Value> = run.of_type("teardown").collect();
    assert_eq!(teardowns.len(), 4, "two connections: {:#?}", run.records);
    let lines: Vec<&str> = stdout.lines().collect();
    let header = lines.first().copied().unwrap_or_default();
    let header_words: Vec<&str> = header.split_whitespace().collect();
    assert_eq!(
        header_words,
        [
            "TIME", "PID", "COMM", "LOCAL", "REMOTE", "SIDE", "CLOSE", "TEARDOWN", "PHASES"
        ],
        "the header first:\n{all}"
    );
    let remote_column = header.find("REMOTE").expect("REMOTE");
    let socket_lines: Vec<Line> = lines
        .iter()
        .take_while(|l| !l.is_empty() && !l.starts_with("--"))
        .skip(1)
        .map(|l| Line::of(l))
        .collect();
    for line in &socket_lines {
        assert_eq!(
            line.arrow + 4,
            remote_column,
            "every line's remote address under REMOTE:\n{all}"
        );
    }

    for r in &teardowns {
        let matching: Vec<&Line> = socket_lines
            .iter()
            .filter(|l| l.about(r) && !l.text.contains("HUNG") && !l.text.contains("RESOLVED"))
            .collect();
        assert_eq!(matching.len(), 1, "one teardown line for {r}:\n{all}");
        check_teardown(matching[0], r);
    }
    for (kind, label, what) in [
        ("hung", "HUNG", "in CLOSE_WAIT for"),
        ("resolved", "RESOLVED", "left CLOSE_WAIT after"),
    ] {
        let r = run
            .of_type(kind)
            .find(|r| about(r, leaked))
            .unwrap_or_else(|| panic!("a {kind} record: {:#?}", run.records));
        let line = socket_lines
            .iter()
            .find(|l| l.about(r) && l.words.get(3) == Some(&label))
            .unwrap_or_else(|| panic!("a {label} line for {r}:\n{all}"));
        line.check_owner(r, "?");
        let said = line.words[4..].join(" ");
        assert!(said.starts_with(what), "{}", line.text);
        let age = r["age_ns"]
            .as_u64()
            .or(r["stuck_ns"].as_u64())
            .expect("an age");
        // `... for 1.23s  recv-q 1, send-q 0`: the age after `for` or `after`, then what the
        // socket waited on at its check, as the JSON record has it.
        let at = line
            .words
            .iter()
            .position(|w| *w == "for" || *w == "after")
            .unwrap_or_else(|| panic!("no age: {}", line.text));
        let printed = line.words.get(at + 1).copied().unwrap_or_default();
        let waiting = format!("recv-q {}, send-q {}", r["recv_queue"], r["send_queue"]);
        assert!(
            line.text.ends_with(&waiting),
            "{kind}: `{waiting}` by the JSON: {}",
            line.text
        );
        // Each tracer decides on its own when its hang is due: the ages differ by when each
        // one's sweep ran.
        let printed_ns = parse_duration(printed);
        assert!(
            printed_ns >= 1e9 && (printed_ns - age as f64).abs() < 500.0 * MS as f64,
            "{kind}: {printed} in the text, {} by the JSON: {}",
            human(age),
            line.text
        );
    }

    // At exit: the leak view (the process that leaked, hung now and new), then the
    // distributions, once, as the JSON's histogram records count them.
    let leaks = run.of_type("leaks").last().expect("a leaks record at exit");
    let leak_lines: Vec<&str> = lines
        .iter()
        .skip_while(|l| !l.starts_with("-- hung sockets"))
        .skip(2)
        .take_while(|l| !l.is_empty() && !l.starts_with("--"))
        .copied()
        .collect();
    let expected: Vec<Vec<String>> = leaks["leaks"]
        .as_array()
        .expect("leaks")
        .iter()
        .map(|l| {
            ["state", "pid", "comm", "hung_now", "new", "recv_queue"]
                .map(|k| match &l[k] {
                    Value::String(s) => s.clone(),
                    v => v.to_string(),
                })
                .to_vec()
        })
        .collect();
    assert!(!expected.is_empty(), "the leak counted: {leaks}");
    let printed: Vec<Vec<String>> = leak_lines
        .iter()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    assert_eq!(printed, expected, "the leak view:\n{all}");

    let blocks = stdout.matches("-- teardown phases since start:").count();
    assert_eq!(blocks, 1, "the distributions once, at exit:\n{all}");
    assert!(
        stdout.contains(&format!(
            "-- teardown phases since start: {} teardowns --",
            teardowns.len()
        )),
        "{all}"
    );
    let table: Vec<Vec<&str>> = lines
        .iter()
        .skip_while(|l| !l.starts_with("PHASE "))
        .skip(1)
        .take_while(|l| !l.is_empty() && !l.starts_with("--"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let histograms: Vec<&Value> = run.of_type("histogram").collect();
    assert_eq!(
        table.len(),
        histograms.len(),
        "one row per phase and close:\n{all}"
    );
    for h in histograms {
        let row = table
            .iter()
            .find(|row| Some(row[0]) == h["phase"].as_str() && Some(row[1]) == h["close"].as_str())
            .unwrap_or_else(|| panic!("a row for {h}:\n{all}"));
        assert_eq!(row[2], h["count"].to_string(), "count of {h}:\n{all}");
        same_duration(
            row[7],
            h["max_ns"].as_u64().expect("max_ns"),
            "max",
            &row.join(" "),
        );
    }

    let summary = run.summary();
    let said = stderr
        .lines()
        .find(|l| l.starts_with("tcpclose: ") && l.contains(" transitions"))
        .unwrap_or_else(|| panic!("a summary line on stderr:\n{all}"));
    assert!(
        said.contains(&format!(", {} teardowns in ", summary["teardowns"])),
        "{said}\n{summary}"
    );
    assert!(
        said.contains(&format!(
            "({} programs)",
            summary["programs"].as_str().unwrap_or("?")
        )),
        "{said}\n{summary}"
    );
}
