//! Prometheus metrics (`--metrics ADDR`): the registry the run loop updates, and a small HTTP
//! server that serves it on `/metrics` in the text exposition format (OpenMetrics).
//!
//! Label values are bounded sets (states, phases, close kinds): never an address, port or pid,
//! so that the series count does not grow with connections.
//!
//! The server is a few lines of our own over tokio rather than an HTTP framework: it answers one
//! GET per connection, with a deadline on reading the request and on writing the answer, so a
//! slow or stuck scraper only holds its own task. The exposition is encoded into memory first
//! (a fraction of a millisecond); the run loop, on the same thread, is never waiting on a
//! scraper's socket.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use crate::{
    event::TcpState,
    teardown::{CloseKind, Phase, Teardown},
};
use anyhow::{Context as _, Result};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
    close: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    close: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    from: &'static str,
    to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Buckets of `tcpclose_teardown_phase_seconds`: 100 us to ~105 s, doubling (TIME_WAIT's 60 s
/// and tcp_fin_timeout's 60 s land below the last bound).
fn phase_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_1, 2.0, 21)
}

type PhaseHistograms = Family<PhaseLabels, Histogram, fn() -> Histogram>;

/// Everything tcpclose exports.
pub struct Metrics {
    registry: Registry,
    phase_seconds: PhaseHistograms,
    teardowns: Family<CloseLabels, Counter>,
    transitions: Family<TransitionLabels, Counter>,
    /// `transitions` by state numbers, so that counting one costs an atomic add.
    transition_counters: Vec<Option<Counter>>,
    sockets: Family<StateLabels, Gauge>,
    hung: Family<StateLabels, Gauge>,
    lost: Counter,
    lost_seen: u64,
    matched: Counter,
    matched_seen: u64,
    received: Counter,
    received_seen: u64,
    missed: Counter,
    missed_seen: u64,
    tracked: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The metrics as they are served before the first refresh: every series with fixed labels
    /// at zero, as after a refresh (a scrape may come before the run loop's first one). The
    /// phase histograms and the transitions appear with their first observation.
    pub fn at_start() -> Self {
        let mut m = Self::new();
        touch_all(&m);
        m.update(&[], &[], 0, EventTotals::default());
        m
    }

    pub fn new() -> Self {
        let mut registry = Registry::default();
        let phase_seconds: PhaseHistograms =
            Family::new_with_constructor(|| Histogram::new(phase_buckets()));
        registry.register(
            "tcpclose_teardown_phase_seconds",
            "Time connections spent in each teardown phase (FIN_WAIT1, FIN_WAIT2, CLOSING, \
             TIME_WAIT, CLOSE_WAIT, LAST_ACK), by how the connection closed",
            phase_seconds.clone(),
        );
        let teardowns = Family::<CloseLabels, Counter>::default();
        registry.register(
            "tcpclose_teardowns",
            "Connections that ended, by how they closed (active, passive, simultaneous, reset, \
             failed, fin_timeout)",
            teardowns.clone(),
        );
        let transitions = Family::<TransitionLabels, Counter>::default();
        registry.register(
            "tcpclose_transitions",
            "TCP state changes seen (sock:inet_sock_set_state)",
            transitions.clone(),
        );
        let sockets = Family::<StateLabels, Gauge>::default();
        registry.register(
            "tcpclose_sockets",
            "Sockets tcpclose follows now, by TCP state",
            sockets.clone(),
        );
        let hung = Family::<StateLabels, Gauge>::default();
        registry.register(
            "tcpclose_hung_sockets",
            "Sockets in a teardown state for longer than its --hung threshold, now",
            hung.clone(),
        );
        let lost = Counter::default();
        registry.register(
            "tcpclose_lost_events",
            "Kernel events dropped because the ring buffer was full",
            lost.clone(),
        );
        let matched = Counter::default();
        registry.register(
            "tcpclose_kernel_events",
            "Events the kernel programs accepted (after the port and family filters): each is \
             received or lost",
            matched.clone(),
        );
        let received = Counter::default();
        registry.register(
            "tcpclose_received_events",
            "Events read from the ring buffer",
            received.clone(),
        );
        let missed = Counter::default();
        registry.register(
            "tcpclose_missed_events",
            "Tracepoint hits the kernel did not hand to tcpclose's programs because one was \
             already running on that CPU (BPF recursion protection): never matched nor received",
            missed.clone(),
        );
        let tracked = Gauge::default();
        registry.register(
            "tcpclose_tracked_sockets",
            "Sockets in tcpclose's table (bounded by --max-sockets)",
            tracked.clone(),
        );
        // A gauge set to 1 rather than an OpenMetrics `info`: the classic text parsers
        // (promtool 2.x among them) refuse the `info` type.
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "tcpclose_build_info",
            "tcpclose's version, as a label of a gauge set to 1",
            build_info,
        );
        Self {
            registry,
            phase_seconds,
            teardowns,
            transitions,
            transition_counters: vec![None; 13 * 13],
            sockets,
            hung,
            lost,
            lost_seen: 0,
            matched,
            matched_seen: 0,
            received,
            received_seen: 0,
            missed,
            missed_seen: 0,
            tracked,
        }
    }

    pub fn transition(&mut self, from: TcpState, to: TcpState) {
        let slot = &mut self.transition_counters[from as usize * 13 + to as usize];
        slot.get_or_insert_with(|| {
            self.transitions
                .get_or_create(&TransitionLabels {
                    from: from.name(),
                    to: to.name(),
                })
                .clone()
        })
        .inc();
    }

    pub fn teardown(&self, t: &Teardown) {
        let close = t.close.name();
        self.teardowns.get_or_create(&CloseLabels { close }).inc();
        for (phase, ns) in t.phases.iter() {
            self.phase_seconds
                .get_or_create(&PhaseLabels {
                    phase: phase.name(),
                    close,
                })
                .observe(ns as f64 / 1e9);
        }
    }

    /// Sets the gauges: sockets followed per state, hung per teardown state, table size; and
    /// brings the event counters to the totals so far (`matched = received + lost`, give or take
    /// what is in the ring).
    pub fn update(
        &mut self,
        sockets: &[(TcpState, u64)],
        hung: &[(Phase, u64)],
        tracked: usize,
        events: EventTotals,
    ) {
        for state in TcpState::ALL {
            let n = sockets
                .iter()
                .find(|(s, _)| *s == state)
                .map_or(0, |(_, n)| *n);
            self.sockets
                .get_or_create(&StateLabels {
                    state: state.name(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        for phase in Phase::ALL {
            let n = hung
                .iter()
                .find(|(p, _)| *p == phase)
                .map_or(0, |(_, n)| *n);
            self.hung
                .get_or_create(&StateLabels {
                    state: phase.name(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.tracked.set(i64::try_from(tracked).unwrap_or(i64::MAX));
        for (counter, seen, total) in [
            (&self.lost, &mut self.lost_seen, events.lost),
            (&self.matched, &mut self.matched_seen, events.matched),
            (&self.received, &mut self.received_seen, events.received),
            (&self.missed, &mut self.missed_seen, events.missed),
        ] {
            if total > *seen {
                counter.inc_by(total - *seen);
                *seen = total;
            }
        }
    }

    /// The exposition, as served.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// Totals since start of the kernel's events.
#[derive(Clone, Copy, Debug, Default)]
pub struct EventTotals {
    pub matched: u64,
    pub received: u64,
    pub lost: u64,
    /// Hits the kernel skipped (see `tcpclose_missed_events`).
    pub missed: u64,
}

/// Close kinds, so that every one appears in the exposition from the start (a counter that
/// appears late makes `rate()` miss its first increase).
pub fn touch_all(metrics: &Metrics) {
    for close in [
        CloseKind::Active,
        CloseKind::Passive,
        CloseKind::Simultaneous,
        CloseKind::Reset,
        CloseKind::Failed,
        CloseKind::FinTimeout,
    ] {
        drop(metrics.teardowns.get_or_create(&CloseLabels {
            close: close.name(),
        }));
    }
}

/// `--metrics` values: `PORT` (loopback only) or `ADDR:PORT`.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    s.parse().map_err(|_| {
        "expected PORT (listens on 127.0.0.1) or ADDR:PORT, e.g. 9464, 0.0.0.0:9464, [::]:9464"
            .to_owned()
    })
}

/// How long a scraper may take to send its request, and to take the answer.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
const ANSWER_DEADLINE: Duration = Duration::from_secs(10);

/// Binds `addr` now (so that a busy port is an error at start-up) and returns the serving task.
pub async fn serve(
    addr: SocketAddr,
    exposition: Arc<std::sync::Mutex<String>>,
) -> Result<impl std::future::Future<Output = ()>> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("cannot serve metrics on {addr}: choose another address with --metrics")
    })?;
    Ok(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of file descriptors and the like: try again shortly.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let exposition = exposition.clone();
            tokio::spawn(async move {
                let _ = answer(stream, exposition).await;
            });
        }
    })
}

async fn answer(
    mut stream: TcpStream,
    exposition: Arc<std::sync::Mutex<String>>,
) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let read = async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            request.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(REQUEST_DEADLINE, read).await.is_err() {
        return Ok(());
    }
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let response = if method != b"GET" && method != b"HEAD" {
        plain(405, "Method Not Allowed", "only GET\n")
    } else if path.split(|&b| b == b'?').next() != Some(b"/metrics") {
        plain(
            404,
            "Not Found",
            "tcpclose serves its metrics on /metrics\n",
        )
    } else {
        let body = exposition
            .lock()
            .map(|text| text.clone())
            .unwrap_or_default();
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; \
             charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let mut response = head.into_bytes();
        if method == b"GET" {
            response.extend_from_slice(body.as_bytes());
        }
        response
    };
    let write = async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(ANSWER_DEADLINE, write).await;
    Ok(())
}

fn plain(code: u16, reason: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen("9464"), Ok("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(
            parse_listen("0.0.0.0:9464"),
            Ok("0.0.0.0:9464".parse().unwrap())
        );
        assert_eq!(parse_listen("[::]:9464"), Ok("[::]:9464".parse().unwrap()));
        assert!(parse_listen("localhost").is_err());
        assert!(parse_listen("99999").is_err());
    }

    #[test]
    fn exposition_has_base_units_and_bounded_labels() {
        let mut m = Metrics::new();
        touch_all(&m);
        m.transition(TcpState::Established, TcpState::CloseWait);
        m.transition(TcpState::Established, TcpState::CloseWait);
        let events = |lost| EventTotals {
            matched: 100 + lost,
            received: 100,
            lost,
            missed: 2,
        };
        m.update(
            &[(TcpState::CloseWait, 3)],
            &[(Phase::CloseWait, 2)],
            7,
            events(5),
        );
        m.update(&[], &[], 0, events(9));
        let mut phases = crate::teardown::Phases::default();
        phases.add(Phase::CloseWait, 300_000_000);
        m.teardown(&Teardown {
            end_ns: 0,
            family: crate::event::Family::Ipv4,
            local: "127.0.0.1:8080".parse().unwrap(),
            remote: "127.0.0.1:40000".parse().unwrap(),
            side: None,
            close: CloseKind::Passive,
            phases,
            teardown_ns: None,
            lifetime_ns: None,
            complete: true,
            owner: None,
            resolution_ns: None,
            timewait_end: None,
        });
        let text = m.encode();
        // 300 ms lands in the (0.2048, 0.4096] bucket.
        assert!(
            text.contains(
                "tcpclose_teardown_phase_seconds_bucket{le=\"0.2048\",phase=\"CLOSE_WAIT\",close=\"passive\"} 0"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "tcpclose_teardown_phase_seconds_bucket{le=\"0.4096\",phase=\"CLOSE_WAIT\",close=\"passive\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("tcpclose_teardowns_total{close=\"passive\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tcpclose_transitions_total{from=\"ESTABLISHED\",to=\"CLOSE_WAIT\"} 2"),
            "{text}"
        );
        assert!(text.contains("tcpclose_lost_events_total 9"), "{text}");
        assert!(text.contains("tcpclose_missed_events_total 2"), "{text}");
        assert!(text.contains("tcpclose_kernel_events_total 109"), "{text}");
        assert!(
            text.contains("tcpclose_received_events_total 100"),
            "{text}"
        );
        assert!(
            text.contains("tcpclose_hung_sockets{state=\"CLOSE_WAIT\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("tcpclose_teardowns_total{close=\"fin_timeout\"} 0"),
            "{text}"
        );
        assert!(text.contains("tcpclose_build_info{version="), "{text}");
        assert!(
            text.contains("# TYPE tcpclose_teardown_phase_seconds histogram"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn every_series_is_served_from_the_first_scrape() {
        let text = Metrics::at_start().encode();
        for series in [
            "tcpclose_teardowns_total{close=\"active\"} 0",
            "tcpclose_sockets{state=\"CLOSE_WAIT\"} 0",
            "tcpclose_hung_sockets{state=\"CLOSE_WAIT\"} 0",
            "tcpclose_hung_sockets{state=\"FIN_WAIT2\"} 0",
            "tcpclose_tracked_sockets 0",
            "tcpclose_kernel_events_total 0",
            "tcpclose_received_events_total 0",
            "tcpclose_lost_events_total 0",
            "tcpclose_missed_events_total 0",
            "tcpclose_build_info{version=",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
    }
}
