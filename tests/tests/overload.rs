//! Loss is counted, never silent. In its own test binary so that its load does not disturb the
//! timing checks of the other tests.

use std::{
    net::{TcpListener, TcpStream},
    thread,
    time::Duration,
};

use tcpclose_tests::Tracer;

#[test]
fn a_full_ring_is_counted_as_lost() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // One page of ring: about 42 records.
    let tracer = Tracer::start(&[
        "--events",
        "--port",
        &addr.port().to_string(),
        "--ring-bytes",
        "4096",
    ]);
    const CONNECTIONS: usize = 3000;
    let acceptor = thread::spawn(move || {
        for _ in 0..CONNECTIONS {
            drop(listener.accept().expect("accept"));
        }
    });
    for _ in 0..CONNECTIONS {
        drop(TcpStream::connect(addr).expect("connect"));
    }
    acceptor.join().unwrap();
    thread::sleep(Duration::from_millis(200));
    let run = tracer.stop();
    assert!(run.status.success(), "{run:?}");
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
