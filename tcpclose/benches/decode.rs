//! `Record::decode`: kernel bytes to a typed event, once per ring buffer record.

mod common;

use std::hint::black_box;

use common::{Conn, JIFFY_NS, bytes, raw_transition};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tcpclose::event::Record;
use tcpclose_common::{AF_INET6, TIMEWAIT_EVENT_SIZE, TRANSITION_EVENT_SIZE};

fn decode(c: &mut Criterion) {
    let conn = Conn::new(7);
    let client = conn.client(1_000 * common::S);
    let transition = client[2].record();
    let timewait = client[4].record();
    assert_eq!(transition.len(), TRANSITION_EVENT_SIZE);
    assert_eq!(timewait.len(), TIMEWAIT_EVENT_SIZE);
    let common::Event::Transition(t) = client[2] else {
        unreachable!()
    };
    let mut raw6 = raw_transition(&t);
    raw6.family = AF_INET6;
    raw6.saddr = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    raw6.daddr = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let transition6 = bytes(&raw6);

    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    for (name, record) in [
        ("transition_ipv4", &transition),
        ("transition_ipv6", &transition6),
        ("timewait_ipv4", &timewait),
    ] {
        assert!(Record::decode(record, JIFFY_NS).is_ok(), "{name}");
        g.bench_function(name, |b| {
            b.iter(|| Record::decode(black_box(record), black_box(JIFFY_NS)))
        });
    }
    g.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
