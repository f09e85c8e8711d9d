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
