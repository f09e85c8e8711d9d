//! Output: one teardown record (JSON and text) and one transition (JSON, `--events`), written
//! into memory.

mod common;

use std::hint::black_box;

use common::{Conn, Event, S};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tcpclose::{
    hung::Thresholds,
    render::{EventPrinter, Format, TeardownPrinter, WallClock},
    teardown::{Correlator, Teardown},
};

/// A client's active close as the engine reports it: three phases, owner known, TIME_WAIT timed.
fn teardown() -> Teardown {
    let mut c = Correlator::watching(1024, Thresholds::DEFAULT);
    let mut out = Vec::new();
    for ev in Conn::new(7).client(1_000 * S) {
        ev.feed(&mut c, &mut out);
    }
    assert_eq!(out.len(), 1);
    out.remove(0)
}

fn render(c: &mut Criterion) {
    // 2023-11-14T22:13:20Z at monotonic 0.
    let clock = WallClock::with_offset(1_700_000_000_000_000_000);
    let teardown = teardown();
    let mut g = c.benchmark_group("render");
    g.throughput(Throughput::Elements(1));
    for (name, format) in [
        ("teardown_json", Format::Json),
        ("teardown_text", Format::Text),
    ] {
        let mut printer = TeardownPrinter::new(format, clock, false);
        let mut out = Vec::with_capacity(4096);
        // The text header comes once, before the first line.
        printer.print(&mut out, &teardown).unwrap();
        g.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                printer.print(&mut out, black_box(&teardown)).unwrap();
                black_box(&out);
            })
        });
    }
    let Event::Transition(transition) = Conn::new(7).client(1_000 * S)[2] else {
        unreachable!()
    };
    let mut printer = EventPrinter::new(Format::Json, clock);
    let mut out = Vec::with_capacity(4096);
    g.bench_function("transition_json", |b| {
        b.iter(|| {
            out.clear();
            printer
                .print(&mut out, black_box(&transition), Some(99_000_000))
                .unwrap();
            black_box(&out);
        })
    });
    g.finish();
}

criterion_group!(benches, render);
criterion_main!(benches);
