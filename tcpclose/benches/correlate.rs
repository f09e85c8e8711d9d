//! The correlation engine per event, with a realistic table behind it: 100k other sockets
//! followed, hung thresholds on (as `tcpclose` runs by default); its sweep for hung sockets over
//! such a table; and the memory the table takes (printed, from a counting allocator).

mod common;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    sync::atomic::{AtomicBool, AtomicIsize, Ordering::Relaxed},
};

use common::{Conn, Event, JIFFY_NS, MS, S, populate, populate_teardowns};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tcpclose::{
    event::Record,
    hung::{REPORT_AGAIN_NS, Thresholds},
    render::{Format, TeardownPrinter, WallClock},
    states::DEFAULT_MAX_SOCKETS,
    teardown::{CloseKind, Correlator, Phase},
};

/// The system allocator, counting the bytes the heap holds while [`Counting::measure`] runs.
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static HELD: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

impl Counting {
    fn count(delta: isize) {
        if COUNTING.load(Relaxed) {
            let held = HELD.fetch_add(delta, Relaxed) + delta;
            PEAK.fetch_max(held, Relaxed);
        }
    }

    /// Runs `f`; returns what it returned, the bytes it left held, and the most it held at once.
    fn measure<T>(f: impl FnOnce() -> T) -> (T, isize, isize) {
        HELD.store(0, Relaxed);
        PEAK.store(0, Relaxed);
        COUNTING.store(true, Relaxed);
        let value = f();
        COUNTING.store(false, Relaxed);
        (value, HELD.load(Relaxed), PEAK.load(Relaxed))
    }
}

// SAFETY: every call goes to the system allocator as it came; the counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc`, passed on as it came.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            Self::count(layout.size() as isize);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        Self::count(-(layout.size() as isize));
        // SAFETY: `ptr` came from this allocator, hence from `System`, with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc_zeroed`, passed on as it came.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            Self::count(layout.size() as isize);
        }
        ptr
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from `System` with `layout`; the caller's contract for `realloc`.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            Self::count(new_size as isize - layout.size() as isize);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

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
                    Ok(Record::Cause(c)) => engine.on_cause(&c, &mut done),
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

/// A table of 100k followed sockets in their teardown (see [`populate_teardowns`]), begun so far
/// ahead of the sweeps (31 years) that none is ever due, and two more sockets hung since 0: a
/// CLOSE_WAIT leak (a full socket) and an orphaned FIN_WAIT2 (a timewait socket).
fn teardown_table(thresholds: Thresholds) -> Correlator {
    let mut engine = Correlator::watching(DEFAULT_MAX_SOCKETS, thresholds);
    populate_teardowns(&mut engine, BACKGROUND, 1_000_000_000 * S);
    let mut out = Vec::new();
    for ev in Conn::new(FIRST)
        .server(0)
        .iter()
        .take(3)
        .chain(&Conn::new(FIRST + 1).orphan(0))
    {
        ev.feed(&mut engine, &mut out);
    }
    assert!(out.is_empty());
    engine
}

/// The sweep for hung sockets over 100k followed sockets. In the steady state no socket is due:
/// the tables are not even visited. When one is (here a hung socket reported again in each of
/// the two swept tables, every `REPORT_AGAIN_NS`), its table is swept whole: the cost per socket
/// of a pass, with the default thresholds (TIME_WAIT not watched) and with every phase watched.
fn poll_hung(c: &mut Criterion) {
    let mut g = c.benchmark_group("sweep_100k");
    g.throughput(Throughput::Elements(u64::from(BACKGROUND)));
    let mut every_phase = Thresholds::DEFAULT;
    every_phase.set(Phase::TimeWait, Some(120 * S));
    for (name, thresholds) in [
        ("default_thresholds", Thresholds::DEFAULT),
        ("every_phase_watched", every_phase),
    ] {
        let mut engine = teardown_table(thresholds);
        let mut alerts = Vec::new();
        // Past both hangs' thresholds (90 s at most): each sweep from now on reports both.
        let mut now = 200 * S;
        g.bench_function(format!("full_pass_{name}"), |b| {
            b.iter(|| {
                now += REPORT_AGAIN_NS;
                engine.poll_hung(now, &mut alerts);
                assert_eq!(alerts.len(), 2, "{alerts:#?}");
                alerts.clear();
            })
        });
    }
    // The steady state: the tracer's ticks (every 50 ms; a sweep is due every 2 s with the
    // default thresholds) while no socket is due. The table began 127 years ahead: no run of
    // the benchmark gets there.
    let mut engine = Correlator::watching(DEFAULT_MAX_SOCKETS, Thresholds::DEFAULT);
    populate_teardowns(&mut engine, BACKGROUND, 4_000_000_000 * S);
    let mut alerts = Vec::new();
    let mut now = 0;
    g.bench_function("ticks_none_due", |b| {
        b.iter(|| {
            now += 50 * MS;
            engine.poll_hung(now, &mut alerts);
        })
    });
    assert!(alerts.is_empty(), "{} alerts", alerts.len());
    g.bench_function("expire", |b| {
        let mut done = Vec::new();
        b.iter(|| {
            now += 50 * MS;
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

/// What 100k followed sockets in their teardown weigh (printed: heap bytes held once the table is
/// filled, and at most while it fills, as the tables grow), and how long filling takes.
fn memory(c: &mut Criterion) {
    let (engine, held, peak) = Counting::measure(|| {
        let mut engine = Correlator::watching(DEFAULT_MAX_SOCKETS, Thresholds::DEFAULT);
        populate_teardowns(&mut engine, BACKGROUND, 1_000 * S);
        engine
    });
    let per_socket = |bytes: isize| bytes as f64 / f64::from(BACKGROUND);
    println!(
        "memory_100k: {held} bytes held ({:.0} per followed socket), {peak} at most while \
         filling ({:.0} per socket)",
        per_socket(held),
        per_socket(peak),
    );
    drop(engine);
    let mut g = c.benchmark_group("memory_100k");
    g.throughput(Throughput::Elements(u64::from(BACKGROUND)));
    g.sample_size(10);
    g.bench_function("fill", |b| {
        b.iter_batched(
            || Correlator::watching(DEFAULT_MAX_SOCKETS, Thresholds::DEFAULT),
            |mut engine| {
                populate_teardowns(&mut engine, BACKGROUND, 1_000 * S);
                engine
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, correlate, poll_hung, memory);
criterion_main!(benches);
