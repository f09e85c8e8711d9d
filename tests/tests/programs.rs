//! Which kernel programs trace (`--programs auto|btf|raw`): typed (BTF) programs where the
//! kernel accepts them, raw tracepoints otherwise; the summary says which ran.
//!
//! Whether this kernel accepts typed programs is found the way tcpclose finds it, by loading
//! them (`--programs btf`): the tests check the typed path where it runs and the refusal where it
//! does not. `cargo xtask test` says where typed programs must run (`TCPCLOSE_EXPECT_AUTO=btf`
//! in the Debian 6.1 guest), so that a kernel that should accept them and does not fails.

use std::{
    io::Read as _,
    net::{Shutdown, TcpListener, TcpStream},
    process::Command,
    time::Duration,
};

use serde_json::Value;
use tcpclose_tests::{
    Tracing, about, binary,
    netns::Place,
    require_root, run_binary,
    tcp_state::TIME_WAIT,
    timing::{MS, POLL, sleep_until},
};

/// The refusal `--programs btf` prints where the kernel does not run typed programs.
const REFUSED: &str = "--programs btf: this kernel does not run tcpclose's typed programs";

/// tcpclose with `args` for half a second, following no port: its exit status, summary and
/// standard error.
fn briefly(args: &[&str]) -> (bool, Option<Value>, String) {
    let (status, stdout, stderr) = run_binary(
        Command::new(binary())
            .args(["--json", "--duration", "500ms", "--port", "1"])
            .args(args),
    );
    let summary = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|r| r["type"] == "summary");
    (status.success(), summary, stderr)
}

/// Whether this kernel runs the typed programs (`--programs btf` starts), checked against what
/// the test command expects of this kernel.
fn typed_programs_run() -> bool {
    let (ok, summary, stderr) = briefly(&["--programs", "btf"]);
    if ok {
        let summary = summary.expect("a summary");
        assert_eq!(summary["programs"], "btf", "{summary}");
    } else {
        assert!(stderr.contains(REFUSED), "a clear refusal: {stderr}");
    }
    if let Ok(expected) = std::env::var("TCPCLOSE_EXPECT_AUTO") {
        assert_eq!(
            ok,
            expected == "btf",
            "this kernel is expected to run {expected} programs with --programs auto: {stderr}"
        );
    }
    ok
}

/// `auto` runs the typed programs where `--programs btf` starts, and the raw ones with a note
/// saying why where it does not; `raw` runs the raw ones without a word.
#[test]
fn auto_runs_typed_programs_where_the_kernel_accepts_them() {
    require_root();
    let typed = typed_programs_run();
    let (ok, summary, stderr) = briefly(&["--programs", "auto"]);
    assert!(ok, "{stderr}");
    let summary = summary.expect("a summary");
    assert_eq!(
        summary["programs"],
        if typed { "btf" } else { "raw" },
        "{summary}"
    );
    let note = "tcpclose: note: raw tracepoint programs: ";
    assert_eq!(
        stderr.contains(note),
        !typed,
        "a note when auto falls back, and only then: {stderr}"
    );
    let (ok, summary, stderr) = briefly(&["--programs", "raw"]);
    assert!(ok, "{stderr}");
    assert_eq!(summary.expect("a summary")["programs"], "raw");
    assert!(!stderr.contains("note"), "{stderr}");
}

/// An orphaned client's teardown with typed programs: the peer's FIN re-arms the timewait
/// socket's timer (`__inet_twsk_schedule()`), which the fentry program sees with its time, so the
/// end of FIN_WAIT2 and the start of TIME_WAIT are exact (`resolution_ns` null), where the raw
/// timer programs often see no event for that re-arm (same timer-wheel bucket) and infer the
/// time from the expiry, to a jiffy. Where the kernel refuses typed programs, `--programs btf`
/// fails with the refusal (checked by [`typed_programs_run`]).
#[test]
fn typed_programs_time_an_orphaned_clients_time_wait_exactly() {
    require_root();
    if !typed_programs_run() {
        return;
    }
    let place = Place::new("typed");
    let tracer = Tracing::start(&["--programs", "btf", "--port", &place.port()]);
    let (listener, client) = place.ns.run(|| {
        let listener = TcpListener::bind(place.server_addr).expect("listening");
        let client = TcpStream::connect(place.server_addr).expect("connecting");
        (listener, client)
    });
    let (mut server, _) = listener.accept().expect("accepting");
    let tuple = (
        client.local_addr().expect("address"),
        client.peer_addr().expect("address"),
    );
    // The client closes (orphaned: its FIN_WAIT2 goes on in a timewait socket); the server
    // closes 200 ms later, which moves the timewait socket to TIME_WAIT.
    let (closed, fin_wait2) = place.close_to_fin_wait2(tuple, || drop(client));
    let mut rest = Vec::new();
    server
        .read_to_end(&mut rest)
        .expect("reading the client's FIN");
    sleep_until(fin_wait2.hi + 200 * MS);
    server.shutdown(Shutdown::Both).ok();
    drop(server);
    place.wait_for_state(
        tuple,
        Some(TIME_WAIT),
        closed.lo,
        Duration::from_secs(5),
        POLL,
    );
    std::thread::sleep(Duration::from_millis(300));
    place.kill_time_wait();
    let records = tracer.wait_for("the client's teardown", Duration::from_secs(10), |rs| {
        rs.iter()
            .any(|r| r["type"] == "teardown" && about(r, tuple))
    });
    let r = records
        .iter()
        .find(|r| r["type"] == "teardown" && about(r, tuple))
        .expect("the client's teardown");
    assert_eq!(r["close"], "active", "{r}");
    assert_eq!(r["complete"], true, "{r}");
    assert_eq!(r["timewait_end"], "killed", "{r}");
    assert!(r["resolution_ns"].is_null(), "TIME_WAIT's start exact: {r}");
    let fin_wait2 = r["phases"]["FIN_WAIT2"].as_u64().expect("FIN_WAIT2");
    assert!(
        (200 * MS..1_000 * MS).contains(&fin_wait2),
        "FIN_WAIT2 ran from the client's ACKed FIN to the server's FIN (200 ms later): {r}"
    );
    assert!(r["phases"]["TIME_WAIT"].as_u64().is_some(), "{r}");
    let run = tracer.stop();
    assert_eq!(run.summary()["programs"], "btf");
    assert!(
        run.summary()["timewait_events"].as_u64() >= Some(3),
        "the arming, the re-arm and the kill: {}",
        run.summary()
    );
}
