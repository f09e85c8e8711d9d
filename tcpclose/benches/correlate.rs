//! The correlation engine per event, with a realistic table behind it: 100k other sockets
//! followed, hung thresholds on (as `tcpclose` runs by default).

mod common;

use std::hint::black_box;

use common::{Conn, Event, JIFFY_NS, MS, S, populate};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tcpclose::{
    event::Record,
    hung::{SWEEP_NS, Thresholds},
    render::{Format, TeardownPrinter, WallClock},
    states::DEFAULT_MAX_SOCKETS,
    teardown::{CloseKind, Correlator, Phase},
};

/// Sockets already followed when the measured connections come and go.
const BACKGROUND: u32 = 100_000;
/// The measured connections rotate over this many socket addresses and 4-tuples, so that they do
/// not always hit the same hash slots.
const SLOTS: u32 = 1024;
/// Connection numbers of the measured connections (the background's are `0..BACKGROUND`).
const FIRST: u32 = 1 << 20;
const T0: u64 = 1_000 * S;

fn engine() -> Correlator {
    let mut c = Correlator::watching(DEFAULT_MAX_SOCKETS, Thresholds::DEFAULT);
    populate(&mut c, BACKGROUND, T0);
    c
}

fn clients() -> Vec<[Event; 7]> {
    (0..SLOTS)
        .map(|j| Conn::new(FIRST + 2 * j).client(T0 + S + u64::from(j) * MS))
        .collect()
}

fn servers() -> Vec<[Event; 5]> {
    (0..SLOTS)
        .map(|j| Conn::new(FIRST + 2 * j + 1).server(T0 + S + u64::from(j) * MS))
        .collect()
}

/// Each sequence yields the one record it should, and leaves the table as it found it.
fn check_sequences(clients: &[[Event; 7]], servers: &[[Event; 5]]) {
    let mut c = engine();
    let mut out = Vec::new();
    for ev in &clients[0] {
        ev.feed(&mut c, &mut out);
    }
    assert_eq!(out.len(), 1, "{out:#?}");
    let t = &out[0];
    assert!(t.complete && t.close == CloseKind::Active, "{t:#?}");
    assert_eq!(t.phases.get(Phase::TimeWait), Some(60 * S));
    out.clear();
    for ev in &servers[0] {
        ev.feed(&mut c, &mut out);
    }
    assert_eq!(out.len(), 1, "{out:#?}");
    assert!(out[0].complete && out[0].close == CloseKind::Passive);
    assert_eq!(c.len(), BACKGROUND as usize);
    assert_eq!(c.losses(), Default::default());
}

fn correlate(c: &mut Criterion) {
    let clients = clients();
    let servers = servers();
    check_sequences(&clients, &servers);

    let mut g = c.benchmark_group("correlate_100k");
    let mut bench = |name: &str, events: u64, seq: &dyn Fn(usize) -> &'static [Event]| {
        let mut engine = engine();
        let mut out = Vec::new();
        g.throughput(Throughput::Elements(events));
        let mut k = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                for ev in seq(k) {
                    ev.feed(&mut engine, &mut out);
                }
                k = (k + 1) % SLOTS as usize;
                black_box(&out);
                out.clear();
            })
        });
        assert_eq!(engine.len(), BACKGROUND as usize);
    };
    let clients: &'static [[Event; 7]] = clients.leak();
    let servers: &'static [[Event; 5]] = servers.leak();
    let pairs: &'static [[Event; 12]] = clients
        .iter()
        .zip(servers)
        .map(|(c, s)| {
            let mut pair = [c[0]; 12];
            pair[..7].copy_from_slice(c);
            pair[7..].copy_from_slice(s);
            pair
        })
        .collect::<Vec<_>>()
        .leak();
    bench("client_7_events", 7, &|k| &clients[k]);
    bench("server_5_events", 5, &|k| &servers[k]);
    bench("client_and_server_12_events", 12, &|k| &pairs[k]);
    g.finish();

    // What the tracer does per record in its default view: decode, correlate, print the
    // teardowns completed as JSON lines (into memory).
    let records: Vec<Vec<Vec<u8>>> = pairs
        .iter()
        .map(|pair| pair.iter().map(Event::record).collect())
        .collect();
    let mut g = c.benchmark_group("pipeline_100k");
    g.throughput(Throughput::Elements(12));
    let mut engine = engine();
    let mut printer = TeardownPrinter::new(Format::Json, WallClock::with_offset(0), false);
    let mut done = Vec::new();
    let mut sink = Vec::with_capacity(64 << 10);
    let mut k = 0;
    g.bench_function("decode_correlate_json_12_events", |b| {
        b.iter(|| {
            for bytes in &records[k] {
                match Record::decode(bytes, JIFFY_NS) {
                    Ok(Record::Transition(t)) => engine.on_transition(&t, &mut done),
                    Ok(Record::Timewait(ev)) => engine.on_timewait(&ev, &mut done),
                    Err(err) => panic!("{err}"),
                }
                for t in done.drain(..) {
                    printer.print(&mut sink, &t).unwrap();
                }
            }
            k = (k + 1) % SLOTS as usize;
            black_box(&sink);
            sink.clear();
        })
    });
    g.finish();
}

/// The sweep for hung sockets (at most every `SWEEP_NS`) over 100k followed sockets, none due:
/// the steady state. The table's sockets began far after `now`, so that however many sweeps
/// run, none crosses a threshold and every sweep does the same work.
fn poll_hung(c: &mut Criterion) {
    let mut engine = Correlator::watching(DEFAULT_MAX_SOCKETS, Thresholds::DEFAULT);
    populate(&mut engine, BACKGROUND, 1_000_000 * S);
    let mut alerts = Vec::new();
    let mut g = c.benchmark_group("sweep_100k");
    g.throughput(Throughput::Elements(u64::from(BACKGROUND)));
    let mut now = 0;
    g.bench_function("poll_hung", |b| {
        b.iter(|| {
            now += SWEEP_NS;
            engine.poll_hung(now, &mut alerts);
        })
    });
    assert!(alerts.is_empty(), "{} alerts", alerts.len());
    g.bench_function("expire", |b| {
        let mut done = Vec::new();
        b.iter(|| {
            now += SWEEP_NS;
            engine.expire(now, &mut done);
        });
        assert!(done.is_empty());
    });
    // One sweep that does find them all hung: the cost of the alerts themselves.
    g.bench_function("poll_hung_all_watched_due", |b| {
        b.iter_batched(
            || {
                let mut engine = Correlator::watching(DEFAULT_MAX_SOCKETS, Thresholds::DEFAULT);
                populate(&mut engine, BACKGROUND, 0);
                engine
            },
            |mut engine| {
                let mut alerts = Vec::new();
                engine.poll_hung(1_000 * S, &mut alerts);
                assert_eq!(alerts.len(), BACKGROUND as usize / 4);
                (engine, alerts)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, correlate, poll_hung);
criterion_main!(benches);
