//! The transition stream on the real kernel: filters, text output, ending a run.

use std::{
    net::TcpListener,
    thread,
    time::{Duration, Instant},
};

use tcpclose_tests::{Run, Tracer, churn};

/// Tracepoint hits the kernel skipped for a run's programs (summary `missed`): BPF's recursion
/// protection skips a program's nested run when an interrupt changes a socket's state while it
/// runs on that CPU, which an emulated guest makes frequent. Each run with its own programs may
/// miss a different few.
fn missed(runs: &[&Run]) -> usize {
    runs.iter()
        .map(|run| run.summary()["missed"].as_u64().expect("missed") as usize)
        .sum()
}

/// `a` and `b`, counts of the same transitions seen by different runs, differ by no more than
/// those runs missed.
fn same_but_missed(a: usize, b: usize, runs: &[&Run], what: &str) {
    let missed = missed(runs);
    assert!(
        a.abs_diff(b) <= missed,
        "{what}: {a} against {b}, {missed} missed by the kernel"
    );
}

fn ports_of(run: &Run) -> Vec<(u64, u64)> {
    run.transitions()
        .iter()
        .map(|t| (t["lport"].as_u64().unwrap(), t["rport"].as_u64().unwrap()))
        .collect()
}

#[test]
fn port_filters_show_only_their_sockets() {
    let watched = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let wp = watched.local_addr().unwrap().port();
    let op = other.local_addr().unwrap().port();

    let any = Tracer::start(&["--events", "--port", &wp.to_string()]);
    let local = Tracer::start(&["--events", "--lport", &wp.to_string()]);
    let remote = Tracer::start(&["--events", "--rport", &wp.to_string()]);
    let other_traffic = thread::spawn(move || churn(&other, 50));
    churn(&watched, 20);
    other_traffic.join().unwrap();
    thread::sleep(Duration::from_millis(100));
    let (any, local, remote) = (any.stop(), local.stop(), remote.stop());

    let wp = u64::from(wp);
    let any_ports = ports_of(&any);
    assert!(any_ports.len() >= 20 * 8, "{} transitions", any_ports.len());
    assert!(
        any_ports.iter().all(|&(l, r)| l == wp || r == wp),
        "{any_ports:?}"
    );
    assert!(
        !any_ports
            .iter()
            .any(|&(l, r)| l == u64::from(op) || r == u64::from(op))
    );
    // Both ends of the watched connections are there.
    assert!(any_ports.iter().any(|&(l, _)| l == wp));
    assert!(any_ports.iter().any(|&(_, r)| r == wp));

    let local_ports = ports_of(&local);
    assert!(!local_ports.is_empty());
    assert!(local_ports.iter().all(|&(l, _)| l == wp), "{local_ports:?}");
    let remote_ports = ports_of(&remote);
    assert!(!remote_ports.is_empty());
    assert!(
        remote_ports.iter().all(|&(_, r)| r == wp),
        "{remote_ports:?}"
    );
    same_but_missed(
        local_ports.len() + remote_ports.len(),
        any_ports.len(),
        &[&any, &local, &remote],
        "every watched transition is on exactly one side",
    );
}

#[test]
fn family_filters() {
    let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let v6 = TcpListener::bind("[::1]:0").unwrap();
    let ports = [
        "--port".to_string(),
        v4.local_addr().unwrap().port().to_string(),
        "--port".to_string(),
        v6.local_addr().unwrap().port().to_string(),
    ];
    let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
    let only4 = Tracer::start(&[&["--events", "-4"], &ports[..]].concat());
    let only6 = Tracer::start(&[&["--events", "-6"], &ports[..]].concat());
    let both = Tracer::start(&[&["--events"], &ports[..]].concat());
    churn(&v4, 5);
    churn(&v6, 5);
    thread::sleep(Duration::from_millis(100));
    let (only4, only6, both) = (only4.stop(), only6.stop(), both.stop());
    let families = |run: &Run| -> Vec<String> {
        run.transitions()
            .iter()
            .map(|t| t["family"].as_str().unwrap().to_owned())
            .collect()
    };
    let f4 = families(&only4);
    let f6 = families(&only6);
    assert!(!f4.is_empty() && f4.iter().all(|f| f == "ipv4"), "{f4:?}");
    assert!(!f6.is_empty() && f6.iter().all(|f| f == "ipv6"), "{f6:?}");
    same_but_missed(
        families(&both).len(),
        f4.len() + f6.len(),
        &[&only4, &only6, &both],
        "every transition is of one family",
    );
}

#[test]
fn sigterm_and_duration_end_runs_with_a_summary() {
    let tracer = Tracer::start(&["--port", "9"]);
    let run = tracer.stop_with(libc::SIGTERM);
    assert!(run.status.success(), "{run:?}");
    assert_eq!(run.summary()["transitions"], 0);

    let started = Instant::now();
    let tracer = Tracer::start(&["--port", "9", "--duration", "500ms"]);
    let run = tracer.wait(Duration::from_secs(10));
    assert!(run.status.success(), "{run:?}");
    assert!(started.elapsed() >= Duration::from_millis(500));
    let summary = run.summary();
    assert!(
        summary["duration_ns"].as_u64().unwrap() >= 500_000_000,
        "{summary}"
    );
}

/// The kernel programs load and run with their diagnostics on (aya-log's code kept in by the
/// verifier, its ring read), in both modes, and report the same; with nothing unusual to say,
/// they say nothing.
#[test]
fn the_programs_run_with_their_diagnostics_on() {
    for mode in [&["--events"][..], &[]] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port().to_string();
        let args = [mode, &["--log-level", "trace", "--port", &port]].concat();
        let tracer = Tracer::start(&args);
        churn(&listener, 5);
        thread::sleep(Duration::from_millis(200));
        let run = tracer.stop();
        run.check_clean();
        let summary = run.summary();
        assert!(
            summary["transitions"].as_u64() >= Some(5 * 6),
            "{args:?}: {summary}"
        );
        assert!(!run.stderr.contains("tcpclose: kernel:"), "{}", run.stderr);
    }
}
