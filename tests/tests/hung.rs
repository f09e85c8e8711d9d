//! Hung teardowns reported while they happen, against the real kernel: sockets stuck in
//! CLOSE_WAIT (a process that never closes what its peer closed, before and after tcpclose
//! starts), FIN_WAIT2 (a peer that never closes), LAST_ACK and FIN_WAIT1 (a peer whose ACKs never
//! arrive, made with nftables), each reported once its threshold has passed, while it is still
//! stuck, named with the process that holds it, then `resolved` when it moves on; and a minute
//! of normal churn that must report nothing.
//!
//! The test watches tcpclose's output as it comes (`Tracer::wait_for_records`), so "while still
//! stuck" is checked twice: the record was printed before the test unstuck the socket, and its
//! `ts_ns` (CLOCK_MONOTONIC, the test's clock) comes before that moment.
//!
//! Each test has its own port; those that need a misbehaving peer or their own sockets' table run
//! in a network namespace of their own (the port is held on the host, bound and never listening,
//! so that no host socket uses it). The churn test runs for a minute beside the others: its name
//! sorts first so that it starts first.

use std::{
    collections::BTreeMap,
    io::Read,
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    process::{Child, Command, Stdio},
    sync::Mutex,
    thread,
    time::Duration,
};

use serde_json::Value;
use tcpclose_tests::{
    BoundSocket, Run, Tracer, mono_ns,
    netns::Netns,
    process_comm, require_root, spawn_holding, tcp_state,
    tcp_state::*,
    thread_comm, timed,
    timing::{Moment, sleep_until, wait_for},
};

const MS: u64 = 1_000_000;
const SECOND: u64 = 1_000 * MS;
/// Between a state change and the system call or poll that made or saw it.
const TOLERANCE: u64 = 10 * MS;
/// How late after its threshold a hung record may come.
const REPORT_WITHIN: u64 = SECOND;
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Polling interval while a change is due within milliseconds.
const SPIN: Duration = Duration::from_micros(100);
/// Polling interval while waiting for a retransmission.
const POLL: Duration = Duration::from_millis(1);

/// A running tracer, killed if the test fails before stopping it (it would run on otherwise).
struct Tracing(Option<Tracer>);

impl Tracing {
    fn start(args: &[&str]) -> Self {
        Self(Some(Tracer::start(args)))
    }

    /// Waits up to `timeout` for what tcpclose has printed so far to satisfy `done`.
    fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl FnMut(&[Value]) -> bool,
    ) -> Vec<Value> {
        let tracer = self.0.as_ref().expect("running");
        tracer
            .wait_for_records(timeout, done)
            .unwrap_or_else(|records| {
                panic!("{what}: not within {timeout:?}; printed: {records:#?}")
            })
    }

    fn stop(mut self) -> Run {
        self.0.take().expect("running").stop()
    }
}

impl Drop for Tracing {
    fn drop(&mut self) {
        if let Some(tracer) = self.0.take() {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(tracer.pid(), libc::SIGKILL) };
        }
    }
}

/// `sleep 30`, holding sockets the test gave it; killed on drop.
struct Holder {
    child: Option<Child>,
    pid: u32,
}

impl Holder {
    fn spawn(sockets: &[TcpStream]) -> Self {
        let fds: Vec<_> = sockets.iter().map(AsFd::as_fd).collect();
        let child = spawn_holding(
            Command::new("sleep")
                .arg("30")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            &fds,
        )
        .expect("spawning sleep");
        let pid = child.id();
        Self {
            child: Some(child),
            pid,
        }
    }

    /// SIGKILL and reap: its sockets are closed when this returns.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("killing sleep");
            child.wait().expect("reaping sleep");
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A namespace of the test's own and a port for it, held on the host.
struct Place {
    ns: Netns,
    server_addr: SocketAddr,
    _reserved: BoundSocket,
}

fn place(tag: &str) -> Place {
    require_root();
    let reserved = BoundSocket::new(LOCALHOST);
    Place {
        ns: Netns::new(tag),
        server_addr: SocketAddr::new(LOCALHOST, reserved.port),
        _reserved: reserved,
    }
}

impl Place {
    fn port(&self) -> String {
        self.server_addr.port().to_string()
    }

    /// The state of `local -> remote` in the namespace.
    fn state(&self, local: SocketAddr, remote: SocketAddr) -> Option<u8> {
        self.ns.run(|| tcp_state(local, remote))
    }

    /// [`wait_for`] `local -> remote` to be in `state` (`None`: gone), polled in the namespace.
    fn wait_for_state(
        &self,
        (local, remote): (SocketAddr, SocketAddr),
        state: Option<u8>,
        since: u64,
        timeout: Duration,
        interval: Duration,
    ) -> Moment {
        let what = format!("{local} -> {remote} in state {state:?}");
        self.ns.run(|| {
            wait_for(&what, since, timeout, interval, || {
                tcp_state(local, remote) == state
            })
        })
    }

    /// A listener on the place's port and `n` connections to it, accepted: (client, server)
    /// pairs, made in the namespace.
    fn connections(&self, n: usize) -> Vec<(TcpStream, TcpStream)> {
        let addr = self.server_addr;
        self.ns.run(|| {
            let listener = TcpListener::bind(addr).expect("bind in the namespace");
            (0..n)
                .map(|_| {
                    let client = TcpStream::connect(addr).expect("connect");
                    let (server, peer) = listener.accept().expect("accept");
                    assert_eq!(peer, client.local_addr().unwrap());
                    (client, server)
                })
                .collect()
        })
    }

    /// nftables in the namespace: drop every packet sent from `from` to `to`.
    fn drop_packets(&self, from: SocketAddr, to: SocketAddr) {
        self.ns.nft("add table inet tcpclose_hung");
        self.ns.nft(
            "add chain inet tcpclose_hung out { type filter hook output priority 0; policy accept; }",
        );
        self.ns.nft(&format!(
            "add rule inet tcpclose_hung out ip saddr {} tcp sport {} ip daddr {} tcp dport {} drop",
            from.ip(),
            from.port(),
            to.ip(),
            to.port()
        ));
    }

    fn deliver_packets_again(&self) {
        self.ns.nft("delete table inet tcpclose_hung");
    }
}

fn ends(s: &TcpStream) -> (SocketAddr, SocketAddr) {
    (s.local_addr().unwrap(), s.peer_addr().unwrap())
}

fn is_alert(r: &Value, kind: &str, tuple: (SocketAddr, SocketAddr)) -> bool {
    r["type"] == kind && about(r, tuple)
}

/// The record is about the socket `local -> remote`.
fn about(r: &Value, (local, remote): (SocketAddr, SocketAddr)) -> bool {
    r["laddr"] == local.ip().to_string().as_str()
        && r["lport"] == local.port()
        && r["raddr"] == remote.ip().to_string().as_str()
        && r["rport"] == remote.port()
}

fn count(records: &[Value], kind: &str, tuple: (SocketAddr, SocketAddr)) -> usize {
    records.iter().filter(|r| is_alert(r, kind, tuple)).count()
}

/// The one `kind` record (hung or resolved) about `tuple`, and its index in `records`.
fn the_alert<'a>(
    records: &'a [Value],
    kind: &str,
    tuple: (SocketAddr, SocketAddr),
) -> (usize, &'a Value) {
    let found: Vec<_> = records
        .iter()
        .enumerate()
        .filter(|(_, r)| is_alert(r, kind, tuple))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {kind} record for {} -> {}; all records: {records:#?}",
        tuple.0,
        tuple.1
    );
    found[0]
}

fn ns_of(r: &Value, key: &str) -> u64 {
    r[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not ns: {r}"))
}

/// `ns` lies within `(lo, hi)`, give or take `tolerance`.
fn assert_within(r: &Value, what: &str, ns: u64, (lo, hi): (u64, u64), tolerance: u64) {
    assert!(
        ns + tolerance >= lo && ns <= hi + tolerance,
        "{what}: {:.3} ms by the record, {:.3} to {:.3} ms by the test (give or take {:.3} ms): {r}",
        ns as f64 / 1e6,
        lo as f64 / 1e6,
        hi as f64 / 1e6,
        tolerance as f64 / 1e6
    );
}

/// Who the record must name: `pid`/`comm`, and exactly `holders` (processes with the socket
/// open), or, for a socket the test process holds itself, at least `pid` (a child a concurrent
/// test forks holds copies of the test's files until its exec).
struct Owner<'a> {
    pid: u32,
    comm: &'a str,
    holders: Holders,
}

enum Holders {
    Exactly(Vec<u32>),
    Including,
}

/// The fields every hung and resolved record has, and the owner it names.
fn check_alert(
    r: &Value,
    state: &str,
    tuple: (SocketAddr, SocketAddr),
    lower_bound: bool,
    owner: &Owner,
) {
    assert!(about(r, tuple), "about {} -> {}: {r}", tuple.0, tuple.1);
    assert_eq!(r["state"], state, "{r}");
    assert_eq!(r["family"], "ipv4", "{r}");
    assert!(r["time"].is_string() && r["since"].is_string(), "{r}");
    assert_eq!(r["age_is_lower_bound"], lower_bound, "{r}");
    assert_eq!(r["pid"], owner.pid, "{r}");
    assert_eq!(r["comm"], owner.comm, "{r}");
    let holders = r["holders"]
        .as_array()
        .unwrap_or_else(|| panic!("holders: {r}"));
    let pids: Vec<u64> = holders
        .iter()
        .map(|h| {
            h["pid"]
                .as_u64()
                .unwrap_or_else(|| panic!("holder pid: {r}"))
        })
        .collect();
    match &owner.holders {
        Holders::Exactly(expected) => {
            let expected: Vec<u64> = expected.iter().map(|&p| u64::from(p)).collect();
            assert_eq!(pids, expected, "holders: {r}");
        }
        Holders::Including => assert!(pids.contains(&u64::from(owner.pid)), "holders: {r}"),
    }
    for h in holders {
        if h["pid"] == owner.pid {
            assert_eq!(h["comm"], owner.comm, "{r}");
        }
    }
}

/// A hung record (first report) of a socket that entered its state within `entered`: reported
/// once `threshold` had passed and within [`REPORT_WITHIN`] after, before `unstuck` (when the
/// test let it move on).
fn check_hung(r: &Value, threshold: u64, entered: Moment, unstuck: u64) {
    assert_eq!(r["type"], "hung", "{r}");
    assert_eq!(r["again"], false, "{r}");
    let since = ns_of(r, "since_ns");
    let age = ns_of(r, "age_ns");
    let ts = ns_of(r, "ts_ns");
    assert_within(r, "since_ns", since, (entered.lo, entered.hi), TOLERANCE);
    assert!(
        age >= threshold,
        "age_ns below the threshold {threshold}: {r}"
    );
    assert_eq!(
        ts.checked_sub(since),
        Some(age),
        "age_ns = ts_ns - since_ns: {r}"
    );
    assert_within(
        r,
        "ts_ns",
        ts,
        (
            entered.lo + threshold,
            entered.hi + threshold + REPORT_WITHIN,
        ),
        TOLERANCE,
    );
    assert!(
        ts < unstuck,
        "reported at {ts}, after the test let it move on at {unstuck}: {r}"
    );
}

/// The resolved record that follows `hung` (at a later index), made when the socket left its
/// state within `left`.
fn check_resolved(r: &Value, hung: &Value, left: Moment) {
    assert_eq!(r["type"], "resolved", "{r}");
    assert!(r.get("age_ns").is_none() && r.get("again").is_none(), "{r}");
    assert_eq!(
        r["since_ns"], hung["since_ns"],
        "the same stay: {r}\n{hung}"
    );
    let since = ns_of(r, "since_ns");
    let stuck = ns_of(r, "stuck_ns");
    let ts = ns_of(r, "ts_ns");
    assert_eq!(
        ts.checked_sub(since),
        Some(stuck),
        "stuck_ns = ts_ns - since_ns: {r}"
    );
    assert_within(r, "ts_ns", ts, (left.lo, left.hi), TOLERANCE);
    assert!(stuck >= ns_of(hung, "age_ns"), "{r}\n{hung}");
}

/// The run ended cleanly, with its summary last.
fn check_run(run: &Run) {
    assert!(run.status.success(), "{run:?}");
    let summary = run.summary();
    assert_eq!(summary["lost"], 0, "{summary}");
}

/// A process that accepts connections and never closes them (here `sleep`, given the accepted
/// sockets; the test closes its own copies): each client closes, and each of the process's
/// sockets sits in CLOSE_WAIT. Each is reported hung 2 s after the client's FIN, named with the
/// process, counted in the leak view, then resolved when the process is killed (its exit closes
/// them: CLOSE_WAIT -> LAST_ACK, acked at once). Ten sockets hang in the same sweep, so the owner
/// lookup answers a burst. In the host's namespace, on a port of its own.
#[test]
fn close_wait_leak_is_reported_with_the_process_that_holds_it() {
    const LEAKED: usize = 10;
    const THRESHOLD: u64 = 2 * SECOND;
    require_root();
    let listener = TcpListener::bind((LOCALHOST, 0)).expect("bind");
    let server_addr = listener.local_addr().unwrap();
    let port = server_addr.port().to_string();
    let tracer = Tracing::start(&[
        "--port",
        &port,
        "--hung",
        "CLOSE_WAIT=2s",
        "--interval",
        "1s",
    ]);

    let (clients, servers): (Vec<_>, Vec<_>) = (0..LEAKED)
        .map(|_| {
            let client = TcpStream::connect(server_addr).expect("connect");
            let (server, peer) = listener.accept().expect("accept");
            assert_eq!(peer, client.local_addr().unwrap());
            (client, server)
        })
        .unzip();
    let tuples: Vec<_> = servers.iter().map(ends).collect();
    let mut holder = Holder::spawn(&servers);
    drop(servers);
    let (fin, ()) = Moment::of(|| timed(|| drop(clients)));
    let stuck = || {
        tuples
            .iter()
            .all(|&(l, r)| tcp_state(l, r) == Some(CLOSE_WAIT))
    };
    assert!(
        stuck(),
        "every server socket in CLOSE_WAIT after the client's FIN"
    );

    let hung_all = |records: &[Value]| tuples.iter().all(|&t| count(records, "hung", t) > 0);
    tracer.wait_for(
        "every leaked socket reported hung",
        Duration::from_nanos(THRESHOLD + 3 * SECOND),
        hung_all,
    );
    let pid = holder.pid;
    let leak_view_names_it = |records: &[Value]| {
        records.iter().any(|r| {
            r["type"] == "leaks"
                && r["leaks"].as_array().is_some_and(|leaks| {
                    leaks.iter().any(|l| {
                        l["state"] == "CLOSE_WAIT" && l["pid"] == pid && l["hung_now"] == LEAKED
                    })
                })
        })
    };
    tracer.wait_for(
        "the leak view naming sleep",
        Duration::from_secs(3),
        leak_view_names_it,
    );
    assert!(stuck(), "still in CLOSE_WAIT when reported");
    let (killed, ()) = Moment::of(|| holder.kill());
    wait_for(
        "the leaked sockets closed",
        killed.lo,
        Duration::from_secs(2),
        POLL,
        || tuples.iter().all(|&(l, r)| tcp_state(l, r).is_none()),
    );
    // One more leak view with nothing hung.
    thread::sleep(Duration::from_millis(1_200));
    let run = tracer.stop();
    check_run(&run);

    let records = &run.records;
    let owner = Owner {
        pid,
        comm: "sleep",
        holders: Holders::Exactly(vec![pid]),
    };
    let mut last_hung_ts = 0;
    for &tuple in &tuples {
        let (h_at, h) = the_alert(records, "hung", tuple);
        check_alert(h, "CLOSE_WAIT", tuple, false, &owner);
        check_hung(h, THRESHOLD, fin, killed.lo);
        last_hung_ts = last_hung_ts.max(ns_of(h, "ts_ns"));
        let (r_at, r) = the_alert(records, "resolved", tuple);
        assert!(r_at > h_at, "resolved after hung: {r}");
        check_alert(r, "CLOSE_WAIT", tuple, false, &owner);
        check_resolved(r, h, killed);
        assert_within(
            r,
            "stuck_ns",
            ns_of(r, "stuck_ns"),
            fin.to(killed),
            TOLERANCE,
        );
    }
    let hung: Vec<_> = run.of_type("hung").collect();
    assert_eq!(hung.len(), LEAKED, "nothing else hung: {hung:#?}");
    assert_eq!(run.of_type("resolved").count(), LEAKED);

    // The leak view: only this process's CLOSE_WAIT sockets; all hung at once while it held
    // them, each counted new once, none left at the end.
    let views: Vec<_> = run.of_type("leaks").collect();
    let mut new = 0;
    for v in &views {
        for l in v["leaks"].as_array().unwrap_or_else(|| panic!("{v}")) {
            assert_eq!(
                (&l["state"], &l["pid"], &l["comm"]),
                (
                    &Value::from("CLOSE_WAIT"),
                    &Value::from(pid),
                    &Value::from("sleep")
                ),
                "{v}"
            );
            new += l["new"].as_u64().unwrap_or_else(|| panic!("{v}"));
        }
    }
    assert_eq!(
        new, LEAKED as u64,
        "each hung socket counted new once: {views:#?}"
    );
    assert!(
        views.iter().any(|v| {
            let ts = ns_of(v, "ts_ns");
            ts >= last_hung_ts
                && ts < killed.lo
                && v["leaks"][0]["hung_now"] == LEAKED
                && v["leaks"].as_array().map(Vec::len) == Some(1)
        }),
        "a leak view with all {LEAKED} hung while sleep held them: {views:#?}"
    );
    let last = views.last().expect("a leak view on exit");
    assert!(
        last["leaks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["hung_now"] == 0),
        "nothing hung at the end: {last}"
    );
}

/// The leak of [`close_wait_leak_is_reported_with_the_process_that_holds_it`], made before
/// tcpclose starts: found by its start-up snapshot, reported once the threshold has passed
/// counted from start-up (when tcpclose first saw it), its age marked as a lower bound.
fn check_leak_from_before_start_up(place: Option<&Place>) {
    const LEAKED: usize = 3;
    const THRESHOLD: u64 = 2 * SECOND;
    require_root();
    // In the host's namespace (a listener on a free port) or in `place`.
    let host_listener;
    let pairs: Vec<(TcpStream, TcpStream)> = match place {
        Some(place) => place.connections(LEAKED),
        None => {
            host_listener = TcpListener::bind((LOCALHOST, 0)).expect("bind");
            (0..LEAKED)
                .map(|_| {
                    let client =
                        TcpStream::connect(host_listener.local_addr().unwrap()).expect("connect");
                    let (server, _) = host_listener.accept().expect("accept");
                    (client, server)
                })
                .collect()
        }
    };
    let state = |(l, r): (SocketAddr, SocketAddr)| match place {
        Some(place) => place.state(l, r),
        None => tcp_state(l, r),
    };
    let (clients, servers): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
    let tuples: Vec<_> = servers.iter().map(ends).collect();
    let port = tuples[0].0.port().to_string();
    let mut holder = Holder::spawn(&servers);
    drop(servers);
    let (fin, ()) = Moment::of(|| timed(|| drop(clients)));
    let stuck = || tuples.iter().all(|&t| state(t) == Some(CLOSE_WAIT));
    assert!(
        stuck(),
        "every server socket in CLOSE_WAIT after the client's FIN"
    );
    sleep_until(fin.hi + 500 * MS);

    let (started, tracer) =
        Moment::of(|| Tracing::start(&["--port", &port, "--hung", "CLOSE_WAIT=2s"]));
    let hung_all = |records: &[Value]| tuples.iter().all(|&t| count(records, "hung", t) > 0);
    tracer.wait_for(
        "every leaked socket reported hung",
        Duration::from_nanos(THRESHOLD + 3 * SECOND),
        hung_all,
    );
    assert!(stuck(), "still in CLOSE_WAIT when reported");
    let (killed, ()) = Moment::of(|| holder.kill());
    wait_for(
        "the leaked sockets closed",
        killed.lo,
        Duration::from_secs(2),
        POLL,
        || tuples.iter().all(|&t| state(t).is_none()),
    );
    thread::sleep(Duration::from_millis(300));
    let run = tracer.stop();
    check_run(&run);

    let records = &run.records;
    let owner = Owner {
        pid: holder.pid,
        comm: "sleep",
        holders: Holders::Exactly(vec![holder.pid]),
    };
    for &tuple in &tuples {
        let (h_at, h) = the_alert(records, "hung", tuple);
        check_alert(h, "CLOSE_WAIT", tuple, true, &owner);
        // Seen in CLOSE_WAIT at start-up: the threshold counts from there.
        check_hung(h, THRESHOLD, started, killed.lo);
        let (r_at, r) = the_alert(records, "resolved", tuple);
        assert!(r_at > h_at, "resolved after hung: {r}");
        check_alert(r, "CLOSE_WAIT", tuple, true, &owner);
        check_resolved(r, h, killed);
    }
    assert_eq!(run.of_type("hung").count(), LEAKED, "{records:#?}");
    assert_eq!(run.of_type("resolved").count(), LEAKED, "{records:#?}");
}

#[test]
fn close_wait_leak_from_before_start_up_is_reported_counted_from_start_up() {
    check_leak_from_before_start_up(None);
}

/// The same in a network namespace of its own (a container's): tcpclose follows every namespace
/// (the tracepoint sees them all, and owners are looked up in all of them), so a leak there that
/// predates it is just as much a leak.
#[test]
fn close_wait_leak_from_before_start_up_in_another_namespace_is_reported() {
    let place = place("before");
    check_leak_from_before_start_up(Some(&place));
}

/// FIN_WAIT2 whose peer never closes, two ways: a client that shut down its sending side and
/// keeps its socket (the full socket stays in FIN_WAIT2, held by the test process), and one that
/// closed it (the kernel hands the orphan to a timewait socket in FIN_WAIT2, which no process
/// holds: named after the thread that closed it). The servers keep their sockets open. Both are
/// reported after 1 s; when the servers close (3 s after, so that the FIN moves the timewait
/// socket's timer to another bucket of the timer wheel: a timer event tells tcpclose), both go
/// to TIME_WAIT: resolved.
#[test]
fn fin_wait2_hang_when_the_peer_never_closes() {
    const THRESHOLD: u64 = SECOND;
    let place = place("finwait2");
    let tracer = Tracing::start(&["--port", &place.port(), "--hung", "FIN_WAIT2=1s"]);
    let mut pairs = place.connections(2).into_iter();
    let (half_closed, half_server) = pairs.next().unwrap();
    let (closed, closed_server) = pairs.next().unwrap();
    let half = ends(&half_closed);
    let orphan = ends(&closed);

    let (shut, ()) = Moment::of(|| timed(|| half_closed.shutdown(Shutdown::Write).unwrap()));
    let half_fw2 =
        place.wait_for_state(half, Some(FIN_WAIT2), shut.lo, Duration::from_secs(1), SPIN);
    let (dropped, ()) = Moment::of(|| timed(|| drop(closed)));
    let orphan_fw2 = place.wait_for_state(
        orphan,
        Some(FIN_WAIT2),
        dropped.lo,
        Duration::from_secs(1),
        SPIN,
    );
    let stuck = || {
        place.state(half.0, half.1) == Some(FIN_WAIT2)
            && place.state(orphan.0, orphan.1) == Some(FIN_WAIT2)
    };

    tracer.wait_for(
        "both clients reported hung",
        Duration::from_nanos(THRESHOLD + 3 * SECOND),
        |records| count(records, "hung", half) > 0 && count(records, "hung", orphan) > 0,
    );
    assert!(stuck(), "still in FIN_WAIT2 when reported");
    sleep_until(orphan_fw2.hi + 3 * SECOND);
    assert!(stuck(), "still in FIN_WAIT2");
    let (peer_closed, ()) = Moment::of(|| {
        timed(|| {
            drop(half_server);
            drop(closed_server);
        })
    });
    for tuple in [half, orphan] {
        assert_eq!(
            place.state(tuple.0, tuple.1),
            Some(TIME_WAIT),
            "the peer's FIN came"
        );
    }
    thread::sleep(Duration::from_millis(300));
    let run = tracer.stop();
    check_run(&run);
    let records = &run.records;

    let me = std::process::id();
    let process = process_comm();
    let held = Owner {
        pid: me,
        comm: &process,
        holders: Holders::Including,
    };
    let thread = thread_comm();
    let orphaned = Owner {
        pid: me,
        comm: &thread,
        holders: Holders::Exactly(vec![]),
    };
    for (tuple, entered, owner) in [(half, half_fw2, &held), (orphan, orphan_fw2, &orphaned)] {
        let (h_at, h) = the_alert(records, "hung", tuple);
        check_alert(h, "FIN_WAIT2", tuple, false, owner);
        check_hung(h, THRESHOLD, entered, peer_closed.lo);
        let (r_at, r) = the_alert(records, "resolved", tuple);
        assert!(r_at > h_at, "resolved after hung: {r}");
        check_alert(r, "FIN_WAIT2", tuple, false, owner);
        check_resolved(r, h, peer_closed);
        assert_within(
            r,
            "stuck_ns",
            ns_of(r, "stuck_ns"),
            entered.to(peer_closed),
            TOLERANCE,
        );
    }
    assert_eq!(run.of_type("hung").count(), 2, "{records:#?}");
    assert_eq!(run.of_type("resolved").count(), 2, "{records:#?}");
    drop(half_closed);
}

/// LAST_ACK whose ACK never comes: the client closes first (its orphan waits in FIN_WAIT2 on a
/// timewait socket) and the server reads its FIN (CLOSE_WAIT); then nftables drops everything
/// the client sends, and the server closes: LAST_ACK, its FIN received by the client (TIME_WAIT)
/// but the client's ACK dropped, the FIN retransmitted. Reported after 1 s (an orphan: named
/// after the thread that closed it, no holders); with the packets delivered again, the next
/// retransmission is acked: resolved.
#[test]
fn last_ack_hang_when_the_peers_ack_never_arrives() {
    const THRESHOLD: u64 = SECOND;
    let place = place("lastack");
    let tracer = Tracing::start(&["--port", &place.port(), "--hung", "LAST_ACK=1s"]);
    let (client, mut server) = place.connections(1).pop().unwrap();
    let client_side = ends(&client);
    let server_side = ends(&server);

    let (client_closed, ()) = Moment::of(|| timed(|| drop(client)));
    assert_eq!(server.read(&mut [0; 16]).expect("read"), 0, "EOF");
    // The server's ACK of the FIN may be delayed a little.
    place.wait_for_state(
        client_side,
        Some(FIN_WAIT2),
        client_closed.lo,
        Duration::from_secs(1),
        SPIN,
    );
    place.drop_packets(client_side.0, client_side.1);
    let (closed, ()) = Moment::of(|| timed(|| drop(server)));
    let stuck = || place.state(server_side.0, server_side.1) == Some(LAST_ACK);
    assert!(stuck(), "LAST_ACK after close");
    assert_eq!(
        place.state(client_side.0, client_side.1),
        Some(TIME_WAIT),
        "the server's FIN arrived"
    );

    tracer.wait_for(
        "the server reported hung",
        Duration::from_nanos(THRESHOLD + 3 * SECOND),
        |records| count(records, "hung", server_side) > 0,
    );
    assert!(stuck(), "still in LAST_ACK when reported");
    let unstuck = mono_ns();
    place.deliver_packets_again();
    let acked = place.wait_for_state(server_side, None, unstuck, Duration::from_secs(10), POLL);
    thread::sleep(Duration::from_millis(300));
    let run = tracer.stop();
    check_run(&run);
    let records = &run.records;

    let thread = thread_comm();
    let owner = Owner {
        pid: std::process::id(),
        comm: &thread,
        holders: Holders::Exactly(vec![]),
    };
    let (h_at, h) = the_alert(records, "hung", server_side);
    check_alert(h, "LAST_ACK", server_side, false, &owner);
    check_hung(h, THRESHOLD, closed, unstuck);
    let (r_at, r) = the_alert(records, "resolved", server_side);
    assert!(r_at > h_at, "resolved after hung: {r}");
    check_alert(r, "LAST_ACK", server_side, false, &owner);
    check_resolved(r, h, acked);
    assert_within(
        r,
        "stuck_ns",
        ns_of(r, "stuck_ns"),
        closed.to(acked),
        TOLERANCE,
    );
    assert_eq!(run.of_type("hung").count(), 1, "{records:#?}");
    assert_eq!(run.of_type("resolved").count(), 1, "{records:#?}");
}

/// FIN_WAIT1 whose peer stops acknowledging: nftables drops everything the server sends, then
/// the client shuts down its sending side (and keeps its socket: held by the test process). The
/// server gets the FIN (CLOSE_WAIT), its ACK is dropped, the client retransmits. Reported after
/// 1 s; with the packets delivered again, the next retransmission is acked (FIN_WAIT2): resolved.
#[test]
fn fin_wait1_hang_when_the_peer_stops_acknowledging() {
    const THRESHOLD: u64 = SECOND;
    let place = place("finwait1");
    let tracer = Tracing::start(&["--port", &place.port(), "--hung", "FIN_WAIT1=1s"]);
    let (client, server) = place.connections(1).pop().unwrap();
    let client_side = ends(&client);
    let server_side = ends(&server);

    place.drop_packets(server_side.0, server_side.1);
    let (shut, ()) = Moment::of(|| timed(|| client.shutdown(Shutdown::Write).unwrap()));
    let stuck = || place.state(client_side.0, client_side.1) == Some(FIN_WAIT1);
    assert!(stuck(), "FIN_WAIT1 after shutdown");
    assert_eq!(
        place.state(server_side.0, server_side.1),
        Some(CLOSE_WAIT),
        "the client's FIN arrived"
    );

    tracer.wait_for(
        "the client reported hung",
        Duration::from_nanos(THRESHOLD + 3 * SECOND),
        |records| count(records, "hung", client_side) > 0,
    );
    assert!(stuck(), "still in FIN_WAIT1 when reported");
    let unstuck = mono_ns();
    place.deliver_packets_again();
    let acked = place.wait_for_state(
        client_side,
        Some(FIN_WAIT2),
        unstuck,
        Duration::from_secs(10),
        POLL,
    );
    thread::sleep(Duration::from_millis(300));
    let run = tracer.stop();
    check_run(&run);
    let records = &run.records;

    let process = process_comm();
    let owner = Owner {
        pid: std::process::id(),
        comm: &process,
        holders: Holders::Including,
    };
    let (h_at, h) = the_alert(records, "hung", client_side);
    check_alert(h, "FIN_WAIT1", client_side, false, &owner);
    check_hung(h, THRESHOLD, shut, unstuck);
    let (r_at, r) = the_alert(records, "resolved", client_side);
    assert!(r_at > h_at, "resolved after hung: {r}");
    check_alert(r, "FIN_WAIT1", client_side, false, &owner);
    check_resolved(r, h, acked);
    assert_within(
        r,
        "stuck_ns",
        ns_of(r, "stuck_ns"),
        shut.to(acked),
        TOLERANCE,
    );
    assert_eq!(run.of_type("hung").count(), 1, "{records:#?}");
    assert_eq!(run.of_type("resolved").count(), 1, "{records:#?}");
    drop((client, server));
}

/// How one churned connection ends: who closes first, whether with close() (an orphan) or
/// shutdown(SHUT_WR) (closed once the peer's FIN came), and how long the peer waits after
/// reading the FIN before it closes too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Variant {
    server_first: bool,
    shutdown: bool,
    delay_ms: u64,
}

const DELAYS_MS: [u64; 6] = [0, 1, 20, 100, 250, 500];

fn variant(i: usize) -> Variant {
    Variant {
        server_first: i % 2 == 1,
        shutdown: (i / 2) % 2 == 1,
        delay_ms: DELAYS_MS[(i / 4) % DELAYS_MS.len()],
    }
}

/// A churned connection.
struct Churned {
    port: u16,
    v: Variant,
    start: u64,
    end: u64,
}

/// One connection, opened and closed normally as `v` says: every teardown state lasts at most
/// `v.delay_ms` plus what loopback takes, far below the 1 s threshold.
fn churn_one(listener: &Mutex<TcpListener>, addr: SocketAddr, v: Variant) -> SocketAddr {
    let (client, server) = {
        let listener = listener.lock().unwrap();
        let client = TcpStream::connect(addr).expect("connect");
        let (server, peer) = listener.accept().expect("accept");
        assert_eq!(peer, client.local_addr().unwrap());
        (client, server)
    };
    let client_addr = client.local_addr().unwrap();
    let (first, mut second) = if v.server_first {
        (server, client)
    } else {
        (client, server)
    };
    let mut first = if v.shutdown {
        first.shutdown(Shutdown::Write).expect("shutdown");
        Some(first)
    } else {
        drop(first);
        None
    };
    assert_eq!(second.read(&mut [0; 16]).expect("read"), 0, "EOF");
    thread::sleep(Duration::from_millis(v.delay_ms));
    drop(second);
    if let Some(mut first) = first.take() {
        assert_eq!(first.read(&mut [0; 16]).expect("read"), 0, "EOF");
    }
    client_addr
}

/// A minute of connections opened and closed normally, in both orders, with close() and with
/// shutdown(), the peer closing 0 to 500 ms after the first FIN, from several threads at once,
/// with every teardown state watched at 1 s (`--hung 1s`): no socket hangs, so no hung or
/// resolved record, and the leak view stays empty. Every connection's passive side is reported.
#[test]
fn a_minute_of_normal_churn_reports_nothing_hung() {
    const WORKERS: usize = 6;
    const CHURN: u64 = 57 * SECOND;
    let place = place("churn");
    let server_addr = place.server_addr;
    let tracer = Tracing::start(&["--port", &place.port(), "--hung", "1s", "--interval", "10s"]);
    let listener = Mutex::new(
        place
            .ns
            .run(|| TcpListener::bind(server_addr))
            .expect("bind in the namespace"),
    );
    let end = mono_ns() + CHURN;
    // Each connection: its client port, how it was closed, and when it was opened and closed
    // (ports are reused within the minute).
    let churned: Mutex<Vec<Churned>> = Mutex::new(Vec::new());
    thread::scope(|scope| {
        for worker in 0..WORKERS {
            let (listener, churned, ns) = (&listener, &churned, &place.ns);
            scope.spawn(move || {
                ns.run(|| {
                    let mut i = worker;
                    while mono_ns() < end {
                        let v = variant(i);
                        let start = mono_ns();
                        let client = churn_one(listener, server_addr, v);
                        churned.lock().unwrap().push(Churned {
                            port: client.port(),
                            v,
                            start,
                            end: mono_ns(),
                        });
                        i += WORKERS;
                        thread::sleep(Duration::from_millis(10));
                    }
                })
            });
        }
    });
    thread::sleep(Duration::from_millis(500));
    let run = tracer.stop();
    check_run(&run);
    let churned = churned.into_inner().unwrap();
    let connections = churned.len();
    assert!(connections > 1_000, "{connections} connections");

    // Each unexpected alert, with how its connection was closed and, for a hung one, when the
    // other side's passive close ended (its FIN acked by this side, which had then left
    // FIN_WAIT2 for TIME_WAIT, or CLOSE_WAIT for LAST_ACK).
    let alerts: Vec<&Value> = run
        .records
        .iter()
        .filter(|r| r["type"] == "hung" || r["type"] == "resolved")
        .collect();
    let mut tally = BTreeMap::<String, usize>::new();
    let mut examples = Vec::new();
    for r in &alerts {
        let lport = r["lport"].as_u64().unwrap_or(0) as u16;
        let rport = r["rport"].as_u64().unwrap_or(0) as u16;
        let side = if lport == server_addr.port() {
            "server"
        } else {
            "client"
        };
        let client_port = if side == "server" { rport } else { lport };
        let since = r["since_ns"].as_u64().unwrap_or(0);
        let connection = churned
            .iter()
            .find(|c| c.port == client_port && (c.start..=c.end).contains(&since));
        let how = connection.map_or("?".to_owned(), |&Churned { v, .. }| {
            format!(
                "{} side, {} {} first, peer closed {} ms after",
                side,
                if v.server_first { "server" } else { "client" },
                if v.shutdown { "shut down" } else { "closed" },
                v.delay_ms
            )
        });
        let n = tally
            .entry(format!("{} {}: {how}", r["type"], r["state"]))
            .or_default();
        *n += 1;
        // One example of each.
        if *n == 1 && examples.len() < 12 {
            let peer_end = run.of_type("teardown").find(|t| {
                t["lport"] == rport
                    && t["rport"] == lport
                    && t["close"] == "passive"
                    && connection.is_some_and(|c| {
                        (c.start..=c.end + SECOND).contains(&t["ts_ns"].as_u64().unwrap_or(0))
                    })
            });
            let before = peer_end.map_or("no record of the peer's close".to_owned(), |t| {
                let gap = r["ts_ns"].as_i64().unwrap_or(0) - t["ts_ns"].as_i64().unwrap_or(0);
                format!(
                    "the peer's passive close ended {:.1} ms before",
                    gap as f64 / 1e6
                )
            });
            examples.push(format!("{how}; {before}:\n  {r}"));
        }
    }
    assert!(
        alerts.is_empty(),
        "{} alerts about {connections} connections closed normally, by kind and how the \
         connection was closed:\n{}\nexamples:\n{}",
        alerts.len(),
        tally
            .iter()
            .map(|(k, n)| format!("{n:5} {k}"))
            .collect::<Vec<_>>()
            .join("\n"),
        examples.join("\n")
    );
    for v in run.of_type("leaks") {
        assert_eq!(v["leaks"], Value::Array(vec![]), "nothing hung: {v}");
    }
    assert!(run.of_type("leaks").count() >= 5, "every 10 s and on exit");
    let passive = run
        .of_type("teardown")
        .filter(|r| r["close"] == "passive")
        .count();
    assert_eq!(passive, connections, "one passive close per connection");
}
