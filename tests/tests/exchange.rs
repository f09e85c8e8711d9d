//! Exact transition sequences of a client and an accepted socket, their addresses, owners and
//! timing, on the real kernel.
//!
//! Owners are checked here, in a test binary of their own whose tests run one at a time: a
//! `fork()` in a concurrent test would hold this test's sockets until its `exec()` closes them
//! (close-on-exec), and the kernel would then rightly report the child as the closer.

use std::{
    io::Read,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, TcpStream},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tcpclose_tests::{BoundSocket, Run, Tracer, arrow, churn, thread_comm, timing::Moment};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const CLIENT_SEQUENCE: [&str; 5] = [
    "CLOSE->SYN_SENT",
    "SYN_SENT->ESTABLISHED",
    "ESTABLISHED->FIN_WAIT1",
    "FIN_WAIT1->FIN_WAIT2",
    // The orphaned socket is handed to a timewait socket at once (tcp_time_wait -> tcp_done).
    "FIN_WAIT2->CLOSE",
];
const SERVER_SEQUENCE: [&str; 5] = [
    // The child is cloned from the listener (inet_csk_clone_lock -> inet_sk_set_state).
    "LISTEN->SYN_RECV",
    "SYN_RECV->ESTABLISHED",
    "ESTABLISHED->CLOSE_WAIT",
    "CLOSE_WAIT->LAST_ACK",
    "LAST_ACK->CLOSE",
];
/// Transitions made by a system call of this test: pid and comm must be ours.
const SYSCALL_MADE: [&str; 5] = [
    "CLOSE->LISTEN",
    "CLOSE->SYN_SENT",
    "ESTABLISHED->FIN_WAIT1",
    "CLOSE_WAIT->LAST_ACK",
    "LISTEN->CLOSE",
];
const PEER_CLOSE_DELAY: Duration = Duration::from_millis(200);

struct Exchange {
    run: Run,
    server_port: u16,
    client_port: u16,
    /// The server's CLOSE_WAIT by the test's clock, shortest and longest: from the client's close
    /// (or, at the latest, the server reading its EOF) to the server's close.
    close_wait: (u64, u64),
    comm: String,
}

/// Client connects and closes first; the server reads EOF, waits 200 ms, closes.
fn client_closes_first(ip: IpAddr) -> Exchange {
    let bound = BoundSocket::new(ip);
    let server_port = bound.port;
    let tracer = Tracer::start(&["--events", "--port", &server_port.to_string()]);
    let listener = bound.listen();

    let client = TcpStream::connect(std::net::SocketAddr::new(ip, server_port)).expect("connect");
    let client_port = client.local_addr().unwrap().port();
    let (mut server, _) = listener.accept().expect("accept");

    let (closed, ()) = Moment::of(|| drop(client));
    let mut buf = [0u8; 16];
    let (eof, read) = Moment::of(|| server.read(&mut buf).expect("read EOF"));
    assert_eq!(read, 0);
    thread::sleep(PEER_CLOSE_DELAY);
    let (server_closed, ()) = Moment::of(|| drop(server));
    // CLOSE_WAIT starts as the client's FIN is processed: after the client's close began, before
    // the server read its EOF; it ends inside the server's close.
    let close_wait = (
        server_closed.lo.saturating_sub(eof.hi),
        server_closed.hi - closed.lo,
    );
    drop(listener);
    // Let the last ACK arrive before stopping.
    thread::sleep(Duration::from_millis(100));

    Exchange {
        run: tracer.stop(),
        server_port,
        client_port,
        close_wait,
        comm: thread_comm(),
    }
}

fn socket_with<'a>(run: &'a Run, arrow_and_lport: (&str, u16)) -> Vec<&'a Value> {
    let by_socket = run.by_socket();
    let matches: Vec<_> = by_socket
        .values()
        .filter(|events| {
            events
                .iter()
                .any(|t| arrow(t) == arrow_and_lport.0 && t["lport"] == arrow_and_lport.1)
        })
        .cloned()
        .collect();
    assert_eq!(
        matches.len(),
        1,
        "one socket with {arrow_and_lport:?}: {by_socket:#?}"
    );
    matches.into_iter().next().unwrap()
}

fn check_exchange(ip: IpAddr, family: &str) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let x = client_closes_first(ip);
    assert!(x.run.status.success(), "{:?}", x.run);
    for r in &x.run.records {
        // Transition and summary records as the JSON contract has them.
        tcpclose::render::contract::check(r).unwrap_or_else(|e| panic!("{e}"));
    }
    let ip_s = ip.to_string();

    let client = socket_with(&x.run, ("SYN_SENT->ESTABLISHED", x.client_port));
    let arrows: Vec<_> = client.iter().map(|t| arrow(t)).collect();
    assert_eq!(arrows, CLIENT_SEQUENCE, "client socket");
    let server = socket_with(&x.run, ("SYN_RECV->ESTABLISHED", x.server_port));
    let arrows: Vec<_> = server.iter().map(|t| arrow(t)).collect();
    assert_eq!(arrows, SERVER_SEQUENCE, "accepted socket");

    // Addresses. connect() reports CLOSE->SYN_SENT before the local port is chosen.
    for t in &client[1..] {
        assert_eq!(t["family"], family);
        assert_eq!(t["laddr"], ip_s.as_str());
        assert_eq!(t["lport"], x.client_port);
        assert_eq!(t["raddr"], ip_s.as_str());
        assert_eq!(t["rport"], x.server_port);
    }
    assert_eq!(client[0]["raddr"], ip_s.as_str());
    assert_eq!(client[0]["rport"], x.server_port);
    for t in &server {
        assert_eq!(t["family"], family);
        assert_eq!(t["laddr"], ip_s.as_str());
        assert_eq!(t["lport"], x.server_port);
        assert_eq!(t["raddr"], ip_s.as_str());
        assert_eq!(t["rport"], x.client_port);
    }

    // Owners: ours for system-call transitions, absent for the others.
    let pid = std::process::id();
    let mut owned = Vec::new();
    for t in x.run.transitions() {
        let a = arrow(t);
        if SYSCALL_MADE.contains(&a.as_str()) {
            assert_eq!(t["pid"], pid, "{t}");
            assert_eq!(t["comm"], x.comm.as_str(), "{t}");
            owned.push(a);
        } else {
            assert!(t["pid"].is_null() && t["comm"].is_null(), "{t}");
        }
    }
    owned.sort();
    let mut expected = SYSCALL_MADE.map(String::from).to_vec();
    expected.sort();
    assert_eq!(owned, expected, "each system-call transition seen once");

    // Time in state: blank where tcpclose did not see the socket enter OLD, else measured.
    assert!(client[0]["in_old_ns"].is_null(), "never saw it enter CLOSE");
    assert!(
        server[0]["in_old_ns"].is_null(),
        "new child: never saw it enter LISTEN"
    );
    for t in client[1..].iter().chain(&server[1..]) {
        assert!(t["in_old_ns"].is_u64(), "{t}");
    }
    let close_wait = server
        .iter()
        .find(|t| arrow(t) == "CLOSE_WAIT->LAST_ACK")
        .and_then(|t| t["in_old_ns"].as_u64())
        .expect("CLOSE_WAIT duration");
    let (lo, hi) = x.close_wait;
    assert!(
        close_wait + 5_000_000 >= lo && close_wait <= hi + 5_000_000,
        "CLOSE_WAIT lasted {close_wait} ns by the kernel, {lo} to {hi} ns by the test"
    );
    // Timestamps are the kernel's, in order.
    for pair in server.windows(2) {
        assert!(pair[0]["ts_ns"].as_u64() <= pair[1]["ts_ns"].as_u64());
    }

    let summary = x.run.summary();
    assert_eq!(summary["lost"], 0, "{summary}");
    assert_eq!(summary["undecodable"], 0, "{summary}");
    let seen = x.run.transitions().len() as u64;
    assert_eq!(summary["transitions"], seen, "{summary}");
    assert_eq!(summary["matched"], seen, "{summary}");
}

#[test]
fn ipv4_exchange_closing_client_first() {
    check_exchange(IpAddr::V4(Ipv4Addr::LOCALHOST), "ipv4");
}

#[test]
fn ipv6_exchange_closing_client_first() {
    check_exchange(IpAddr::V6(Ipv6Addr::LOCALHOST), "ipv6");
}

#[test]
fn text_output_for_people() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut child = tcpclose_tests::spawn(
        std::process::Command::new(tcpclose_tests::binary())
            .args(["--events", "--port", &port.to_string(), "--duration", "3s"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
    )
    .unwrap();
    // It says on stderr when it has attached (the text mode's stdout has no ready signal).
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut said = String::new();
    while !said.lines().any(|line| line.starts_with("Tracing")) {
        let read = std::io::BufRead::read_line(&mut stderr, &mut said).expect("reading stderr");
        assert!(read > 0, "tcpclose ended before it attached: {said}");
    }
    let started = Instant::now();
    churn(&listener, 1);
    let mut out = tcpclose_tests::output_with_deadline("tcpclose", child, Duration::from_secs(20));
    std::io::Read::read_to_string(&mut stderr, &mut said).expect("reading stderr");
    out.stderr = said.into_bytes();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "--duration ends the run"
    );
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let mut lines = stdout.lines();
    let header = lines.next().expect("header");
    for column in [
        "TIME",
        "PID",
        "COMM",
        "LADDR:LPORT",
        "RADDR:RPORT",
        "OLD",
        "NEW",
        "MS",
    ] {
        assert!(header.contains(column), "{header}");
    }
    let fin = stdout
        .lines()
        .find(|l| l.contains("ESTABLISHED -> FIN_WAIT1"))
        .unwrap_or_else(|| panic!("no close line in:\n{stdout}"));
    assert!(fin.contains(&std::process::id().to_string()), "{fin}");
    assert!(fin.contains(&format!("127.0.0.1:{port}")), "{fin}");
    assert!(
        stderr.contains("transitions in") && stderr.contains("0 lost"),
        "{stderr}"
    );
}
