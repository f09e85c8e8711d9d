//! Loss is counted, never silent. In its own test binary so that its load does not disturb the
//! timing checks of the other tests.

use std::{
    net::{TcpListener, TcpStream},
    thread,
    time::Duration,
};

use tcpclose_tests::{Run, Tracer, churn, netns::Place};

/// Connections churned through a one-page ring (about 42 records): far more than it holds.
const CONNECTIONS: usize = 3000;

/// Runs tcpclose with `args` and a one-page ring while [`CONNECTIONS`] connections open and
/// close on its port, in a network namespace of their own: its timewait table is empty at the
/// start whatever ran before (a kernel makes no timewait socket once `tcp_max_tw_buckets` are
/// in use, 16,384 on a 3 GB machine).
fn overflow(args: &[&str]) -> Run {
    let place = Place::new("overload");
    let port = place.port();
    let tracer = Tracer::start(&[args, &["--port", &port, "--ring-bytes", "4096"]].concat());
    place.ns.run(|| {
        let listener = TcpListener::bind(place.server_addr).expect("listening in the namespace");
        churn(&listener, CONNECTIONS);
    });
    thread::sleep(Duration::from_millis(200));
    let run = tracer.stop();
    assert!(run.status.success(), "{run:?}");
    run
}

#[test]
fn a_full_ring_is_counted_as_lost() {
    let run = overflow(&["--events"]);
    let summary = run.summary();
    let lost = summary["lost"].as_u64().unwrap();
    let transitions = summary["transitions"].as_u64().unwrap();
    let matched = summary["matched"].as_u64().unwrap();
    assert!(
        lost > 0,
        "a 4 KiB ring under {CONNECTIONS} connections must overflow: {summary}"
    );
    assert_eq!(transitions, run.transitions().len() as u64);
    assert_eq!(
        matched,
        transitions + lost,
        "every matched event delivered or lost: {summary}"
    );
    // A connection makes about 10 transitions on its two sockets (a few fewer when the two closes
    // race); the counters saw the load.
    assert!(matched >= (CONNECTIONS * 9) as u64, "{summary}");
}

/// Every event the kernel programs accept is received or counted lost, timer events included.
#[test]
fn kernel_events_reconcile_under_overload() {
    let run = overflow(&[]);
    let s = run.summary();
    let n = |key: &str| s[key].as_u64().unwrap_or_else(|| panic!("{key} in {s}"));
    assert!(
        n("lost") + n("timewait_lost") > 0,
        "a 4 KiB ring must overflow: {s}"
    );
    assert_eq!(
        n("matched"),
        n("transitions") + n("lost") + n("undecodable"),
        "{s}"
    );
    assert_eq!(
        n("timewait_matched"),
        n("timewait_events") + n("timewait_lost"),
        "{s}"
    );
    assert!(
        n("timewait_matched") > 0,
        "the timer programs saw the timewait sockets: {s}"
    );
}

#[test]
fn a_full_socket_table_evicts_and_counts() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let tracer = Tracer::start(&["--port", &addr.port().to_string(), "--max-sockets", "8"]);
    // 40 connections open at once: 80 sockets followed, ten times the table.
    const OPEN: usize = 40;
    let clients: Vec<TcpStream> = (0..OPEN)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    let servers: Vec<TcpStream> = (0..OPEN)
        .map(|_| listener.accept().expect("accept").0)
        .collect();
    // Server first, then the client: every connection ends on full sockets (the clients end in
    // LAST_ACK, no timewait socket), so their records are due at once.
    drop(servers);
    thread::sleep(Duration::from_millis(50));
    drop(clients);
    thread::sleep(Duration::from_millis(300));
    let run = tracer.stop();
    assert!(run.status.success(), "{run:?}");
    let summary = run.summary();
    let evicted = summary["evicted"].as_u64().unwrap();
    let teardowns = run.of_type("teardown").count() as u64;
    assert!(
        evicted > 0,
        "a table of 8 under {OPEN} connections: {summary}"
    );
    assert_eq!(summary["teardowns"].as_u64(), Some(teardowns), "{summary}");
    // Every socket is either evicted, or reported when it ended (complete or not), or still
    // closing (the servers' TIME_WAIT).
    let in_progress = summary["in_progress"].as_u64().unwrap();
    assert!(
        evicted + teardowns + in_progress >= 2 * OPEN as u64,
        "sockets unaccounted for: {summary}"
    );
    assert_eq!(summary["lost"].as_u64(), Some(0), "{summary}");
}

/// Standard output that nobody reads (a pipe into a program that stopped reading) must not stop
/// the ring buffer from draining: output is dropped and counted, kernel events are not lost.
#[test]
fn a_stuck_reader_drops_output_not_events() {
    use std::{
        io::{BufRead as _, BufReader, Read as _},
        process::Stdio,
    };
    tcpclose_tests::require_root();
    let place = Place::new("stuck-reader");
    let port = place.port();
    let mut child = tcpclose_tests::spawn(
        std::process::Command::new(tcpclose_tests::binary())
            .args(["--events", "--json", "--port", &port])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .expect("spawning tcpclose");
    // Held, never read.
    let _stdout = child.stdout.take().expect("stdout");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    while !line.starts_with("Tracing") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).expect("reading stderr") > 0,
            "tcpclose ended before it was ready"
        );
    }
    // About 20 MB of JSON lines: more than the pipe and the 16 MiB output queue hold.
    place.ns.run(|| {
        let listener = TcpListener::bind(place.server_addr).expect("listening in the namespace");
        churn(&listener, 12_000);
    });
    thread::sleep(Duration::from_millis(500));
    // SAFETY: plain kill(2) of our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let started = std::time::Instant::now();
    let status = tcpclose_tests::wait_with_deadline(&mut child, Duration::from_secs(10))
        .expect("tcpclose must end although its reader is stuck");
    assert!(started.elapsed() < Duration::from_secs(10));
    let mut text = String::new();
    stderr.read_to_string(&mut text).unwrap();
    assert!(status.success(), "{status}: {text}");
    // The JSON summary cannot reach stdout: it is on stderr, in text.
    assert!(text.contains(" 0 lost (ring buffer full)"), "{text}");
    assert!(text.contains("output lines dropped"), "{text}");
}

/// Tracepoint hits the kernel skipped because one of tcpclose's programs was already running on
/// that CPU (BPF recursion protection, the programs' `recursion_misses`) are reported as
/// `missed`. The test reads the same counters tcpclose reads: each of tcpclose's programs must
/// have one (else `missed` would be a silent 0), and the summary must count at least what they
/// showed just before the end. Misses happen at full churn (a few per 100k connections on 2
/// cores): the churn goes on, up to 30 s, until the kernel has shown some, so that an
/// under-count cannot pass as equal zeros.
#[test]
fn hits_the_kernel_skipped_are_counted_as_missed() {
    let place = Place::new("missed");
    let tracer = Tracer::start(&["--port", &place.port()]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut shown = recursion_misses(tracer.pid());
    while shown.iter().sum::<u64>() == 0 && std::time::Instant::now() < deadline {
        place.ns.run(|| {
            let listener =
                TcpListener::bind(place.server_addr).expect("listening in the namespace");
            thread::scope(|scope| {
                for _ in 0..3 {
                    scope.spawn(|| churn(&listener, 2000));
                }
            });
        });
        shown = recursion_misses(tracer.pid());
    }
    assert!(
        shown.len() >= 2,
        "every program of tcpclose's has a recursion_misses counter: {shown:?}"
    );
    let shown: u64 = shown.iter().sum();
    let run = tracer.stop();
    assert!(run.status.success(), "{run:?}");
    let s = run.summary();
    let missed = s["missed"]
        .as_u64()
        .unwrap_or_else(|| panic!("missed in {s}"));
    assert!(
        shown > 0,
        "no miss in 30 s of full churn: the check would prove nothing ({s})"
    );
    assert!(missed >= shown, "the kernel showed {shown} misses: {s}");
}

/// The `recursion_misses` of each BPF program process `pid` holds (its fdinfo); a program
/// without the counter fails the test.
fn recursion_misses(pid: i32) -> Vec<u64> {
    let mut each = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("fdinfo") {
        let Ok(info) = std::fs::read_to_string(fd.expect("fdinfo entry").path()) else {
            continue;
        };
        if !info.contains("prog_type:") {
            continue;
        }
        let misses = info
            .lines()
            .find_map(|l| l.strip_prefix("recursion_misses:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("a BPF program without recursion_misses:\n{info}"));
        each.push(misses);
    }
    each
}

/// A table full of sockets reported hung still makes room for new ones: the idlest hung socket
/// goes, reported `evicted` with its age, and the leak view (and with it the hung gauge) no
/// longer counts it. Only the servers' ends are followed (`--lport`): 8 of them leak CLOSE_WAIT
/// (the clients closed, the servers never do) in a table of 8; a 9th connection evicts one.
#[test]
fn a_hung_socket_evicted_anyway_is_reported_and_let_go() {
    const LEAKED: usize = 8;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let port = addr.port().to_string();
    let args = [
        "--lport",
        &port,
        "--max-sockets",
        "8",
        "--hung",
        "CLOSE_WAIT=1s",
    ];
    let tracer = Tracer::start(&[&args[..], &["-i", "1h"]].concat());
    let mut servers = Vec::new();
    for _ in 0..LEAKED {
        let client = TcpStream::connect(addr).expect("connect");
        servers.push(listener.accept().expect("accept").0);
        drop(client);
    }
    let hung = |records: &[serde_json::Value]| {
        records.iter().filter(|r| r["type"] == "hung").count() == LEAKED
    };
    if let Err(records) = tracer.wait_for_records(Duration::from_secs(5), hung) {
        panic!("{LEAKED} CLOSE_WAIT sockets reported hung: {records:#?}");
    }
    let client = TcpStream::connect(addr).expect("connect");
    servers.push(listener.accept().expect("accept").0);
    let evicted = |records: &[serde_json::Value]| records.iter().any(|r| r["type"] == "evicted");
    if let Err(records) = tracer.wait_for_records(Duration::from_secs(5), evicted) {
        panic!("a hung socket evicted for the new one: {records:#?}");
    }
    let run = tracer.stop();
    drop((client, servers));
    assert!(run.status.success(), "{run:?}");
    for r in &run.records {
        // Every record as the JSON contract has it (its fields), the evicted one among them.
        tcpclose::render::contract::check(r).unwrap_or_else(|e| panic!("{e}"));
    }
    let evicted: Vec<_> = run.of_type("evicted").collect();
    assert_eq!(evicted.len(), 1, "{evicted:#?}");
    let e = evicted[0];
    assert_eq!(e["state"], "CLOSE_WAIT", "{e}");
    assert_eq!(e["lport"], addr.port(), "{e}");
    assert!(e["age_ns"].as_u64().unwrap_or(0) >= 1_000_000_000, "{e}");
    assert_eq!(e["pid"], std::process::id(), "held by this process: {e}");
    assert_eq!(run.summary()["evicted"], 1, "{}", run.summary());
    // The leak view on exit: 7 still hung, 8 became hung.
    let last = run.of_type("leaks").last().expect("a leak view on exit");
    let ours = &last["leaks"][0];
    assert_eq!(
        (&ours["state"], &ours["hung_now"], &ours["new"]),
        (&"CLOSE_WAIT".into(), &(LEAKED - 1).into(), &LEAKED.into()),
        "{last}"
    );
}
