//! One record per finished connection (the default mode), against the real kernel: how each kind
//! of close is classified, and every phase timed against the test's own clock.
//!
//! The test knows when it made each step (the span of the system call) or saw the kernel make it
//! (polling the socket table), as an interval of CLOCK_MONOTONIC, the clock of the records'
//! `ts_ns`. A phase timed from state-change events must fall within the test's interval, give or
//! take [`TOLERANCE`]; a phase on the kernel's timewait socket, timed from its timer, give or take
//! the record's `resolution_ns` more.
//!
//! Each test runs its sockets in a network namespace of its own (see `tcpclose_tests::netns`): its
//! TCP settings are the defaults, whatever the host's, and its timewait sockets are its own. The
//! host's may be exhausted by other load (`tcp_max_tw_buckets`: the kernel then closes without
//! TIME_WAIT), and `ss -K` kills nothing outside it. Its listener takes a port held on the host
//! (bound, never listening), which the tracer follows: no other socket of the host uses it.
//!
//! The active close's TIME_WAIT runs its full 60 s, in one test that the others run beside: its
//! name sorts first so that it starts first.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use serde_json::Value;
use tcpclose_tests::{
    PHASES, Run, Tracing, about, connect_with, kernel_gives_reset_reasons, mono_ns,
    netns::{Addresses, Place},
    set_linger_zero, tcp_state,
    tcp_state::*,
    thread_comm, timed,
    timing::{MS, Moment, POLL, assert_within, sleep_until, wait_for},
};

/// Tests of `check(tag, addresses)`, in a module `name`: `ipv4`, `ipv6` (on `::1`) and
/// `v4_mapped` (IPv4 carried by IPv6 sockets, `::ffff:127.0.0.1`: the kernel's `ipv6_mapped`
/// sockets), each in a namespace named after `tag`.
macro_rules! on_every_address {
    ($name:ident, $check:ident, $tag:literal) => {
        mod $name {
            use super::*;

            #[test]
            fn ipv4() {
                $check($tag, Addresses::V4);
            }

            #[test]
            fn ipv6() {
                $check(concat!($tag, "6"), Addresses::V6);
            }

            #[test]
            fn v4_mapped() {
                $check(concat!($tag, "m"), Addresses::V4Mapped);
            }
        }
    };
}

/// Between a state change and the system call or poll that made or saw it.
const TOLERANCE: u64 = 5 * MS;
/// TCP_TIMEWAIT_LEN.
const TIMEWAIT_LEN: u64 = 60_000 * MS;

/// The teardown records of the connection end `(local, remote)`.
fn records_of(run: &Run, socket: (SocketAddr, SocketAddr)) -> Vec<&Value> {
    run.of_type("teardown")
        .filter(|r| about(r, socket))
        .collect()
}

fn record_of(run: &Run, (local, remote): (SocketAddr, SocketAddr)) -> &Value {
    let records = records_of(run, (local, remote));
    assert_eq!(
        records.len(),
        1,
        "one teardown record for {local} -> {remote}; all records: {:#?}",
        run.records
    );
    records[0]
}

/// The phases of an active close and of a simultaneous one, in the order they run.
const ACTIVE: &[&str] = &["FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT"];
const SIMULTANEOUS: &[&str] = &["FIN_WAIT1", "CLOSING", "TIME_WAIT"];

/// When the phase `name` of the record `r`, whose phases ran in `order`, began and ended by the
/// kernel's clock: its teardown ended at `ts_ns` and lasted `teardown_ns`.
fn phase_span(r: &Value, order: &[&str], name: &str) -> (u64, u64) {
    let end = r["ts_ns"]
        .as_u64()
        .unwrap_or_else(|| panic!("no ts_ns: {r}"));
    let took = r["teardown_ns"]
        .as_u64()
        .unwrap_or_else(|| panic!("no teardown_ns: {r}"));
    let mut at = end - took;
    for &p in order {
        let ns = phase(r, p).unwrap_or(0);
        if p == name {
            return (at, at + ns);
        }
        at += ns;
    }
    panic!("{name} is not among {order:?}")
}

fn phase(r: &Value, name: &str) -> Option<u64> {
    let v = &r["phases"][name];
    if v.is_null() {
        return None;
    }
    Some(
        v.as_u64()
            .unwrap_or_else(|| panic!("{name} is not ns: {r}")),
    )
}

fn resolution(r: &Value) -> u64 {
    r["resolution_ns"].as_u64().unwrap_or(0)
}

/// The run ended cleanly, with its summary last.
fn check_run(run: &Run) {
    run.check_clean();
    assert!(
        run.of_type("transition").next().is_none(),
        "no transition records without --events: {:#?}",
        run.records
    );
}

/// What every record must hold, and its side, kind of close and exact set of phases.
fn check_record(r: &Value, side: Option<&str>, close: &str, phases: &[&str]) {
    assert_eq!(r["type"], "teardown", "{r}");
    // The socket's family: IPv6 for `::1` and for IPv4 on an IPv6 socket (`::ffff:127.0.0.1`,
    // as `ss` shows it too). The records are found by their addresses (`about`).
    let ipv6 = r["laddr"].as_str().is_some_and(|a| a.contains(':'));
    assert_eq!(r["family"], if ipv6 { "ipv6" } else { "ipv4" }, "{r}");
    assert_eq!(r["side"], side.map_or(Value::Null, Value::from), "{r}");
    assert_eq!(r["close"], close, "{r}");
    assert_eq!(r["complete"], true, "seen from birth to end: {r}");
    assert!(r["time"].is_string(), "{r}");
    assert!(r["ts_ns"].is_u64(), "{r}");
    let present: Vec<&str> = r["phases"]
        .as_object()
        .unwrap_or_else(|| panic!("phases: {r}"))
        .keys()
        .map(String::as_str)
        .collect();
    for key in &present {
        assert!(PHASES.contains(key), "unknown phase {key}: {r}");
    }
    let mut expected: Vec<&str> = phases.to_vec();
    let mut present = present;
    expected.sort_unstable();
    present.sort_unstable();
    assert_eq!(present, expected, "phases gone through: {r}");
    let res = &r["resolution_ns"];
    assert!(
        res.is_null() || (MS..=10 * MS).contains(&res.as_u64().unwrap_or(0)),
        "resolution is one jiffy (HZ 100 to 1000): {r}"
    );
    if close == "failed" {
        assert!(r["teardown_ns"].is_null(), "never established: {r}");
    } else {
        // The phases follow one another from leaving ESTABLISHED to the end.
        let teardown = r["teardown_ns"].as_u64().unwrap_or_else(|| panic!("{r}"));
        let sum: u64 = phases.iter().filter_map(|p| phase(r, p)).sum();
        assert!(
            teardown.abs_diff(sum) <= resolution(r) + 1_000,
            "teardown_ns {teardown} is the sum of the phases {sum}: {r}"
        );
        let lifetime = r["lifetime_ns"].as_u64().unwrap_or_else(|| panic!("{r}"));
        assert!(lifetime >= teardown, "{r}");
    }
    assert!(r["lifetime_ns"].is_u64(), "seen from birth: {r}");
    assert!(r["fin_retransmits"].is_object(), "{r}");
    if matches!(close, "active" | "passive" | "simultaneous" | "fin_timeout") {
        assert!(r["reset"].is_null(), "no reset in an orderly close: {r}");
    }
}

/// No FIN of the record's connection was retransmitted (nothing was lost on loopback).
fn assert_no_fin_retransmits(r: &Value) {
    assert_eq!(r["fin_retransmits"], serde_json::json!({}), "{r}");
}

/// The record says the connection was reset by `by` (`local`, `peer`), for `reason` where the
/// kernel gives reasons (see [`kernel_gives_reset_reasons`]; `None`: none given).
fn assert_reset(r: &Value, by: &str, reason: Option<&str>) {
    let expected = match reason {
        Some(reason) if kernel_gives_reset_reasons() => Value::from(reason),
        _ => Value::Null,
    };
    assert_eq!(
        r["reset"],
        serde_json::json!({"by": by, "reason": expected}),
        "{r}"
    );
}

fn assert_phase(r: &Value, name: &str, span: (u64, u64), tolerance: u64) {
    let ns = phase(r, name).unwrap_or_else(|| panic!("no {name}: {r}"));
    assert_within(r, name, ns, span, tolerance);
}

/// The record's end (`ts_ns`) lies within `at`.
fn assert_ends(r: &Value, at: Moment, tolerance: u64) {
    let ts = r["ts_ns"].as_u64().unwrap_or_else(|| panic!("{r}"));
    assert!(
        ts + tolerance >= at.lo && ts <= at.hi + tolerance,
        "ends at {ts}, the test saw the end between {} and {}: {r}",
        at.lo,
        at.hi
    );
}

/// The owner is this test's thread (it made the socket's last system-call transition).
fn assert_ours(r: &Value, comm: &str) {
    assert_eq!(r["pid"], std::process::id(), "{r}");
    assert_eq!(r["comm"], comm, "{r}");
}

fn assert_timewait_end(r: &Value, end: &str) {
    assert_eq!(r["timewait_end"], end, "{r}");
}

/// The record's TIME_WAIT ran from `since` to `end`, when it ended as `how` (`timewait_end`), and
/// the socket was ours.
fn assert_time_wait_ended(r: &Value, since: Moment, (end, how): (Moment, &str), comm: &str) {
    assert_phase(r, "TIME_WAIT", since.to(end), TOLERANCE + resolution(r));
    assert_timewait_end(r, how);
    assert_ends(r, end, TOLERANCE);
    assert_ours(r, comm);
}

/// The record of the side that closed first in `close`, an active close: FIN_WAIT1 from its
/// close to FIN_WAIT2, FIN_WAIT2 (give or take `fin_wait2_tolerance`) up to the peer's close,
/// TIME_WAIT from there to `end`.
fn check_active_close(
    r: &Value,
    side: &str,
    close: &OrderlyClose,
    end: (Moment, &str),
    fin_wait2_tolerance: u64,
    comm: &str,
) {
    check_record(r, Some(side), "active", ACTIVE);
    assert_no_fin_retransmits(r);
    assert_phase(r, "FIN_WAIT1", close.first.to(close.fin_wait2), TOLERANCE);
    assert_phase(
        r,
        "FIN_WAIT2",
        close.fin_wait2.to(close.second),
        fin_wait2_tolerance,
    );
    assert_time_wait_ended(r, close.second, end, comm);
}

/// The record of the side that closed second in `close`, a passive close: CLOSE_WAIT from the
/// peer's close to its own, then LAST_ACK within its close (the peer's timewait socket ACKs the
/// FIN at once), which ends the record.
fn check_passive_close(r: &Value, side: &str, close: &OrderlyClose, comm: &str) {
    check_record(r, Some(side), "passive", &["CLOSE_WAIT", "LAST_ACK"]);
    assert_no_fin_retransmits(r);
    assert_phase(r, "CLOSE_WAIT", close.first.to(close.second), TOLERANCE);
    assert_phase(
        r,
        "LAST_ACK",
        (0, close.second.hi - close.second.lo),
        TOLERANCE,
    );
    assert!(r["timewait_end"].is_null(), "{r}");
    assert_ends(r, close.second, TOLERANCE);
    assert_ours(r, comm);
}

/// A place, the tracer following its port (started first, so that it sees each socket from its
/// birth), and the ends of one connection to a listener there, accepted (the listener is closed).
struct Connection {
    place: Place,
    tracer: Tracing,
    /// The client's end, `(client, server)`.
    client_side: (SocketAddr, SocketAddr),
    /// The server's end, `(server, client)`.
    server_side: (SocketAddr, SocketAddr),
}

/// A [`Connection`] in a place of its own, and its client and server sockets.
fn connection(tag: &str, client_reuse_addr: bool) -> (Connection, TcpStream, TcpStream) {
    connection_in(Place::new(tag), client_reuse_addr)
}

/// A [`connection`] in `place`, set up beforehand.
fn connection_in(place: Place, client_reuse_addr: bool) -> (Connection, TcpStream, TcpStream) {
    let tracer = Tracing::start(&["--port", &place.port()]);
    let server_addr = place.server_addr;
    let (client, server) = place.ns.run(|| {
        let listener = TcpListener::bind(server_addr).expect("bind in the namespace");
        let client = connect_with(server_addr, None, client_reuse_addr).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        (client, server)
    });
    let client_addr = client.local_addr().unwrap();
    let conn = Connection {
        place,
        tracer,
        client_side: (client_addr, server_addr),
        server_side: (server_addr, client_addr),
    };
    (conn, client, server)
}

fn read_eof(socket: &mut TcpStream) {
    assert_eq!(socket.read(&mut [0; 16]).expect("read"), 0, "EOF");
}

/// When the second side of an [`orderly_close`] closes.
#[derive(Clone, Copy)]
enum SecondClose {
    /// This long after the first side's close.
    AfterFirstClose(u64),
    /// This long after the first side reached FIN_WAIT2.
    AfterFinWait2(u64),
}

/// The moments of an [`orderly_close`].
struct OrderlyClose {
    /// The first side's close (or shutdown).
    first: Moment,
    /// The first side reaching FIN_WAIT2.
    fin_wait2: Moment,
    /// The second side's close.
    second: Moment,
}

/// The first side (its end: `first_side`) closes with `close_first` and reaches FIN_WAIT2 (see
/// [`Place::close_to_fin_wait2`]); the second side reads EOF and closes when `when` says, which
/// puts the first side in TIME_WAIT.
fn orderly_close(
    place: &Place,
    first_side: (SocketAddr, SocketAddr),
    close_first: impl FnOnce(),
    mut second: TcpStream,
    when: SecondClose,
) -> OrderlyClose {
    let (first, fin_wait2) = place.close_to_fin_wait2(first_side, close_first);
    read_eof(&mut second);
    sleep_until(match when {
        SecondClose::AfterFirstClose(delay) => first.hi + delay,
        SecondClose::AfterFinWait2(delay) => fin_wait2.hi + delay,
    });
    let (second, ()) = Moment::of(|| timed(|| drop(second)));
    // The FIN reaches the first side during the close on a fast machine; a slow one (an emulated
    // guest) may leave loopback's softirq to ksoftirqd: TIME_WAIT began by the time it is seen.
    let reached = place.wait_for_state(
        first_side,
        Some(TIME_WAIT),
        second.lo,
        Duration::from_secs(2),
        POLL,
    );
    let second = Moment {
        lo: second.lo,
        hi: second.hi.max(reached.hi),
    };
    OrderlyClose {
        first,
        fin_wait2,
        second,
    }
}

/// The client closes; the server reads EOF and closes 300 ms after the client reached FIN_WAIT2.
/// The client's record comes only when its TIME_WAIT ends by itself, 60 s after the server's FIN
/// (TCP_TIMEWAIT_LEN) rounded up by the timer wheel (by up to 2 s at HZ 250): the test watches for
/// that end and times it.
#[test]
fn active_close_record_comes_at_the_real_end_of_time_wait() {
    let (conn, client, server) = connection("active", false);
    let comm = thread_comm();

    // The server's ACK (delayed a few ms) moves the orphaned client to FIN_WAIT2: the kernel hands
    // it over to a timewait socket at once.
    let close = orderly_close(
        &conn.place,
        conn.client_side,
        || drop(client),
        server,
        SecondClose::AfterFinWait2(300 * MS),
    );
    let expired = conn.place.wait_for_expiry(
        conn.client_side,
        TIME_WAIT,
        close.second.hi + TIMEWAIT_LEN,
        Duration::from_secs(15),
        "TIME_WAIT lasts TCP_TIMEWAIT_LEN",
    );
    thread::sleep(Duration::from_millis(300));
    let run = conn.tracer.stop();
    check_run(&run);

    let c = record_of(&run, conn.client_side);
    // FIN_WAIT2 ends on the timewait socket.
    let tw_tolerance = TOLERANCE + resolution(c);
    check_active_close(
        c,
        "client",
        &close,
        (expired, "expired"),
        tw_tolerance,
        &comm,
    );
    // Never early; late by at most the timer wheel's granularity (an eighth of the timeout).
    assert_phase(
        c,
        "TIME_WAIT",
        (TIMEWAIT_LEN, TIMEWAIT_LEN + TIMEWAIT_LEN / 8),
        tw_tolerance,
    );

    let s = record_of(&run, conn.server_side);
    check_passive_close(s, "server", &close, &comm);
    assert!(s["resolution_ns"].is_null(), "{s}");
}

/// The client closes first and lets go of its socket; the server reads EOF and closes 250 ms
/// after the client reached FIN_WAIT2. The orphaned client was handed to a timewait socket in
/// FIN_WAIT2, which the server's FIN moves to TIME_WAIT; `ss -K` kills it 200 ms later. Both
/// timewait phases are timed from the timewait socket's events.
fn client_closes_first(tag: &str, addresses: Addresses) {
    let (conn, client, server) = connection_in(Place::with(tag, addresses), false);
    let comm = thread_comm();

    let close = orderly_close(
        &conn.place,
        conn.client_side,
        || drop(client),
        server,
        SecondClose::AfterFinWait2(250 * MS),
    );
    sleep_until(close.second.hi + 200 * MS);
    let killed = conn.place.kill_time_wait();
    thread::sleep(Duration::from_millis(200));
    let run = conn.tracer.stop();
    check_run(&run);

    let c = record_of(&run, conn.client_side);
    let tw_tolerance = TOLERANCE + resolution(c);
    check_active_close(c, "client", &close, (killed, "killed"), tw_tolerance, &comm);
    let s = record_of(&run, conn.server_side);
    check_passive_close(s, "server", &close, &comm);
}

on_every_address!(
    client_first_close_times_both_timewait_phases,
    client_closes_first,
    "clientfirst"
);

/// Half close: the client shuts down its sending side and keeps the socket; the server reads EOF
/// and closes 250 ms after the client reached FIN_WAIT2, on its full socket this time. Then the
/// client reconnects from the same port (SO_REUSEADDR, bound; no listener left): connect() kills
/// the timewait socket of the same 4-tuple (tcp_twsk_unique allows it at once for a socket bound
/// by the application, when the connection had timestamps), which ends the record there
/// ("killed"); the attempt itself, refused, is a new life on the same 4-tuple.
fn half_close(tag: &str, addresses: Addresses) {
    let (conn, mut client, server) = connection_in(Place::with(tag, addresses), true);
    let comm = thread_comm();

    let close = orderly_close(
        &conn.place,
        conn.client_side,
        || client.shutdown(Shutdown::Write).expect("shutdown"),
        server,
        SecondClose::AfterFinWait2(250 * MS),
    );
    // The client still holds its socket: it reads the FIN, then closes (no state change left: the
    // kernel handed the connection to a timewait socket on the FIN).
    read_eof(&mut client);
    drop(client);
    sleep_until(close.second.hi + 200 * MS);
    let (client_addr, server_addr) = conn.client_side;
    let (reused, attempt) = Moment::of(|| {
        conn.place
            .ns
            .run(|| connect_with(server_addr, Some(client_addr.port()), true).map(drop))
    });
    assert_eq!(
        attempt.map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionRefused),
        "reconnecting from {client_addr}"
    );
    assert_eq!(conn.place.state(conn.client_side), None, "TIME_WAIT killed");
    thread::sleep(Duration::from_millis(200));
    let run = conn.tracer.stop();
    check_run(&run);

    let client_records = records_of(&run, conn.client_side);
    let c = client_records
        .iter()
        .find(|r| r["close"] != "failed")
        .unwrap_or_else(|| panic!("the closed connection: {client_records:#?}"));
    // Both ends of this FIN_WAIT2 are state changes of the full socket.
    check_active_close(c, "client", &close, (reused, "killed"), TOLERANCE, &comm);

    let retry: Vec<_> = client_records
        .iter()
        .filter(|r| r["close"] == "failed")
        .collect();
    assert_eq!(
        retry.len(),
        1,
        "the refused reconnection: {client_records:#?}"
    );
    check_record(retry[0], Some("client"), "failed", &[]);
    assert_ends(retry[0], reused, TOLERANCE);
    assert_eq!(client_records.len(), 2, "{client_records:#?}");

    let s = record_of(&run, conn.server_side);
    check_record(s, Some("server"), "passive", &["CLOSE_WAIT", "LAST_ACK"]);
    assert_phase(s, "CLOSE_WAIT", close.first.to(close.second), TOLERANCE);
    assert_ends(s, close.second, TOLERANCE);
    assert_ours(s, &comm);
}

on_every_address!(
    half_close_times_fin_wait2_on_the_full_socket,
    half_close,
    "halfclose"
);

/// The server closes first; the client reads EOF and closes 200 ms later. The server's TIME_WAIT
/// is killed with `ss -K` 100 ms after that, which ends its record.
fn server_closes_first(tag: &str, addresses: Addresses) {
    let (conn, client, server) = connection_in(Place::with(tag, addresses), false);
    let comm = thread_comm();

    let close = orderly_close(
        &conn.place,
        conn.server_side,
        || drop(server),
        client,
        SecondClose::AfterFirstClose(200 * MS),
    );
    sleep_until(close.second.hi + 100 * MS);
    let killed = conn.place.kill_time_wait();
    thread::sleep(Duration::from_millis(200));
    let run = conn.tracer.stop();
    check_run(&run);

    let c = record_of(&run, conn.client_side);
    check_passive_close(c, "client", &close, &comm);

    let s = record_of(&run, conn.server_side);
    // FIN_WAIT2 ends on the timewait socket.
    let tw_tolerance = TOLERANCE + resolution(s);
    check_active_close(s, "server", &close, (killed, "killed"), tw_tolerance, &comm);
}

on_every_address!(
    passive_close_of_the_client_when_the_server_closes_first,
    server_closes_first,
    "passive"
);

/// SO_LINGER {on, 0}: close() sends an RST (ESTABLISHED -> CLOSE); the server goes
/// ESTABLISHED -> CLOSE on receiving it. Neither goes through any phase.
fn linger_zero_close(tag: &str, addresses: Addresses) {
    let (conn, client, mut server) = connection_in(Place::with(tag, addresses), false);
    let comm = thread_comm();

    set_linger_zero(&client);
    let (closed, ()) = Moment::of(|| timed(|| drop(client)));
    let err = server.read(&mut [0; 16]).expect_err("the RST");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    assert_eq!(conn.place.state(conn.client_side), None, "no TIME_WAIT");
    drop(server);
    thread::sleep(Duration::from_millis(200));
    let run = conn.tracer.stop();
    check_run(&run);

    let c = record_of(&run, conn.client_side);
    check_record(c, Some("client"), "reset", &[]);
    assert_eq!(c["teardown_ns"], 0, "{c}");
    assert!(c["timewait_end"].is_null(), "{c}");
    assert_ends(c, closed, TOLERANCE);
    assert_ours(c, &comm);
    // tcp_disconnect() aborts it (SK_RST_REASON_TCP_STATE).
    assert_reset(c, "local", Some("tcp_state"));

    let s = record_of(&run, conn.server_side);
    check_record(s, Some("server"), "reset", &[]);
    assert_eq!(s["teardown_ns"], 0, "{s}");
    assert!(s["timewait_end"].is_null(), "{s}");
    assert_ends(s, closed, TOLERANCE);
    assert_reset(s, "peer", None);
}

on_every_address!(
    linger_zero_close_resets_both_sides,
    linger_zero_close,
    "linger"
);

/// The server closes with data it has not read: the kernel aborts the connection with an RST
/// (__tcp_close(): ESTABLISHED -> CLOSE, then tcp_send_active_reset() with
/// SK_RST_REASON_TCP_ABORT_ON_CLOSE), the client's "connection reset by peer". The server's
/// record says it sent the reset and why (the reset comes after its `-> CLOSE`), the client's
/// that its peer reset it.
fn unread_data_close(tag: &str, addresses: Addresses) {
    let (conn, mut client, server) = connection_in(Place::with(tag, addresses), false);
    client.write_all(b"never read").expect("write");
    // The data is in the server's receive queue before it closes.
    wait_for(
        "the server's receive queue",
        mono_ns(),
        Duration::from_secs(2),
        POLL,
        || server.peek(&mut [0; 16]).is_ok_and(|n| n > 0),
    );
    let (closed, ()) = Moment::of(|| timed(|| drop(server)));
    let err = client.read(&mut [0; 16]).expect_err("the RST");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    drop(client);
    thread::sleep(Duration::from_millis(200));
    let run = conn.tracer.stop();
    check_run(&run);

    let s = record_of(&run, conn.server_side);
    check_record(s, Some("server"), "reset", &[]);
    assert_ends(s, closed, TOLERANCE);
    assert_reset(s, "local", Some("tcp_abort_on_close"));
    let c = record_of(&run, conn.client_side);
    check_record(c, Some("client"), "reset", &[]);
    assert_ends(c, closed, TOLERANCE);
    assert_reset(c, "peer", None);
    for r in [s, c] {
        assert_eq!(r["teardown_ns"], 0, "{r}");
        assert_no_fin_retransmits(r);
    }
}

on_every_address!(
    close_with_unread_data_sends_a_reset_and_says_why,
    unread_data_close,
    "unread"
);

/// FINs lost on the way: nftables in the namespace loses every FIN that arrives at the server
/// while the client closes, for a second, then every FIN that arrives at the client while the
/// server closes, for a second. Each FIN is retransmitted (from a 200 ms RTO on loopback,
/// doubling) until one gets through: the client's FIN_WAIT1 and the server's LAST_ACK each last
/// over a second and count their retransmissions, in that phase only.
#[test]
fn lost_fins_are_retransmitted_and_counted_in_their_phase() {
    const LOSS: Duration = Duration::from_secs(1);
    let (conn, client, mut server) = connection("lostfin", false);
    let comm = thread_comm();

    conn.place.lose_fins_to(conn.server_side.0.port());
    let (closed, ()) = Moment::of(|| timed(|| drop(client)));
    thread::sleep(LOSS);
    assert_eq!(
        conn.place.state(conn.client_side),
        Some(FIN_WAIT1),
        "FIN lost"
    );
    conn.place.deliver_fins_again();
    let fin_wait2 = conn.place.wait_for_state(
        conn.client_side,
        Some(FIN_WAIT2),
        closed.lo,
        Duration::from_secs(5),
        POLL,
    );
    read_eof(&mut server);

    conn.place.lose_fins_to(conn.client_side.0.port());
    let (second, ()) = Moment::of(|| timed(|| drop(server)));
    thread::sleep(LOSS);
    assert_eq!(
        conn.place.state(conn.server_side),
        Some(LAST_ACK),
        "FIN lost"
    );
    conn.place.deliver_fins_again();
    let gone = conn.place.wait_for_state(
        conn.server_side,
        None,
        second.lo,
        Duration::from_secs(5),
        POLL,
    );
    let killed = conn.place.kill_time_wait();
    thread::sleep(Duration::from_millis(300));
    let run = conn.tracer.stop();
    check_run(&run);

    let c = record_of(&run, conn.client_side);
    check_record(c, Some("client"), "active", ACTIVE);
    assert_phase(c, "FIN_WAIT1", closed.to(fin_wait2), TOLERANCE);
    assert!(phase(c, "FIN_WAIT1") >= Some(LOSS.as_nanos() as u64), "{c}");
    assert_timewait_end(c, "killed");
    assert_ends(c, killed, TOLERANCE);
    assert_ours(c, &comm);
    let s = record_of(&run, conn.server_side);
    check_record(s, Some("server"), "passive", &["CLOSE_WAIT", "LAST_ACK"]);
    assert_phase(s, "LAST_ACK", second.to(gone), TOLERANCE);
    assert!(phase(s, "LAST_ACK") >= Some(LOSS.as_nanos() as u64), "{s}");
    for (r, phase) in [(c, "FIN_WAIT1"), (s, "LAST_ACK")] {
        let counts = r["fin_retransmits"]
            .as_object()
            .unwrap_or_else(|| panic!("{r}"));
        let n = counts.get(phase).and_then(Value::as_u64).unwrap_or(0);
        assert!(n >= 1, "the lost FIN was sent again in {phase}: {r}");
        assert_eq!(counts.len(), 1, "retransmissions in {phase} only: {r}");
    }
}

/// The two transitions that end a handshake (`SYN_SENT -> ESTABLISHED`, `SYN_RECV ->
/// ESTABLISHED`) feed no teardown record: the default mode leaves them in the kernel, and its
/// records are whole all the same. With --metrics they are read: `tcpclose_transitions_total`
/// and the sockets per state count them.
#[test]
fn handshake_ends_are_left_in_the_kernel_unless_the_metrics_need_them() {
    let metrics = format!("127.0.0.1:{}", tcpclose_tests::free_port());
    for (extra, received) in [(None, 6), (Some(&metrics), 8)] {
        let place = Place::new("handshake");
        let server_addr = place.server_addr;
        let port = place.port();
        let mut args = vec!["--port", &port];
        args.extend(extra.iter().flat_map(|m| ["--metrics", m.as_str()]));
        let tracer = Tracing::start(&args);
        // The listener's CLOSE -> LISTEN and LISTEN -> CLOSE, each end's birth, its handshake's
        // end, and its reset (ESTABLISHED -> CLOSE): 8 transitions, 6 without the ends.
        let (client, server) = place.ns.run(|| {
            let listener = TcpListener::bind(server_addr).expect("bind in the namespace");
            let client = connect_with(server_addr, None, false).expect("connect");
            let (server, _) = listener.accept().expect("accept");
            (client, server)
        });
        let client_side = (client.local_addr().unwrap(), server_addr);
        set_linger_zero(&client);
        drop(client);
        drop(server);
        tracer.wait_for("both records", Duration::from_secs(5), |records| {
            records.iter().filter(|r| r["type"] == "teardown").count() == 2
        });
        let run = tracer.stop();
        check_run(&run);
        let summary = run.summary();
        assert_eq!(summary["transitions"], received, "{extra:?}: {summary}");
        assert_eq!(summary["lost"], 0, "{summary}");
        check_record(record_of(&run, client_side), Some("client"), "reset", &[]);
        let server_side = (client_side.1, client_side.0);
        check_record(record_of(&run, server_side), Some("server"), "reset", &[]);
    }
}

/// connect() to 127.0.0.1 on a port where nothing listens: the RST ends it in SYN_SENT.
#[test]
fn refused_connect_fails() {
    let place = Place::new("refused");
    let target = place.server_addr;
    let tracer = Tracing::start(&["--port", &place.port()]);
    let comm = thread_comm();
    let (attempt, result) = Moment::of(|| place.ns.run(|| TcpStream::connect(target).map(drop)));
    assert_eq!(
        result.map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionRefused)
    );
    thread::sleep(Duration::from_millis(200));
    let run = tracer.stop();
    check_run(&run);

    let records: Vec<_> = run
        .of_type("teardown")
        .filter(|r| r["raddr"] == "127.0.0.1" && r["rport"] == target.port())
        .collect();
    assert_eq!(records.len(), 1, "{:#?}", run.records);
    let r = records[0];
    check_record(r, Some("client"), "failed", &[]);
    assert_eq!(r["laddr"], "127.0.0.1", "{r}");
    assert_ne!(r["lport"], 0, "{r}");
    assert!(r["timewait_end"].is_null(), "{r}");
    let lifetime = r["lifetime_ns"].as_u64().unwrap();
    assert_within(
        r,
        "lifetime",
        lifetime,
        (0, attempt.hi - attempt.lo),
        TOLERANCE,
    );
    assert_ends(r, attempt, TOLERANCE);
    // The thread that connected runs the namespace's jobs: its comm is inherited from ours.
    assert_ours(r, &comm);
}

/// Both FINs cross ([`Place::cross_fins`]): both sides go FIN_WAIT1 -> CLOSING -> TIME_WAIT, or,
/// should the two shutdowns straddle a jiffy boundary, one of them closes actively. Both
/// TIME_WAITs are then killed with `ss -K`.
#[test]
fn simultaneous_close_goes_through_closing() {
    let (conn, client, server) = connection("simultaneous", false);
    let comm = thread_comm();
    let ns = &conn.place.ns;
    let states = || ns.run(|| states_now(conn.client_side));

    let shut = conn.place.cross_fins(&client, &server);
    let crossed = ns.run(|| {
        wait_for(
            "both sides in TIME_WAIT",
            shut.lo,
            Duration::from_secs(10),
            POLL,
            || states_now(conn.client_side) == (Some(TIME_WAIT), Some(TIME_WAIT)),
        )
    });
    sleep_until(crossed.hi + 200 * MS);
    let killed = conn.place.kill_time_wait();
    assert_eq!(states(), (None, None));
    thread::sleep(Duration::from_millis(200));
    let run = conn.tracer.stop();
    check_run(&run);

    let c = record_of(&run, conn.client_side);
    let s = record_of(&run, conn.server_side);
    let mut simultaneous = 0;
    for ((r, side), peer) in [((c, "client"), s), ((s, "server"), c)] {
        if r["close"] == "simultaneous" {
            simultaneous += 1;
            check_record(r, Some(side), "simultaneous", SIMULTANEOUS);
            let fin_wait1 = phase(r, "FIN_WAIT1").unwrap();
            let closing = phase(r, "CLOSING").unwrap();
            assert_within(
                r,
                "FIN_WAIT1 + CLOSING",
                fin_wait1 + closing,
                shut.to(crossed),
                TOLERANCE,
            );
            // Our CLOSING runs from the peer's FIN (we ACK it as it arrives) to the peer's ACK of
            // our FIN. If the peer's FIN reached us first (its retransmission timer fired before
            // ours), the peer was in FIN_WAIT2 from our ACK to our FIN: within our CLOSING. If
            // both FINs crossed again, the peer was in CLOSING from our FIN to our ACK: the two
            // CLOSINGs overlap. How far apart those packets are is a loopback hop, which in the
            // emulated guest can take milliseconds: the order holds however long it takes, to the
            // nanosecond where both records' times are exact (on the host both CLOSINGs last
            // about 10 us).
            let ours = phase_span(r, SIMULTANEOUS, "CLOSING");
            let slack = resolution(r) + resolution(peer);
            let (theirs, holds) = match peer["close"].as_str() {
                Some("active") => {
                    let theirs = phase_span(peer, ACTIVE, "FIN_WAIT2");
                    (
                        theirs,
                        ours.0 <= theirs.0 + slack && theirs.1 <= ours.1 + slack,
                    )
                }
                _ => {
                    let theirs = phase_span(peer, SIMULTANEOUS, "CLOSING");
                    (
                        theirs,
                        theirs.0 <= ours.1 + slack && ours.0 <= theirs.1 + slack,
                    )
                }
            };
            assert!(
                holds,
                "CLOSING at {ours:?} ns against the peer's at {theirs:?} (give or take {slack} \
                 ns): {r}\n{peer}"
            );
        } else {
            check_record(r, Some(side), "active", ACTIVE);
            let sum = phase(r, "FIN_WAIT1").unwrap() + phase(r, "FIN_WAIT2").unwrap();
            assert_within(r, "FIN_WAIT1 + FIN_WAIT2", sum, shut.to(crossed), TOLERANCE);
        }
        assert_time_wait_ended(r, crossed, (killed, "killed"), &comm);
    }
    assert!(
        simultaneous >= 1,
        "the FINs crossed: at least one side went FIN_WAIT1 -> CLOSING: {c}\n{s}"
    );
    drop((client, server));
}

/// The states of the client's end (`(client, server)`) and the server's, in the calling thread's
/// namespace.
fn states_now((client, server): (SocketAddr, SocketAddr)) -> (Option<u8>, Option<u8>) {
    (tcp_state(client, server), tcp_state(server, client))
}

/// An orphaned FIN_WAIT2 whose peer never closes: with tcp_fin_timeout = 2 in the namespace, the
/// client closes and the server keeps its socket open. The kernel's timewait socket gives up
/// after max(tcp_fin_timeout, 3.5 RTO) = 2 s, late by at most the timer wheel's granularity.
#[test]
fn orphaned_fin_wait2_times_out() {
    const FIN_TIMEOUT: u64 = 2_000 * MS;
    let place = Place::new("fintimeout");
    place.ns.sysctl("net.ipv4.tcp_fin_timeout", "2");
    let (conn, client, server) = connection_in(place, false);
    let comm = thread_comm();

    let (closed, fin_wait2) = conn
        .place
        .close_to_fin_wait2(conn.client_side, || drop(client));
    let timed_out = conn.place.wait_for_expiry(
        conn.client_side,
        FIN_WAIT2,
        fin_wait2.hi + FIN_TIMEOUT,
        Duration::from_secs(5),
        "FIN_WAIT2 lasts tcp_fin_timeout",
    );
    thread::sleep(Duration::from_millis(300));
    let run = conn.tracer.stop();
    // The server never closed: still in CLOSE_WAIT.
    assert_eq!(conn.place.state(conn.server_side), Some(CLOSE_WAIT));
    drop(server);
    check_run(&run);

    let c = record_of(&run, conn.client_side);
    check_record(
        c,
        Some("client"),
        "fin_timeout",
        &["FIN_WAIT1", "FIN_WAIT2"],
    );
    let tw_tolerance = TOLERANCE + resolution(c);
    assert_phase(c, "FIN_WAIT1", closed.to(fin_wait2), TOLERANCE);
    assert_phase(c, "FIN_WAIT2", fin_wait2.to(timed_out), tw_tolerance);
    assert_phase(
        c,
        "FIN_WAIT2",
        (FIN_TIMEOUT, FIN_TIMEOUT + FIN_TIMEOUT / 8),
        tw_tolerance,
    );
    assert_timewait_end(c, "expired");
    assert_ends(c, timed_out, TOLERANCE);
    assert_ours(c, &comm);
}

/// A namespace whose timewait sockets are all refused (`tcp_max_tw_buckets` = 0, as on a host
/// where other connections hold them all): tcp_time_wait() finds no timewait socket and closes
/// the client's full socket at once. The record is printed then, without TIME_WAIT, not after
/// the two seconds tcpclose would otherwise give a timewait socket to show up: the kernel arms
/// a timewait socket's timer before the full socket's `-> CLOSE`, so none came.
#[test]
fn a_close_refused_its_timewait_socket_is_reported_at_once() {
    let place = Place::new("twrefused");
    place.ns.sysctl("net.ipv4.tcp_max_tw_buckets", "0");
    let (conn, client, mut server) = connection_in(place, false);
    let comm = thread_comm();

    // A shutdown, not a close: an orphaned FIN_WAIT2 would go to a timewait socket at once.
    let (closed, fin_wait2) = conn.place.close_to_fin_wait2(conn.client_side, || {
        client.shutdown(Shutdown::Write).expect("shutdown")
    });
    read_eof(&mut server);
    thread::sleep(Duration::from_millis(100));
    let (second, ()) = Moment::of(|| timed(|| drop(server)));
    assert_eq!(conn.place.state(conn.client_side), None, "no TIME_WAIT");
    drop(client);
    conn.tracer.wait_for(
        "the client's record, well before a timewait socket's wait (2 s) is over",
        Duration::from_millis(1_000),
        |records| {
            records
                .iter()
                .any(|r| r["type"] == "teardown" && about(r, conn.client_side))
        },
    );
    let run = conn.tracer.stop();
    check_run(&run);
    let c = record_of(&run, conn.client_side);
    assert_eq!(c["side"], "client", "{c}");
    assert_eq!(c["close"], "active", "{c}");
    assert_eq!(c["complete"], false, "its timewait phases are missing: {c}");
    assert!(c["timewait_end"].is_null(), "{c}");
    assert_phase(c, "FIN_WAIT1", closed.to(fin_wait2), TOLERANCE);
    assert_phase(c, "FIN_WAIT2", fin_wait2.to(second), TOLERANCE);
    assert_eq!(phase(c, "TIME_WAIT"), None, "{c}");
    assert_ends(c, second, TOLERANCE);
    assert_ours(c, &comm);
    assert_eq!(run.summary()["timewait_unseen"], 1, "{}", run.summary());
}

/// A client reconnecting from the same port, again and again: each connection's SYN kills the
/// server's timewait socket of the previous one (tcp_timewait_state_process() accepts a SYN with
/// newer timestamps), and the new connection, closed first by the server, gets a timewait socket
/// of its own on the same 4-tuple, often at the very address just freed (slab reuse) and within
/// a millisecond of the kill. Every server-side record must still be whole: its own timewait
/// socket, ended by the next connection's SYN ("killed"), none left without one.
#[test]
fn connections_reusing_a_killed_timewait_sockets_tuple_each_keep_their_own() {
    const ROUNDS: usize = 12;
    let place = Place::new("twreuse");
    let tracer = Tracing::start(&["--port", &place.port()]);
    let server_addr = place.server_addr;
    let mut client_port = None;
    let mut tuple = None;
    for round in 0..ROUNDS {
        let (client, server) = place.ns.run(|| {
            let listener = TcpListener::bind(server_addr).expect("bind in the namespace");
            let client = connect_with(server_addr, client_port, true).expect("connect");
            let (server, _) = listener.accept().expect("accept");
            (client, server)
        });
        let client_addr = client.local_addr().unwrap();
        client_port = Some(client_addr.port());
        let server_side = (server_addr, client_addr);
        assert_eq!(
            *tuple.get_or_insert(server_side),
            server_side,
            "the same 4-tuple"
        );
        // Alternately: the server shuts down and closes after the client (TIME_WAIT from its
        // full socket), or closes at once (orphaned FIN_WAIT2, its FIN_WAIT2 timewait socket
        // armed microseconds after the previous one's kill).
        let mut client = client;
        if round % 2 == 0 {
            let mut server = server;
            server.shutdown(Shutdown::Write).expect("shutdown");
            read_eof(&mut client);
            drop(client);
            read_eof(&mut server);
        } else {
            drop(server);
            read_eof(&mut client);
            thread::sleep(Duration::from_millis(20));
            drop(client);
        }
        place.wait_for_state(
            server_side,
            Some(TIME_WAIT),
            mono_ns(),
            Duration::from_secs(1),
            POLL,
        );
    }
    place.kill_time_wait();
    thread::sleep(Duration::from_millis(300));
    let run = tracer.stop();
    check_run(&run);
    let summary = run.summary();
    assert_eq!(summary["timewait_unseen"], 0, "{summary}");
    assert_eq!(summary["unfinished"], 0, "{summary}");
    let server_records: Vec<&Value> = run
        .of_type("teardown")
        .filter(|r| r["side"] == "server")
        .collect();
    assert_eq!(server_records.len(), ROUNDS, "{server_records:#?}");
    for r in server_records {
        check_record(r, Some("server"), "active", ACTIVE);
        assert_timewait_end(r, "killed");
        assert!(
            phase(r, "TIME_WAIT").is_some_and(|ns| ns < 5_000 * MS),
            "ended by the next connection's SYN, not the expiry: {r}"
        );
        assert!(tuple.is_some_and(|end| about(r, end)), "{r}");
    }
}
