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
    io::{Read, Write as _},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    process::{Child, Command, Stdio},
    sync::Mutex,
    thread,
    time::Duration,
};

use serde_json::Value;
use tcpclose_tests::{
    Run, Tracing, about, mono_ns,
    netns::{Addresses, Place},
    process_comm, require_root, spawn_holding, tcp_state,
    tcp_state::*,
    thread_comm, timed,
    timing::{MS, Moment, POLL, assert_within, sleep_until, wait_for},
};

const SECOND: u64 = 1_000 * MS;
/// Between a state change and the system call or poll that made or saw it.
const TOLERANCE: u64 = 10 * MS;
/// How late after its threshold a hung record may come.
const REPORT_WITHIN: u64 = SECOND;
/// How long a FIN sent on loopback may take to be processed (see [`Place::wait_for_state`]).
const FIN_DUE: Duration = Duration::from_secs(2);
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

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
            let reaped = tcpclose_tests::wait_with_deadline(&mut child, Duration::from_secs(10));
            assert!(reaped.is_some(), "sleep survived SIGKILL");
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.kill();
    }
}

fn ends(s: &TcpStream) -> (SocketAddr, SocketAddr) {
    (s.local_addr().unwrap(), s.peer_addr().unwrap())
}

fn is_alert(r: &Value, kind: &str, tuple: (SocketAddr, SocketAddr)) -> bool {
    r["type"] == kind && about(r, tuple)
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

/// Waits until tcpclose has reported each of `tuples` hung (`what`): by `threshold` and 3 s more.
fn wait_for_hung(
    tracer: &Tracing,
    what: &str,
    threshold: u64,
    tuples: &[(SocketAddr, SocketAddr)],
) {
    tracer.wait_for(
        what,
        Duration::from_nanos(threshold + 3 * SECOND),
        |records| {
            tuples
                .iter()
                .all(|&t| records.iter().any(|r| is_alert(r, "hung", t)))
        },
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
    // An IPv6 socket's, IPv4 on one (`::ffff:127.0.0.1`) included.
    let family = if tuple.0.is_ipv6() { "ipv6" } else { "ipv4" };
    assert_eq!(r["family"], family, "{r}");
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

/// Sockets a test made hang in `state` and then let move on, all at once: at `unstuck`, after
/// which they left the state within `left`.
struct Hang<'a> {
    state: &'a str,
    threshold: u64,
    /// Found in the state at tcpclose's start-up: their age is a lower bound.
    found_at_start_up: bool,
    unstuck: u64,
    left: Moment,
}

impl Hang<'_> {
    /// The one hung record about `tuple`, which entered the state within `entered` (for a socket
    /// found at start-up: when tcpclose started), and the one resolved record after it, both
    /// naming `owner`; returns the hung one. The resolved record's `stuck_ns` spans the stay,
    /// when it is known from its start.
    fn check<'r>(
        &self,
        records: &'r [Value],
        tuple: (SocketAddr, SocketAddr),
        owner: &Owner,
        entered: Moment,
    ) -> &'r Value {
        let lower_bound = self.found_at_start_up;
        let (h_at, h) = the_alert(records, "hung", tuple);
        check_alert(h, self.state, tuple, lower_bound, owner);
        check_hung(h, self.threshold, entered, self.unstuck);
        let (r_at, r) = the_alert(records, "resolved", tuple);
        assert!(r_at > h_at, "resolved after hung: {r}");
        check_alert(r, self.state, tuple, lower_bound, owner);
        check_resolved(r, h, self.left);
        if !lower_bound {
            assert_within(
                r,
                "stuck_ns",
                ns_of(r, "stuck_ns"),
                entered.to(self.left),
                TOLERANCE,
            );
        }
        h
    }
}

/// The run printed `hung` hung records and as many resolved ones.
fn check_alert_counts(run: &Run, hung: usize) {
    assert_eq!(run.of_type("hung").count(), hung, "{:#?}", run.records);
    assert_eq!(run.of_type("resolved").count(), hung, "{:#?}", run.records);
}

/// Server sockets left in CLOSE_WAIT, in the host's namespace or in `place`: given to a
/// [`Holder`] (the test closes its own copies), their clients closed at `fin`.
struct Leak<'a> {
    place: Option<&'a Place>,
    tuples: Vec<(SocketAddr, SocketAddr)>,
    holder: Holder,
    fin: Moment,
}

impl<'a> Leak<'a> {
    /// Leaks the server side of `pairs` (client, server), made in `place` (or the host's
    /// namespace).
    fn make(place: Option<&'a Place>, pairs: Vec<(TcpStream, TcpStream)>) -> Self {
        let (clients, servers): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
        let tuples = servers.iter().map(ends).collect();
        let holder = Holder::spawn(&servers);
        drop(servers);
        let (fin, ()) = Moment::of(|| timed(|| drop(clients)));
        let mut leak = Self {
            place,
            tuples,
            holder,
            fin,
        };
        // At once on a fast machine; an emulated guest may leave loopback's softirq work to
        // ksoftirqd.
        let reached = wait_for(
            "every server socket in CLOSE_WAIT after the client's FIN",
            fin.lo,
            FIN_DUE,
            POLL,
            || leak.stuck(),
        );
        leak.fin.hi = leak.fin.hi.max(reached.hi);
        leak
    }

    fn state(&self, (local, remote): (SocketAddr, SocketAddr)) -> Option<u8> {
        match self.place {
            Some(place) => place.state((local, remote)),
            None => tcp_state(local, remote),
        }
    }

    fn stuck(&self) -> bool {
        self.tuples
            .iter()
            .all(|&t| self.state(t) == Some(CLOSE_WAIT))
    }

    /// Kills the holder, whose exit closes the sockets, and waits for them to be gone: when it
    /// was killed.
    fn end(&mut self) -> Moment {
        let (killed, ()) = Moment::of(|| self.holder.kill());
        wait_for(
            "the leaked sockets closed",
            killed.lo,
            Duration::from_secs(2),
            POLL,
            || self.tuples.iter().all(|&t| self.state(t).is_none()),
        );
        killed
    }
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

    let pairs = (0..LEAKED)
        .map(|_| {
            let client = TcpStream::connect(server_addr).expect("connect");
            let (server, peer) = listener.accept().expect("accept");
            assert_eq!(peer, client.local_addr().unwrap());
            (client, server)
        })
        .collect();
    let mut leak = Leak::make(None, pairs);

    wait_for_hung(
        &tracer,
        "every leaked socket reported hung",
        THRESHOLD,
        &leak.tuples,
    );
    let pid = leak.holder.pid;
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
    assert!(leak.stuck(), "still in CLOSE_WAIT when reported");
    let killed = leak.end();
    // One more leak view with nothing hung.
    thread::sleep(Duration::from_millis(1_200));
    let run = tracer.stop();
    run.check_clean();

    let records = &run.records;
    let owner = Owner {
        pid,
        comm: "sleep",
        holders: Holders::Exactly(vec![pid]),
    };
    let hang = Hang {
        state: "CLOSE_WAIT",
        threshold: THRESHOLD,
        found_at_start_up: false,
        unstuck: killed.lo,
        left: killed,
    };
    let mut last_hung_ts = 0;
    for &tuple in &leak.tuples {
        let h = hang.check(records, tuple, &owner, leak.fin);
        last_hung_ts = last_hung_ts.max(ns_of(h, "ts_ns"));
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

/// The leak of [`close_wait_leak_is_reported_with_the_process_that_holds_it`] in a namespace, on
/// `addresses`: each socket reported hung while stuck, with the process that holds it (found by
/// sock_diag in that family), then resolved.
fn check_leak_on(tag: &str, addresses: Addresses) {
    const LEAKED: usize = 3;
    const THRESHOLD: u64 = 2 * SECOND;
    let place = Place::with(tag, addresses);
    let tracer = Tracing::start(&["--port", &place.port(), "--hung", "CLOSE_WAIT=2s"]);
    let mut leak = Leak::make(Some(&place), place.connections(LEAKED));
    wait_for_hung(
        &tracer,
        "every leaked socket reported hung",
        THRESHOLD,
        &leak.tuples,
    );
    assert!(leak.stuck(), "still in CLOSE_WAIT when reported");
    let killed = leak.end();
    thread::sleep(Duration::from_millis(300));
    let run = tracer.stop();
    run.check_clean();

    let owner = Owner {
        pid: leak.holder.pid,
        comm: "sleep",
        holders: Holders::Exactly(vec![leak.holder.pid]),
    };
    let hang = Hang {
        state: "CLOSE_WAIT",
        threshold: THRESHOLD,
        found_at_start_up: false,
        unstuck: killed.lo,
        left: killed,
    };
    for &tuple in &leak.tuples {
        hang.check(&run.records, tuple, &owner, leak.fin);
    }
    check_alert_counts(&run, LEAKED);
}

/// A CLOSE_WAIT leak whose process never read what its peer sent before closing: the hung
/// record says so (its receive queue: the bytes unread and one for the unread FIN, as `ss`
/// shows it), and so do its resolution and, while it lasts, the process's line of the leak view.
#[test]
fn close_wait_leak_with_unread_data_reports_its_receive_queue() {
    const UNREAD: usize = 1000;
    const THRESHOLD: u64 = SECOND;
    let place = Place::new("unread");
    let tracer = Tracing::start(&[
        "--port",
        &place.port(),
        "--hung",
        "CLOSE_WAIT=1s",
        "--interval",
        "1s",
    ]);
    let mut pairs = place.connections(1);
    pairs[0].0.write_all(&[7; UNREAD]).expect("sending");
    let mut leak = Leak::make(Some(&place), pairs);
    let tuple = leak.tuples[0];
    wait_for_hung(
        &tracer,
        "the leaked socket reported hung",
        THRESHOLD,
        &leak.tuples,
    );
    let pid = leak.holder.pid;
    let queued = (UNREAD + 1) as u64;
    tracer.wait_for(
        "the leak view counting its unread bytes",
        Duration::from_secs(5),
        |records| {
            records.iter().any(|r| {
                r["type"] == "leaks"
                    && r["leaks"].as_array().is_some_and(|leaks| {
                        leaks
                            .iter()
                            .any(|l| l["pid"] == pid && l["recv_queue"] == queued)
                    })
            })
        },
    );
    assert!(leak.stuck(), "still in CLOSE_WAIT when reported");
    leak.end();
    thread::sleep(Duration::from_millis(300));
    let run = tracer.stop();
    run.check_clean();

    for kind in ["hung", "resolved"] {
        let r = run
            .of_type(kind)
            .find(|r| about(r, tuple))
            .unwrap_or_else(|| panic!("a {kind} record: {:#?}", run.records));
        assert_eq!(r["recv_queue"], queued, "{r}");
        assert_eq!(r["send_queue"], 0, "{r}");
        assert_eq!(r["retransmits"], 0, "{r}");
        assert_eq!(r["zero_window"], false, "{r}");
    }
    let last = run.of_type("leaks").last().expect("a leak view at exit");
    assert!(
        last["leaks"]
            .as_array()
            .expect("leaks")
            .iter()
            .all(|l| l["recv_queue"] == 0),
        "resolved, nothing left unread: {last}"
    );
}

#[test]
fn close_wait_leak_on_ipv6_is_reported_with_its_owner() {
    check_leak_on("leak6", Addresses::V6);
}

/// IPv4 on IPv6 sockets (`::ffff:127.0.0.1`): the kernel's `ipv6_mapped` sockets.
#[test]
fn close_wait_leak_on_v4_mapped_sockets_is_reported_with_its_owner() {
    check_leak_on("leakm", Addresses::V4Mapped);
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
    let mut leak = Leak::make(place, pairs);
    let port = leak.tuples[0].0.port().to_string();
    sleep_until(leak.fin.hi + 500 * MS);

    let (started, tracer) =
        Moment::of(|| Tracing::start(&["--port", &port, "--hung", "CLOSE_WAIT=2s"]));
    wait_for_hung(
        &tracer,
        "every leaked socket reported hung",
        THRESHOLD,
        &leak.tuples,
    );
    assert!(leak.stuck(), "still in CLOSE_WAIT when reported");
    let killed = leak.end();
    thread::sleep(Duration::from_millis(300));
    let run = tracer.stop();
    run.check_clean();

    let owner = Owner {
        pid: leak.holder.pid,
        comm: "sleep",
        holders: Holders::Exactly(vec![leak.holder.pid]),
    };
    let hang = Hang {
        state: "CLOSE_WAIT",
        threshold: THRESHOLD,
        found_at_start_up: true,
        unstuck: killed.lo,
        left: killed,
    };
    for &tuple in &leak.tuples {
        // Seen in CLOSE_WAIT at start-up: the threshold counts from there.
        hang.check(&run.records, tuple, &owner, started);
    }
    check_alert_counts(&run, LEAKED);
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
    let place = Place::new("before");
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
    let place = Place::new("finwait2");
    let tracer = Tracing::start(&["--port", &place.port(), "--hung", "FIN_WAIT2=1s"]);
    let mut pairs = place.connections(2).into_iter();
    let (half_closed, half_server) = pairs.next().unwrap();
    let (closed, closed_server) = pairs.next().unwrap();
    let half = ends(&half_closed);
    let orphan = ends(&closed);

    let (_, half_fw2) =
        place.close_to_fin_wait2(half, || half_closed.shutdown(Shutdown::Write).unwrap());
    let (_, orphan_fw2) = place.close_to_fin_wait2(orphan, || drop(closed));
    let stuck = || place.state(half) == Some(FIN_WAIT2) && place.state(orphan) == Some(FIN_WAIT2);

    wait_for_hung(
        &tracer,
        "both clients reported hung",
        THRESHOLD,
        &[half, orphan],
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
    // The peer's FIN reaches each socket by the time it is seen in TIME_WAIT (at once on a fast
    // machine; an emulated guest may leave loopback's softirq work to ksoftirqd).
    let mut peer_closed = peer_closed;
    for tuple in [half, orphan] {
        let reached = place.wait_for_state(tuple, Some(TIME_WAIT), peer_closed.lo, FIN_DUE, POLL);
        peer_closed.hi = peer_closed.hi.max(reached.hi);
    }
    thread::sleep(Duration::from_millis(300));
    let run = tracer.stop();
    run.check_clean();

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
    let hang = Hang {
        state: "FIN_WAIT2",
        threshold: THRESHOLD,
        found_at_start_up: false,
        unstuck: peer_closed.lo,
        left: peer_closed,
    };
    hang.check(&run.records, half, &held, half_fw2);
    hang.check(&run.records, orphan, &orphaned, orphan_fw2);
    check_alert_counts(&run, 2);
    drop(half_closed);
}

/// `tuple`, stuck in `state` (`name`) behind [`Place::drop_packets`]: waits for tcpclose to
/// report it hung, checks that it still is stuck, then delivers the packets again and waits for
/// it to reach `then` (`None`: gone).
fn unstick_once_reported<'a>(
    place: &Place,
    tracer: &Tracing,
    tuple: (SocketAddr, SocketAddr),
    (state, name): (u8, &'a str),
    threshold: u64,
    then: Option<u8>,
) -> Hang<'a> {
    wait_for_hung(
        tracer,
        &format!("{name} reported hung"),
        threshold,
        &[tuple],
    );
    assert_eq!(
        place.state(tuple),
        Some(state),
        "still in {name} when reported"
    );
    let unstuck = mono_ns();
    place.deliver_packets_again();
    let left = place.wait_for_state(tuple, then, unstuck, Duration::from_secs(10), POLL);
    Hang {
        state: name,
        threshold,
        found_at_start_up: false,
        unstuck,
        left,
    }
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
    let place = Place::new("lastack");
    let tracer = Tracing::start(&["--port", &place.port(), "--hung", "LAST_ACK=1s"]);
    let (client, mut server) = place.connections(1).pop().unwrap();
    let client_side = ends(&client);
    let server_side = ends(&server);

    // The server's ACK of the FIN may be delayed a little.
    place.close_to_fin_wait2(client_side, || drop(client));
    assert_eq!(server.read(&mut [0; 16]).expect("read"), 0, "EOF");
    place.drop_packets(client_side);
    let (closed, ()) = Moment::of(|| timed(|| drop(server)));
    assert_eq!(
        place.state(server_side),
        Some(LAST_ACK),
        "LAST_ACK after close"
    );
    place.wait_for_state(client_side, Some(TIME_WAIT), closed.lo, FIN_DUE, POLL);

    let hang = unstick_once_reported(
        &place,
        &tracer,
        server_side,
        (LAST_ACK, "LAST_ACK"),
        THRESHOLD,
        None,
    );
    thread::sleep(Duration::from_millis(300));
    let run = tracer.stop();
    run.check_clean();

    let thread = thread_comm();
    let owner = Owner {
        pid: std::process::id(),
        comm: &thread,
        holders: Holders::Exactly(vec![]),
    };
    hang.check(&run.records, server_side, &owner, closed);
    check_alert_counts(&run, 1);
}

/// FIN_WAIT1 whose peer stops acknowledging: nftables drops everything the server sends, then
/// the client shuts down its sending side (and keeps its socket: held by the test process). The
/// server gets the FIN (CLOSE_WAIT), its ACK is dropped, the client retransmits. Reported after
/// 1 s; with the packets delivered again, the next retransmission is acked (FIN_WAIT2): resolved.
#[test]
fn fin_wait1_hang_when_the_peer_stops_acknowledging() {
    const THRESHOLD: u64 = SECOND;
    let place = Place::new("finwait1");
    let tracer = Tracing::start(&["--port", &place.port(), "--hung", "FIN_WAIT1=1s"]);
    let (client, server) = place.connections(1).pop().unwrap();
    let client_side = ends(&client);
    let server_side = ends(&server);

    place.drop_packets(server_side);
    let (shut, ()) = Moment::of(|| timed(|| client.shutdown(Shutdown::Write).unwrap()));
    assert_eq!(
        place.state(client_side),
        Some(FIN_WAIT1),
        "FIN_WAIT1 after shutdown"
    );
    place.wait_for_state(server_side, Some(CLOSE_WAIT), shut.lo, FIN_DUE, POLL);

    let hang = unstick_once_reported(
        &place,
        &tracer,
        client_side,
        (FIN_WAIT1, "FIN_WAIT1"),
        THRESHOLD,
        Some(FIN_WAIT2),
    );
    thread::sleep(Duration::from_millis(300));
    let run = tracer.stop();
    run.check_clean();

    let process = process_comm();
    let owner = Owner {
        pid: std::process::id(),
        comm: &process,
        holders: Holders::Including,
    };
    hang.check(&run.records, client_side, &owner, shut);
    check_alert_counts(&run, 1);
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
    let place = Place::new("churn");
    let server_addr = place.server_addr;
    // Its namespace only: the port may be another test's ephemeral port on the host (a leak
    // test's CLOSE_WAIT held by its `sleep` was once taken for a churned connection).
    let netns = format!("/run/netns/{}", place.ns.name());
    let tracer = Tracing::start(&[
        "--port",
        &place.port(),
        "--netns",
        &netns,
        "--hung",
        "1s",
        "--interval",
        "10s",
    ]);
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
    run.check_clean();
    let churned = churned.into_inner().unwrap();
    let connections = churned.len();
    assert!(connections > 1_000, "{connections} connections");

    // Each unexpected alert, with how its connection was closed and, for a hung one, when the
    // other side's passive close ended (its FIN acked by this side, which had then left
    // FIN_WAIT2 for TIME_WAIT, or CLOSE_WAIT for LAST_ACK).
    // The connection a record is about: its client port, in use when the phase began.
    let connection_of = |r: &Value| {
        let lport = r["lport"].as_u64().unwrap_or(0) as u16;
        let rport = r["rport"].as_u64().unwrap_or(0) as u16;
        let client_port = if lport == server_addr.port() {
            rport
        } else {
            lport
        };
        let since = r["since_ns"].as_u64().unwrap_or(0);
        churned
            .iter()
            .find(|c| c.port == client_port && (c.start..=c.end).contains(&since))
    };
    // On a loaded 2-core machine a worker can be descheduled for more than the threshold
    // between its two closes: that connection really stayed over 1 s in a teardown phase, and
    // reporting it is right. Only alerts about connections that took less than the threshold
    // from connect to both closes are false.
    let (genuine, alerts): (Vec<&Value>, Vec<&Value>) = run
        .records
        .iter()
        .filter(|r| r["type"] == "hung" || r["type"] == "resolved")
        .partition(|r| connection_of(r).is_some_and(|c| c.end - c.start >= SECOND));
    if !genuine.is_empty() {
        eprintln!(
            "{} alerts about connections that took over a second (the machine was busy)",
            genuine.len()
        );
    }
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
