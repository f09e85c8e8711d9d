//! Prometheus metrics (`--metrics ADDR`): scraped by a real Prometheus server, parsed by
//! `promtool`, with bounded label values, and served on loopback only when given a bare port.
//!
//! The Prometheus tools come from the Debian package `prometheus`, which the set-up installs;
//! where it is missing these tests fail.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tcpclose_tests::prometheus::{Prometheus, require_tool, wall_secs};
use tcpclose_tests::{
    BoundSocket, PHASES, Tracer, binary, free_port, http_get, output_with_deadline, run_ok,
    set_linger_zero, spawn, timed, wait_with_deadline,
};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

const CLOSES: [&str; 6] = [
    "active",
    "passive",
    "simultaneous",
    "reset",
    "failed",
    "fin_timeout",
];
const STATES: [&str; 12] = [
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
];

/// Kills a tracer (SIGKILL, by pid) when a test panics before stopping it: a failed assertion
/// leaves no tcpclose running. Disarmed by [`Running::stop`].
struct Running(Option<Tracer>);

impl Running {
    fn start(args: &[&str]) -> Self {
        Self(Some(Tracer::start(args)))
    }

    fn stop(mut self) -> tcpclose_tests::Run {
        let run = self.0.take().expect("running").stop();
        assert!(
            run.status.success(),
            "tcpclose: {}\n{}",
            run.status,
            run.stderr
        );
        run
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tracer) = &self.0 {
            // SAFETY: plain kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(tracer.pid(), libc::SIGKILL) };
        }
    }
}

/// The histogram's bucket bounds as exposed: 0.0001 * 2^k s for k = 0..=20, then +Inf.
fn bucket_bounds() -> Vec<String> {
    (0..=20)
        .map(|k| {
            let n = 1u64 << k;
            format!("{}.{:04}", n / 10_000, n % 10_000)
        })
        .chain(["+Inf".to_owned()])
        .collect()
}

/// `tcpclose --version` without the name.
fn version() -> String {
    let out = run_ok(Command::new(binary()).arg("--version"));
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no version in {text:?}"))
        .to_owned()
}

/// 1. A real Prometheus scrapes tcpclose: N connections whose server side stays 300 ms in
///    CLOSE_WAIT appear as N observations of the CLOSE_WAIT/passive histogram, all in the
///    (0.2048, 0.4096] bucket.
#[test]
fn prometheus_scrapes_the_close_wait_histogram() {
    require_tool("prometheus");
    const N: usize = 20;
    let bound = BoundSocket::new(LOOPBACK);
    let port = bound.port;
    let metrics = SocketAddr::new(LOOPBACK, free_port());
    let tracer = Running::start(&[
        "--port",
        &port.to_string(),
        "--metrics",
        &metrics.port().to_string(),
    ]);
    let listener = bound.listen();
    let prometheus = Prometheus::start(metrics);
    let deadline = Instant::now() + Duration::from_secs(20);

    // A good scrape before the connections.
    let before = prometheus.scrape_after(0.0, deadline);
    assert_eq!(
        prometheus.value("up{job=\"tcpclose\"}", before),
        Some(1.0),
        "prometheus log:\n{}",
        prometheus.log()
    );

    // N connections at once; every client closes first, every server 300 ms later.
    let addr = listener.local_addr().unwrap();
    let clients: Vec<TcpStream> = (0..N)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    let servers: Vec<TcpStream> = (0..N)
        .map(|_| listener.accept().expect("accept").0)
        .collect();
    timed(|| {
        drop(clients);
        thread::sleep(Duration::from_millis(300));
        drop(servers);
    });
    let last_close = wall_secs();

    // The exposition is refreshed every second: a scrape that started 1.5 s after the last close
    // reads one encoded after it. Later scrapes are awaited only if the count is still short.
    const COUNT: &str = "tcpclose_teardown_phase_seconds_count{job=\"tcpclose\",phase=\"CLOSE_WAIT\",close=\"passive\"}";
    let mut after = last_close + 1.5;
    let (at, count) = loop {
        let at = prometheus.scrape_after(after, deadline);
        let count = prometheus.value(COUNT, at).unwrap_or(0.0);
        if count >= N as f64 || Instant::now() > deadline {
            break (at, count);
        }
        after = at;
    };
    assert_eq!(
        prometheus.value("up{job=\"tcpclose\"}", at),
        Some(1.0),
        "scrape at {at}"
    );
    assert_eq!(count, N as f64, "{COUNT} at {at}");
    let bucket = |le: &str| {
        prometheus
            .value(
                &format!(
                    "tcpclose_teardown_phase_seconds_bucket{{job=\"tcpclose\",phase=\"CLOSE_WAIT\",\
                     close=\"passive\",le=\"{le}\"}}"
                ),
                at,
            )
            .unwrap_or_else(|| panic!("no bucket le={le} at {at}"))
    };
    let (above, below) = (bucket("0.4096"), bucket("0.2048"));
    assert_eq!(
        above - below,
        N as f64,
        "300 ms lands in (0.2048, 0.4096]: le=0.4096 {above}, le=0.2048 {below}"
    );
    let sum = prometheus
        .value(
            "tcpclose_teardown_phase_seconds_sum{job=\"tcpclose\",phase=\"CLOSE_WAIT\",close=\"passive\"}",
            at,
        )
        .expect("CLOSE_WAIT sum");
    let mean = sum / N as f64;
    assert!(
        (0.3..0.4096).contains(&mean),
        "mean CLOSE_WAIT {mean} s (in seconds, at least the 300 ms slept)"
    );
    assert_eq!(
        prometheus.value(
            "tcpclose_teardowns_total{job=\"tcpclose\",close=\"passive\"}",
            at
        ),
        Some(N as f64),
        "server sides counted as passive teardowns"
    );
    assert_eq!(
        prometheus.value("tcpclose_build_info{job=\"tcpclose\"}", at),
        Some(1.0),
        "build info ingested"
    );

    // What the scrape said agrees with the JSON records.
    let run = tracer.stop();
    let servers: Vec<&Value> = run
        .of_type("teardown")
        .filter(|t| t["side"] == "server" && t["lport"] == port)
        .collect();
    assert_eq!(servers.len(), N, "{servers:#?}");
    for t in servers {
        assert_eq!(t["close"], "passive", "{t}");
        let ns = t["phases"]["CLOSE_WAIT"].as_u64().expect("CLOSE_WAIT");
        assert!((300_000_000..409_600_000).contains(&ns), "{t}");
    }
}

/// One sample of an exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The samples of a text exposition (comments skipped): `name{k="v",...} value [timestamp]`.
fn parse_exposition(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| parse_sample(line).unwrap_or_else(|| panic!("cannot parse sample {line:?}")))
        .collect()
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            rest = rest.trim_start_matches(',');
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = rest.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next()? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next()? {
                        (_, 'n') => value.push('\n'),
                        (_, c) => value.push(c),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.to_owned(), value));
            rest = &after[end + 1..];
        }
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Checks `body` with `promtool check metrics`. Parse errors (exit 1) fail. Lint problems (exit
/// 3) fail too, except the one the OpenMetrics counter convention causes: the text-format linter
/// takes `X_total` samples for a family of their own, without `X`'s HELP.
fn promtool_check(body: &str) {
    let mut child = spawn(
        Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .expect("starting promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("writing to promtool");
    let out = output_with_deadline("promtool check metrics", child, Duration::from_secs(60));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) => {}
        Some(3) => {
            for problem in said.lines().filter(|l| !l.trim().is_empty()) {
                let tolerated = problem.strip_suffix(" no help text").is_some_and(|name| {
                    name.strip_suffix("_total").is_some_and(|family| {
                        body.lines()
                            .any(|l| l.starts_with(&format!("# HELP {family} ")))
                    })
                });
                assert!(
                    tolerated,
                    "promtool lint problem {problem:?}; promtool said:\n{said}\nexposition:\n{body}"
                );
            }
        }
        _ => panic!(
            "promtool check metrics cannot parse the exposition ({}):\n{said}\nexposition:\n{body}",
            out.status
        ),
    }
}

/// 2. The exposition parses with Prometheus's text parser (promtool), and no label value varies
///    per connection: label names and values come from fixed sets.
#[test]
fn exposition_parses_and_labels_are_bounded() {
    require_tool("promtool");
    let bound = BoundSocket::new(LOOPBACK);
    // Bound, never listening: connecting to it is refused (a "failed" teardown).
    let refusing = BoundSocket::new(LOOPBACK);
    let metrics = SocketAddr::new(LOOPBACK, free_port());
    let tracer = Running::start(&[
        "--port",
        &bound.port.to_string(),
        "--port",
        &refusing.port.to_string(),
        "--metrics",
        &metrics.port().to_string(),
    ]);
    let listener = bound.listen();
    let addr = listener.local_addr().unwrap();
    // Passive (server side): the client closes first.
    let client = TcpStream::connect(addr).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    timed(|| {
        drop(client);
        thread::sleep(Duration::from_millis(20));
        drop(server);
    });
    // Reset, both sides: the server aborts.
    let client = TcpStream::connect(addr).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    set_linger_zero(&server);
    timed(|| drop(server));
    drop(client);
    // Failed.
    let refused = TcpStream::connect(SocketAddr::new(LOOPBACK, refusing.port))
        .expect_err("connecting to a port nobody listens on");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);

    let teardowns = |samples: &[Sample], close: &str| {
        samples
            .iter()
            .find(|s| s.name == "tcpclose_teardowns_total" && s.label("close") == Some(close))
            .map_or(0.0, |s| s.value)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let (body, samples) = loop {
        let r = http_get(metrics, "/metrics", HTTP_TIMEOUT).expect("GET /metrics");
        assert_eq!(r.status, 200, "{r:?}");
        let samples = parse_exposition(&r.body);
        if ["passive", "reset", "failed"]
            .iter()
            .all(|close| teardowns(&samples, close) >= 1.0)
        {
            break (r.body, samples);
        }
        assert!(
            Instant::now() < deadline,
            "teardowns not in the exposition after 10 s:\n{}",
            r.body
        );
        thread::sleep(Duration::from_millis(200));
    };

    // Label names per metric, and every metric present.
    let allowed: BTreeMap<&str, &[&str]> = [
        (
            "tcpclose_teardown_phase_seconds_bucket",
            &["phase", "close", "le"][..],
        ),
        ("tcpclose_teardown_phase_seconds_count", &["phase", "close"]),
        ("tcpclose_teardown_phase_seconds_sum", &["phase", "close"]),
        ("tcpclose_teardowns_total", &["close"]),
        ("tcpclose_transitions_total", &["from", "to"]),
        ("tcpclose_sockets", &["state"]),
        ("tcpclose_hung_sockets", &["state"]),
        ("tcpclose_lost_events_total", &[]),
        ("tcpclose_missed_events_total", &[]),
        ("tcpclose_kernel_events_total", &[]),
        ("tcpclose_received_events_total", &[]),
        ("tcpclose_tracked_sockets", &[]),
        ("tcpclose_build_info", &["version", "programs"]),
    ]
    .into_iter()
    .collect();
    let version = version();
    let bounds = bucket_bounds();
    for s in &samples {
        let names = allowed
            .get(s.name.as_str())
            .unwrap_or_else(|| panic!("unknown metric {s:?}"));
        let keys: BTreeSet<&str> = s.labels.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            names.iter().copied().collect(),
            "label names of {s:?}"
        );
        for (key, value) in &s.labels {
            let known = match key.as_str() {
                "phase" => PHASES.contains(&value.as_str()),
                "close" => CLOSES.contains(&value.as_str()),
                "from" | "to" => STATES.contains(&value.as_str()),
                "state" if s.name == "tcpclose_hung_sockets" => PHASES.contains(&value.as_str()),
                "state" => STATES.contains(&value.as_str()),
                "version" => *value == version,
                // The set of kernel programs that runs (--programs).
                "programs" => ["btf", "raw"].contains(&value.as_str()),
                "le" => bounds.contains(value),
                _ => false,
            };
            assert!(
                known,
                "label {key}={value:?} of {s:?} is not from its fixed set"
            );
        }
    }
    for name in allowed.keys() {
        assert!(
            samples.iter().any(|s| s.name == *name),
            "{name} missing:\n{body}"
        );
    }
    // Every histogram has all its buckets, cumulative, ending at its count.
    let mut histograms = BTreeMap::<(String, String), Vec<(String, f64)>>::new();
    for s in &samples {
        if s.name == "tcpclose_teardown_phase_seconds_bucket" {
            histograms
                .entry((
                    s.label("phase").unwrap().into(),
                    s.label("close").unwrap().into(),
                ))
                .or_default()
                .push((s.label("le").unwrap().into(), s.value));
        }
    }
    assert!(
        histograms.contains_key(&("CLOSE_WAIT".into(), "passive".into())),
        "{body}"
    );
    for ((phase, close), buckets) in &histograms {
        let les: Vec<&String> = buckets.iter().map(|(le, _)| le).collect();
        assert_eq!(les, bounds.iter().collect::<Vec<_>>(), "{phase}/{close}");
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "{phase}/{close} not cumulative: {buckets:?}"
        );
        let count = samples
            .iter()
            .find(|s| {
                s.name == "tcpclose_teardown_phase_seconds_count"
                    && s.label("phase") == Some(phase)
                    && s.label("close") == Some(close)
            })
            .unwrap_or_else(|| panic!("no count for {phase}/{close}"));
        assert_eq!(buckets.last().unwrap().1, count.value, "{phase}/{close}");
    }

    promtool_check(&body);
    tracer.stop();
}

/// An IPv4 address of this machine outside 127.0.0.0/8: an existing one, else one the test adds
/// to `lo` (which needs no kernel module) and removes on drop.
struct OffLoopback {
    ip: Ipv4Addr,
    added: bool,
    /// The tests that use it run one at a time: one would delete the address the other uses.
    _alone: std::sync::MutexGuard<'static, ()>,
}

static OFF_LOOPBACK: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl OffLoopback {
    const ADDED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);

    fn get() -> Self {
        let alone = OFF_LOOPBACK.lock().unwrap_or_else(|e| e.into_inner());
        let out =
            run_ok(Command::new("ip").args(["-4", "-o", "addr", "show", "scope", "global", "up"]));
        let text = String::from_utf8_lossy(&out.stdout);
        let existing = text.lines().find_map(|line| {
            let mut fields = line.split_whitespace();
            fields.find(|f| *f == "inet")?;
            fields.next()?.split('/').next()?.parse::<Ipv4Addr>().ok()
        });
        if let Some(ip) = existing.filter(|ip| !ip.is_loopback()) {
            return Self {
                ip,
                added: false,
                _alone: alone,
            };
        }
        run_ok(Command::new("ip").args([
            "addr",
            "add",
            &format!("{}/32", Self::ADDED),
            "dev",
            "lo",
        ]));
        Self {
            ip: Self::ADDED,
            added: true,
            _alone: alone,
        }
    }
}

impl Drop for OffLoopback {
    fn drop(&mut self) {
        if self.added {
            if let Ok(mut child) = Command::new("ip")
                .args(["addr", "del", &format!("{}/32", self.ip), "dev", "lo"])
                .stdin(Stdio::null())
                .spawn()
            {
                let _ = wait_with_deadline(&mut child, Duration::from_secs(10));
            }
        }
    }
}

/// 3. `--metrics PORT` listens on 127.0.0.1 only, and serves nothing but `/metrics`.
#[test]
fn a_bare_port_listens_on_loopback_only() {
    let off = OffLoopback::get();
    let port = free_port();
    let tracer = Running::start(&["--port", "1", "--metrics", &port.to_string()]);

    // Control: the address takes local connections (to a listener on every address).
    let control = TcpListener::bind("0.0.0.0:0").expect("bind 0.0.0.0:0");
    let control_addr = SocketAddr::new(off.ip.into(), control.local_addr().unwrap().port());
    TcpStream::connect_timeout(&control_addr, HTTP_TIMEOUT)
        .unwrap_or_else(|e| panic!("{control_addr} does not take local connections: {e}"));

    let r = http_get(SocketAddr::new(LOOPBACK, port), "/metrics", HTTP_TIMEOUT)
        .expect("GET /metrics on 127.0.0.1");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{r:?}"
    );
    assert!(r.body.ends_with("# EOF\n"), "{r:?}");

    let outside = SocketAddr::new(off.ip.into(), port);
    match http_get(outside, "/metrics", HTTP_TIMEOUT) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => panic!("{outside} (off loopback) must refuse connections: {other:?}"),
    }

    for path in [
        "/",
        "/metric",
        "/metrics/",
        "/metricsx",
        "/favicon.ico",
        "/-/ready",
    ] {
        let r = http_get(SocketAddr::new(LOOPBACK, port), path, HTTP_TIMEOUT)
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(r.status, 404, "GET {path}: {r:?}");
    }
    tracer.stop();
}

/// Scrapers that connect and never ask, or ask and never read, hold only their own connection:
/// teardown records keep coming, nothing is lost, and a fresh scrape is answered.
#[test]
fn stuck_scrapers_do_not_stall_the_tracer() {
    let port = free_port();
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = server.local_addr().expect("local address");
    let tracer = Tracer::start(&[
        "--port",
        &addr.port().to_string(),
        "--metrics",
        &port.to_string(),
    ]);
    let metrics = SocketAddr::new(LOOPBACK, port);
    let stuck: Vec<TcpStream> = (0..40)
        .map(|i| {
            let mut s = TcpStream::connect(metrics).expect("connect to /metrics");
            if i % 2 == 1 {
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
                    .expect("send a request");
            }
            s
        })
        .collect();
    const CONNECTIONS: usize = 50;
    for _ in 0..CONNECTIONS {
        let client = TcpStream::connect(addr).expect("connect");
        let (accepted, _) = server.accept().expect("accept");
        // The client closes first: the server's record (passive) is due when it closes.
        drop(client);
        drop(accepted);
    }
    let servers = |records: &[Value]| {
        records
            .iter()
            .filter(|r| r["type"] == "teardown" && r["side"] == "server")
            .count()
    };
    if let Err(records) =
        tracer.wait_for_records(Duration::from_secs(3), |r| servers(r) >= CONNECTIONS)
    {
        panic!(
            "{} of {CONNECTIONS} server records within 3 s while scrapers were stuck",
            servers(&records)
        );
    }
    let r = http_get(metrics, "/metrics", HTTP_TIMEOUT).expect("a fresh scrape");
    assert_eq!(r.status, 200, "{r:?}");
    drop(stuck);
    let run = tracer.stop();
    assert!(run.status.success(), "{run:?}");
    assert_eq!(run.summary()["lost"], 0, "{}", run.summary());
}

/// The value of the sample `name` whose labels include `labels` (0 when absent: a series not yet
/// created has counted nothing).
fn sample_value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(v)))
        .map(|s| s.value)
        .sum()
}

/// Scrapes `addr` until `done` holds for the samples, for up to 15 s (the exposition is
/// refreshed every second); returns them.
fn scrape_until(addr: SocketAddr, what: &str, done: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = http_get(addr, "/metrics", HTTP_TIMEOUT)
            .unwrap_or_else(|e| panic!("GET /metrics on {addr}: {e}"));
        assert_eq!(r.status, 200, "{r:?}");
        let samples = parse_exposition(&r.body);
        if done(&samples) {
            return samples;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within 15 s:\n{}",
            r.body
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// The alerting rules as shipped, each `for:` cut to 0s: how long a condition must last is the
/// rules' unit tests' business (`promtool test rules`, in deploy.rs); here they must fire on what
/// a real tcpclose exports about a real leak, and stop when it ends.
fn rules_firing_at_once() -> String {
    include_str!("../../deploy/prometheus/tcpclose-rules.yaml")
        .lines()
        .map(|line| match line.trim_start().strip_prefix("for:") {
            Some(_) => format!("{}for: 0s", &line[..line.len() - line.trim_start().len()]),
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Live values on a real CLOSE_WAIT leak in a namespace, served on `0.0.0.0:PORT` and
/// scraped from off loopback by a real Prometheus evaluating the shipped alerting rules: the hung
/// gauge goes to 1 while the leak lasts and back to 0 when it is closed, and the CLOSE_WAIT alert
/// fires and resolves with it; `tcpclose_sockets` counts the two sockets in their states; and
/// `tcpclose_transitions_total` counts each state change of the connection and its listener once.
#[test]
fn live_values_follow_a_real_leak_and_its_alert_fires() {
    require_tool("prometheus");
    let off = OffLoopback::get();
    let place = tcpclose_tests::netns::Place::new("live");
    let port = free_port();
    let tracer = Running::start(&[
        "--port",
        &place.port(),
        "--hung",
        "CLOSE_WAIT=1s",
        "--metrics",
        &format!("0.0.0.0:{port}"),
    ]);
    let outside = SocketAddr::new(off.ip.into(), port);
    let prometheus = Prometheus::start_with_rules(outside, Some(&rules_firing_at_once()));
    let hung = |s: &[Sample]| sample_value(s, "tcpclose_hung_sockets", &[("state", "CLOSE_WAIT")]);
    let before = scrape_until(outside, "a first scrape from off loopback", |_| true);
    assert_eq!(hung(&before), 0.0);

    let (client, server) = place.connections(1).pop().expect("a connection");
    let leaked = (
        client.local_addr().expect("client"),
        client.peer_addr().expect("server"),
    );
    drop(server);
    place.wait_for_state(
        leaked,
        Some(tcpclose_tests::tcp_state::CLOSE_WAIT),
        0,
        Duration::from_secs(2),
        Duration::from_millis(20),
    );
    let during = scrape_until(outside, "the hung gauge at 1", |s| hung(s) == 1.0);
    for (state, n) in [
        ("CLOSE_WAIT", 1.0),
        ("FIN_WAIT2", 1.0),
        ("ESTABLISHED", 0.0),
    ] {
        assert_eq!(
            sample_value(&during, "tcpclose_sockets", &[("state", state)]),
            n,
            "tcpclose_sockets{{state={state:?}}} during the leak"
        );
    }
    let alert = "ALERTS{alertname=\"TcpcloseCloseWaitLeak\",alertstate=\"firing\"}";
    let firing = |want: bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = prometheus.query(alert, None);
            if now.is_empty() != want {
                return now;
            }
            assert!(
                Instant::now() < deadline,
                "{alert} {} within 30 s; prometheus log:\n{}",
                if want { "not firing" } else { "still firing" },
                prometheus.log()
            );
            thread::sleep(Duration::from_millis(250));
        }
    };
    let fired = firing(true);
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(
        fired[0].0.get("state").map(String::as_str),
        Some("CLOSE_WAIT")
    );
    assert_eq!(
        fired[0].0.get("instance"),
        Some(&outside.to_string()),
        "{fired:?}"
    );

    drop(client);
    scrape_until(outside, "the hung gauge back at 0", |s| hung(s) == 0.0);
    firing(false);
    place.kill_time_wait();

    // The listener, the client and the accepted socket, each state change once; the timewait
    // socket's own changes are not state changes of a socket (no tracepoint).
    let expected: BTreeSet<(&str, &str)> = [
        ("CLOSE", "LISTEN"),
        ("LISTEN", "CLOSE"),
        ("CLOSE", "SYN_SENT"),
        ("SYN_SENT", "ESTABLISHED"),
        ("ESTABLISHED", "CLOSE_WAIT"),
        ("CLOSE_WAIT", "LAST_ACK"),
        ("LAST_ACK", "CLOSE"),
        ("LISTEN", "SYN_RECV"),
        ("SYN_RECV", "ESTABLISHED"),
        ("ESTABLISHED", "FIN_WAIT1"),
        ("FIN_WAIT1", "FIN_WAIT2"),
        ("FIN_WAIT2", "CLOSE"),
    ]
    .into();
    let counted = |s: &[Sample]| -> BTreeMap<(String, String), f64> {
        s.iter()
            .filter(|s| s.name == "tcpclose_transitions_total" && s.value > 0.0)
            .map(|s| {
                let label = |k| s.label(k).unwrap_or_default().to_owned();
                ((label("from"), label("to")), s.value)
            })
            .collect()
    };
    let want: BTreeMap<(String, String), f64> = expected
        .iter()
        .map(|(from, to)| ((from.to_string(), to.to_string()), 1.0))
        .collect();
    // Once the timewait socket is killed, tcpclose follows none of them.
    scrape_until(
        outside,
        "every transition counted, no socket followed",
        |s| counted(s) == want && sample_value(s, "tcpclose_sockets", &[]) == 0.0,
    );
    tracer.stop();
}

/// A `--metrics` port already in use is a mistake on the command line: a clear error, exit
/// status 2, found before anything is loaded into the kernel.
#[test]
fn a_metrics_port_in_use_is_refused_with_status_2() {
    let taken = TcpListener::bind((LOOPBACK, 0)).expect("binding a port");
    let port = taken.local_addr().expect("its address").port();
    let (status, _, stderr) = tcpclose_tests::run_binary(Command::new(binary()).args([
        "--metrics",
        &port.to_string(),
        "--duration",
        "5s",
    ]));
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot serve metrics on 127.0.0.1:{port}: Address already in use"
        )) && stderr.contains("choose another address with --metrics"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("Tracing"),
        "refused before attaching: {stderr}"
    );
    drop(taken);
}
