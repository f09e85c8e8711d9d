//! The distributions against the real kernel: `histogram` records, whole and split by
//! `--group-by lport|rport|comm`, on known traffic. Four tracers run side by side on the same
//! connections (one per grouping, one without): each one's histograms must count exactly the
//! teardown records it printed, in the right group, each phase in the log2 bucket of its own
//! duration; and a known delay (a client that closes 40 ms after its server did) must land in
//! the bucket that holds 40 ms.

use std::{collections::BTreeMap, thread, time::Duration};

use serde_json::Value;
use tcpclose_tests::{
    Run, Tracing,
    netns::Place,
    tcp_state::*,
    thread_comm, timed,
    timing::{Moment, POLL},
};

/// Connections made, each closed by its server first and by its client `DELAY` later.
const CONNECTIONS: usize = 4;
const DELAY: Duration = Duration::from_millis(40);

/// The log2 bucket (as `log2_us` names it: its lowest microsecond) that holds `ns`.
fn bucket_of(ns: u64) -> u64 {
    let us = ns / 1_000;
    if us < 2 {
        0
    } else {
        1 << (63 - us.leading_zeros())
    }
}

/// What a run's histograms count: by (group, phase, close), the count and the log2 buckets
/// (lowest microsecond: count, empty buckets left out).
type Counted = BTreeMap<(String, String, String), (u64, BTreeMap<u64, u64>)>;

fn histograms(run: &Run, group_by: Option<&str>) -> Counted {
    let mut counted = Counted::new();
    for h in run.of_type("histogram") {
        assert_eq!(h["group_by"].as_str(), group_by, "{h}");
        let key = (
            h["group"].as_str().unwrap_or("").to_owned(),
            h["phase"].as_str().expect("phase").to_owned(),
            h["close"].as_str().expect("close").to_owned(),
        );
        let buckets: BTreeMap<u64, u64> = h["log2_us"]
            .as_array()
            .expect("log2_us")
            .iter()
            .map(|b| {
                let low = b["low_us"].as_u64().expect("low_us");
                let high = b["high_us"].as_u64().expect("high_us");
                assert_eq!(high, if low == 0 { 1 } else { 2 * low - 1 }, "{h}");
                (low, b["count"].as_u64().expect("count"))
            })
            .filter(|&(_, n)| n > 0)
            .collect();
        let count = h["count"].as_u64().expect("count");
        assert_eq!(
            buckets.values().sum::<u64>(),
            count,
            "the buckets add up: {h}"
        );
        assert!(
            counted.insert(key, (count, buckets)).is_none(),
            "one record per key: {h}"
        );
    }
    counted
}

/// What the histograms should count, from the run's own teardown records.
fn expected(run: &Run, group: impl Fn(&Value) -> String) -> Counted {
    let mut counted = Counted::new();
    for r in run.of_type("teardown") {
        for (phase, ns) in r["phases"].as_object().expect("phases") {
            let key = (
                group(r),
                phase.clone(),
                r["close"].as_str().expect("close").to_owned(),
            );
            let (count, buckets) = counted.entry(key).or_default();
            *count += 1;
            *buckets
                .entry(bucket_of(ns.as_u64().expect("ns")))
                .or_default() += 1;
        }
    }
    counted
}

#[test]
fn histograms_count_each_teardown_in_its_group_and_bucket() {
    let place = Place::new("aggregates");
    let port = place.port();
    let tracers: Vec<(Option<&str>, Tracing)> = [None, Some("lport"), Some("rport"), Some("comm")]
        .into_iter()
        .map(|by| {
            let mut args = vec!["--port", &port];
            if let Some(by) = by {
                args.extend(["--group-by", by]);
            }
            (by, Tracing::start(&args))
        })
        .collect();

    let comm = thread_comm();
    let mut delays = Vec::new();
    for (client, server) in place.connections(CONNECTIONS) {
        let tuple = (
            client.local_addr().expect("client's address"),
            client.peer_addr().expect("server's address"),
        );
        let (closed, ()) = Moment::of(|| timed(|| drop(server)));
        place.wait_for_state(
            tuple,
            Some(CLOSE_WAIT),
            closed.lo,
            Duration::from_secs(2),
            POLL,
        );
        thread::sleep(DELAY);
        let (reopened, ()) = Moment::of(|| timed(|| drop(client)));
        delays.push((closed, reopened));
    }
    thread::sleep(Duration::from_millis(100));
    place.kill_time_wait();
    thread::sleep(Duration::from_millis(300));

    for (by, tracer) in tracers {
        let run = tracer.stop();
        run.check_clean();
        let teardowns: Vec<&Value> = run.of_type("teardown").collect();
        assert_eq!(teardowns.len(), 2 * CONNECTIONS, "{:#?}", run.records);
        let group = |r: &Value| match by {
            None => String::new(),
            Some("lport") => r["lport"].to_string(),
            Some("rport") => r["rport"].to_string(),
            Some(_) => r["comm"].as_str().unwrap_or("?").to_owned(),
        };
        let counted = histograms(&run, by);
        assert_eq!(
            counted,
            expected(&run, group),
            "--group-by {by:?}: the histograms against the teardown records"
        );

        // Known groups: the servers' port holds every active close (lport) or every passive one
        // (rport); all the sockets were closed by this thread (comm).
        let all = CONNECTIONS as u64;
        let key = |group: &str, phase: &str, close: &str| {
            (group.to_owned(), phase.to_owned(), close.to_owned())
        };
        let known = match by {
            None => key("", "CLOSE_WAIT", "passive"),
            Some("lport") => key(&port, "FIN_WAIT2", "active"),
            Some("rport") => key(&port, "CLOSE_WAIT", "passive"),
            Some(_) => key(&comm, "CLOSE_WAIT", "passive"),
        };
        let (count, buckets) = counted
            .get(&known)
            .unwrap_or_else(|| panic!("--group-by {by:?}: no {known:?} in {counted:#?}"));
        assert_eq!(*count, all, "--group-by {by:?}: {known:?}");
        // The client's CLOSE_WAIT lasts from the server's FIN to the client's close: at least
        // DELAY (the test waited for CLOSE_WAIT first), at most what the test timed. The
        // server's FIN_WAIT2 ends there too but starts at the client's ACK of the FIN, which the
        // kernel may delay (up to TCP_DELACK_MIN, 40 ms, the time FIN_WAIT1 then takes): only
        // its upper bound holds. Each lands in a bucket between those durations' buckets.
        let longest = delays
            .iter()
            .map(|(closed, reopened)| closed.to(*reopened).1)
            .max()
            .unwrap_or(0);
        let shortest = if known.1 == "FIN_WAIT2" {
            0
        } else {
            DELAY.as_nanos() as u64
        };
        assert!(
            buckets
                .keys()
                .all(|&low| (bucket_of(shortest)..=bucket_of(longest)).contains(&low)),
            "--group-by {by:?}: {known:?} lasted {shortest} to {longest} ns: {buckets:?}"
        );
    }
}
