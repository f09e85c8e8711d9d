//! Prometheus metrics (`--metrics ADDR`): the registry the run loop updates, and a small HTTP
//! server that serves it on `/metrics` in the text exposition format (OpenMetrics).
//!
//! Label values are bounded sets (states, phases, close kinds): never an address, port or pid,
//! so that the series count does not grow with connections. The opt-in container or pod label
//! (`--metrics-label`) is bounded too: see [`label`].
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

pub mod label;

use crate::{
    event::TcpState,
    teardown::{CloseKind, Phase, Teardown},
};
use anyhow::{Context as _, Result};
pub use label::{LabelBy, LabelValues};
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
    /// The kernel programs that run: `btf` or `raw` (`--programs`); empty until known.
    programs: &'static str,
}

/// Buckets of `tcpclose_teardown_phase_seconds`: 100 us to ~105 s, doubling (TIME_WAIT's 60 s
/// and tcp_fin_timeout's 60 s land below the last bound).
fn phase_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_1, 2.0, 21)
}

/// The opt-in label (`--metrics-label`): none, or one `(name, value)`.
type Extra = Vec<(&'static str, String)>;

/// The label's values are re-ranked every this many updates: a minute at one a second
/// (`run::METRICS_REFRESH`). Less often would keep a finished container's series longer; more
/// often would drop and recreate the series of a bursty one (its histogram restarting at zero).
const RERANK_EVERY_UPDATES: u64 = 60;

type PhaseHistograms = Family<(PhaseLabels, Extra), Histogram, fn() -> Histogram>;

/// The hung sockets now, as the gauge shows them.
pub enum HungNow<'a> {
    /// Per teardown state.
    ByState(&'a [(Phase, u64)]),
    /// Per teardown state and `--metrics-label` value (a container id, a pod UID, `none`).
    ByLabel(&'a [(Phase, String, u64)]),
}

/// Everything tcpclose exports.
pub struct Metrics {
    registry: Registry,
    phase_seconds: PhaseHistograms,
    teardowns: Family<CloseLabels, Counter>,
    transitions: Family<TransitionLabels, Counter>,
    /// `transitions` by state numbers, so that counting one costs an atomic add.
    transition_counters: Vec<Option<Counter>>,
    sockets: Family<StateLabels, Gauge>,
    hung: Family<(StateLabels, Extra), Gauge>,
    /// `--metrics-label`: what the phase histogram and the hung gauge are labelled by, and which
    /// values have series of their own.
    label: Option<(LabelBy, LabelValues)>,
    /// Calls to [`Metrics::update`] so far.
    updates: u64,
    lost: Counter,
    lost_seen: u64,
    matched: Counter,
    matched_seen: u64,
    received: Counter,
    received_seen: u64,
    missed: Counter,
    missed_seen: u64,
    tracked: Gauge,
    build_info: Family<BuildLabels, Gauge>,
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
        m.update(&[], HungNow::ByState(&[]), 0, EventTotals::default());
        m
    }

    /// With the phase histogram and the hung gauge labelled by container or pod: the `top`
    /// busiest values, `other` and `none` (see [`label`]).
    pub fn labelled(mut self, by: LabelBy, top: usize) -> Self {
        self.label = Some((by, LabelValues::new(top)));
        self.hung.clear();
        self.phase_seconds.clear();
        touch_all(&self);
        self.update(&[], HungNow::ByLabel(&[]), 0, EventTotals::default());
        self
    }

    /// Says which kernel programs run (`btf` or `raw`) in `tcpclose_build_info`.
    pub fn ran(self, programs: &'static str) -> Self {
        self.build_info.clear();
        self.build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                programs,
            })
            .set(1);
        self
    }

    /// What the phase histogram and the hung gauge are labelled by, if anything.
    pub fn labelled_by(&self) -> Option<LabelBy> {
        self.label.as_ref().map(|(by, _)| *by)
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
        let hung = Family::<(StateLabels, Extra), Gauge>::default();
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
                programs: "",
            })
            .set(1);
        registry.register(
            "tcpclose_build_info",
            "tcpclose's version and the kernel programs that run (btf or raw), as labels of a \
             gauge set to 1",
            build_info.clone(),
        );
        Self {
            registry,
            phase_seconds,
            teardowns,
            transitions,
            transition_counters: vec![None; 13 * 13],
            sockets,
            hung,
            label: None,
            updates: 0,
            lost,
            lost_seen: 0,
            matched,
            matched_seen: 0,
            received,
            received_seen: 0,
            missed,
            missed_seen: 0,
            tracked,
            build_info,
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

    /// Counts a teardown and its phases; `value`: its `--metrics-label` value (see
    /// [`LabelBy::value`]), ignored without the label.
    pub fn teardown(&mut self, t: &Teardown, value: &str) {
        let close = t.close.name();
        self.teardowns.get_or_create(&CloseLabels { close }).inc();
        let extra: Extra = match &mut self.label {
            Some((by, values)) => vec![(by.key(), values.label(value, 1).to_owned())],
            None => Vec::new(),
        };
        for (phase, ns) in t.phases.iter() {
            self.phase_seconds
                .get_or_create(&(
                    PhaseLabels {
                        phase: phase.name(),
                        close,
                    },
                    extra.clone(),
                ))
                .observe(ns as f64 / 1e9);
        }
    }

    /// Sets the hung gauge. With a label, every admitted value, `other` and `none` get every
    /// state, at zero when none is hung: a series does not vanish when its hangs resolve.
    fn set_hung(&mut self, hung: HungNow) {
        let key = self.label.as_ref().map(|(by, _)| by.key());
        let mut counts: Vec<(Phase, Extra, u64)> = Vec::new();
        let mut add = |phase: Phase, extra: Extra, n: u64| match counts
            .iter_mut()
            .find(|(p, e, _)| *p == phase && *e == extra)
        {
            Some((_, _, total)) => *total += n,
            None => counts.push((phase, extra, n)),
        };
        match (hung, &mut self.label) {
            (HungNow::ByLabel(hung), Some((by, values))) => {
                let mut shown: Vec<String> = values.admitted().to_vec();
                shown.extend([label::OTHER.to_owned(), label::NONE.to_owned()]);
                for phase in Phase::ALL {
                    for value in &shown {
                        add(phase, vec![(by.key(), value.clone())], 0);
                    }
                }
                for (phase, value, n) in hung {
                    let value = values.label(value, *n).to_owned();
                    add(*phase, vec![(by.key(), value)], *n);
                }
            }
            (HungNow::ByState(hung), _) => {
                for phase in Phase::ALL {
                    let n = hung
                        .iter()
                        .find(|(p, _)| *p == phase)
                        .map_or(0, |(_, n)| *n);
                    add(
                        phase,
                        key.map(|k| vec![(k, label::OTHER.to_owned())])
                            .unwrap_or_default(),
                        n,
                    );
                }
            }
            (HungNow::ByLabel(hung), None) => {
                for phase in Phase::ALL {
                    let n = hung
                        .iter()
                        .filter(|(p, ..)| *p == phase)
                        .map(|(.., n)| n)
                        .sum();
                    add(phase, Vec::new(), n);
                }
            }
        }
        // Gone values' series go; a scrape never sees the gauge half set (encoded after this).
        self.hung.clear();
        for (phase, extra, n) in counts {
            self.hung
                .get_or_create(&(
                    StateLabels {
                        state: phase.name(),
                    },
                    extra,
                ))
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Re-ranks the label's values (see [`LabelValues::rerank`]) and removes the phase series of
    /// those no longer admitted: their next teardowns count under `other`.
    fn rerank_label(&mut self) {
        let Some((by, values)) = &mut self.label else {
            return;
        };
        for value in values.rerank() {
            for phase in Phase::ALL {
                for close in CloseKind::ALL {
                    self.phase_seconds.remove(&(
                        PhaseLabels {
                            phase: phase.name(),
                            close: close.name(),
                        },
                        vec![(by.key(), value.clone())],
                    ));
                }
            }
        }
    }

    /// Sets the gauges: sockets followed per state, hung per teardown state, table size; and
    /// brings the event counters to the totals so far (`matched = received + lost`, give or take
    /// what is in the ring).
    pub fn update(
        &mut self,
        sockets: &[(TcpState, u64)],
        hung: HungNow,
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
        self.updates += 1;
        if self.updates.is_multiple_of(RERANK_EVERY_UPDATES) {
            self.rerank_label();
        }
        self.set_hung(hung);
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

/// Close kinds, and the phase histograms of the phases each orderly close kind goes through, so
/// that every one appears in the exposition from the start: a series that appears with its first
/// observation makes `rate()` and `increase()` miss that observation (Prometheus has no sample
/// before it), and a rare phase (CLOSING, a FIN_WAIT2 timeout) would never show on a dashboard.
/// With `--metrics-label`, the histograms of `none` and `other` are made; a container's own
/// appear with its first teardown.
pub fn touch_all(metrics: &Metrics) {
    for close in CloseKind::ALL {
        drop(metrics.teardowns.get_or_create(&CloseLabels {
            close: close.name(),
        }));
    }
    let extras: Vec<Extra> = match &metrics.label {
        Some((by, _)) => [label::NONE, label::OTHER]
            .map(|value| vec![(by.key(), value.to_owned())])
            .into(),
        None => vec![Vec::new()],
    };
    for close in CloseKind::ALL {
        for phase in close.phases() {
            for extra in &extras {
                let labels = PhaseLabels {
                    phase: phase.name(),
                    close: close.name(),
                };
                drop(
                    metrics
                        .phase_seconds
                        .get_or_create(&(labels, extra.clone())),
                );
            }
        }
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

/// The metrics address given cannot be listened on (in use, not an address of this host, a
/// privileged port): a mistake on the command line, reported before anything is loaded into the
/// kernel, with the exit status of the command line's other mistakes (2).
#[derive(Debug)]
pub struct UnusableAddress {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

impl std::fmt::Display for UnusableAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot serve metrics on {}: {}: choose another address with --metrics",
            self.addr, self.source
        )
    }
}

impl std::error::Error for UnusableAddress {}

/// Binds `addr` for the metrics: at start-up, before the programs are loaded, so that a busy port
/// is a quick error. [`serve`] then serves on it.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, UnusableAddress> {
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|source| UnusableAddress { addr, source })?;
    Ok(listener)
}

/// The serving task on `listener` (from [`bind`]); needs the runtime.
pub fn serve(
    listener: std::net::TcpListener,
    exposition: Arc<std::sync::Mutex<String>>,
) -> Result<impl std::future::Future<Output = ()>> {
    let listener = TcpListener::from_std(listener).context("serving metrics on the event loop")?;
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
            HungNow::ByState(&[(Phase::CloseWait, 2)]),
            7,
            events(5),
        );
        m.update(&[], HungNow::ByState(&[]), 0, events(9));
        m.teardown(&passive_close(300_000_000), "ignored without a label");
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

    fn passive_close(close_wait_ns: u64) -> Teardown {
        let mut phases = crate::teardown::Phases::default();
        phases.add(Phase::CloseWait, close_wait_ns);
        Teardown {
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
            ..Teardown::sample(CloseKind::Passive, &[])
        }
    }

    /// The series of the phase histogram with this label, one line per bucket and per sum and
    /// count.
    fn series_with(text: &str, metric: &str, label: &str) -> usize {
        text.lines()
            .filter(|l| l.starts_with(metric) && l.contains(label))
            .count()
    }

    #[test]
    fn labelled_by_container_the_busiest_get_series_and_the_rest_are_other() {
        let mut m = Metrics::at_start().labelled(LabelBy::Container, 2);
        let text = m.encode();
        for value in ["other", "none"] {
            assert!(
                text.contains(&format!(
                    "tcpclose_hung_sockets{{state=\"CLOSE_WAIT\",container_id=\"{value}\"}} 0"
                )),
                "{text}"
            );
        }
        for (value, n) in [("aaa", 3), ("bbb", 1), ("ccc", 5), ("none", 1)] {
            for _ in 0..n {
                m.teardown(&passive_close(1_000_000), value);
            }
        }
        let hung = [
            (Phase::CloseWait, "aaa".to_owned(), 4),
            (Phase::CloseWait, "ccc".to_owned(), 2),
            (Phase::LastAck, "none".to_owned(), 1),
        ];
        m.update(&[], HungNow::ByLabel(&hung), 0, EventTotals::default());
        let text = m.encode();
        let count = |value: &str| {
            format!(
                "tcpclose_teardown_phase_seconds_count{{phase=\"CLOSE_WAIT\",close=\"passive\",container_id=\"{value}\"}}"
            )
        };
        // The first two values took the two places; the third counts as other until re-ranked.
        assert!(text.contains(&format!("{} 3", count("aaa"))), "{text}");
        assert!(text.contains(&format!("{} 1", count("bbb"))), "{text}");
        assert!(text.contains(&format!("{} 5", count("other"))), "{text}");
        assert!(text.contains(&format!("{} 1", count("none"))), "{text}");
        assert!(
            text.contains("tcpclose_hung_sockets{state=\"CLOSE_WAIT\",container_id=\"aaa\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("tcpclose_hung_sockets{state=\"CLOSE_WAIT\",container_id=\"other\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("tcpclose_hung_sockets{state=\"LAST_ACK\",container_id=\"none\"} 1"),
            "{text}"
        );
        // A minute of updates later: ccc (5 teardowns, 2 hung a second) took bbb's place; bbb's
        // series are gone and its next teardown counts as other.
        for _ in 0..RERANK_EVERY_UPDATES {
            m.update(&[], HungNow::ByLabel(&hung), 0, EventTotals::default());
        }
        m.teardown(&passive_close(1_000_000), "bbb");
        let text = m.encode();
        assert_eq!(
            series_with(&text, "tcpclose_", "container_id=\"bbb\""),
            0,
            "{text}"
        );
        assert!(
            text.contains("tcpclose_hung_sockets{state=\"CLOSE_WAIT\",container_id=\"ccc\"} 2"),
            "{text}"
        );
        assert!(text.contains(&format!("{} 6", count("other"))), "{text}");
        // Bounded: 2 values, other and none.
        let values: std::collections::BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.split("container_id=\"").nth(1))
            .filter_map(|rest| rest.split('"').next())
            .collect();
        assert_eq!(
            values,
            ["aaa", "ccc", "none", "other"].into_iter().collect(),
            "{text}"
        );
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

    /// `increase()` over a histogram series counts nothing before the series' first sample: the
    /// phases of every orderly close kind are at zero from the start, labelled or not.
    #[test]
    fn the_phase_histograms_of_orderly_closes_start_at_zero() {
        let expected = |extra: &str| -> Vec<String> {
            CloseKind::ALL
                .iter()
                .flat_map(|close| close.phases().iter().map(move |phase| (phase, close)))
                .map(|(phase, close)| {
                    format!(
                        "tcpclose_teardown_phase_seconds_count{{phase=\"{}\",close=\"{}\"{extra}}} 0",
                        phase.name(),
                        close.name()
                    )
                })
                .collect()
        };
        let text = Metrics::at_start().encode();
        for series in expected("") {
            assert!(text.contains(&series), "{series} missing from:\n{text}");
        }
        assert!(
            text.contains(
                "tcpclose_teardown_phase_seconds_count{phase=\"CLOSING\",close=\"simultaneous\"} 0"
            ),
            "{text}"
        );
        let text = Metrics::at_start().labelled(LabelBy::Container, 2).encode();
        for value in ["none", "other"] {
            for series in expected(&format!(",container_id=\"{value}\"")) {
                assert!(text.contains(&series), "{series} missing from:\n{text}");
            }
        }
        assert_eq!(
            series_with(&text, "tcpclose_teardown_phase_seconds_count{", "phase"),
            2 * 10,
            "only the labelled series: {text}"
        );
    }
}
