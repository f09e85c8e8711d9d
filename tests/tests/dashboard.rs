//! The Grafana dashboard (`deploy/grafana/tcpclose.json`) against a real Prometheus server
//! scraping a real tcpclose (`--metrics-label container`): traffic that goes through every
//! teardown the dashboard shows (an active and a passive close, FINs that cross, an orphaned
//! FIN_WAIT2 that times out, a CLOSE_WAIT leak in a Kubernetes container), then every panel's
//! query, as Grafana would send it, must return series, and the ones about that traffic must see
//! it. A panel added without a check here fails the test.
//!
//! Grafana substitutes the dashboard's variables before it queries: `$job` and `$instance`
//! (multi-value, "All" by default) become regular expressions, `$__rate_interval` a range of at
//! least four scrape intervals. Here: `tcpclose`, `.*`, and a range that covers the whole test.

use std::{
    collections::BTreeMap,
    io::Read as _,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use tcpclose_tests::{
    Kid, Tracing,
    cgroup::{self, Cgroup},
    free_port, mono_ns,
    netns::Place,
    prometheus::{Prometheus, require_tool, wall_secs},
    require_root, set_receive_timeout,
    tcp_state::{CLOSE_WAIT, TIME_WAIT},
    timing::POLL,
};

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/grafana/tcpclose.json"
);
/// What `$__rate_interval` becomes: longer than the test, so that every range covers the scrape
/// made before the traffic (the histograms' zeros) and the ones after it.
const RANGE: &str = "10m";

/// A panel's query, as written in the dashboard.
struct Query {
    panel: String,
    expr: String,
}

/// Every panel's queries; every panel but rows has at least one, on the dashboard's data source
/// variable.
fn panel_queries(dashboard: &Value) -> Vec<Query> {
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut queries = Vec::new();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().expect("a panel's title").to_owned();
        let targets = panel["targets"].as_array();
        assert!(
            targets.is_some_and(|t| !t.is_empty()),
            "panel {title:?} has no query"
        );
        for target in targets.into_iter().flatten() {
            assert_eq!(
                target["datasource"]["uid"], "${datasource}",
                "panel {title:?} queries the data source the user picks"
            );
            let expr = target["expr"].as_str().expect("a PromQL expr").to_owned();
            queries.push(Query {
                panel: title.clone(),
                expr,
            });
        }
    }
    queries
}

/// `expr` as Grafana sends it with every job and instance selected.
fn substitute(expr: &str) -> String {
    let promql = expr
        .replace("$job", "tcpclose")
        .replace("$instance", ".*")
        .replace("$__rate_interval", RANGE);
    assert!(
        !promql.contains('$'),
        "a variable the test does not know in {expr}"
    );
    promql
}

/// The dashboard's variables that query Prometheus (`label_values(METRIC, LABEL)`), as the
/// equivalent instant query: `count by (LABEL) (METRIC)`.
fn variable_queries(dashboard: &Value) -> Vec<(String, String)> {
    dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let name = v["name"].as_str().expect("name").to_owned();
            let query = v["query"].as_str().expect("query");
            let args = query
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .unwrap_or_else(|| panic!("${name}: not label_values(METRIC, LABEL): {query}"));
            let (metric, label) = args
                .rsplit_once(',')
                .unwrap_or_else(|| panic!("${name}: {query}"));
            (
                name,
                format!(
                    "count by ({}) ({})",
                    label.trim(),
                    substitute(metric.trim())
                ),
            )
        })
        .collect()
}

type Series = Vec<(BTreeMap<String, String>, f64)>;

fn total(series: &Series) -> f64 {
    series.iter().map(|(_, v)| v).sum()
}

fn with<'a>(series: &'a Series, label: &str, value: &str) -> impl Iterator<Item = f64> + 'a {
    let (label, value) = (label.to_owned(), value.to_owned());
    series
        .iter()
        .filter(move |(labels, _)| labels.get(&label) == Some(&value))
        .map(|(_, v)| *v)
}

/// What each panel must show after the traffic: `Err` says what is missing.
fn check_panel(title: &str, series: &Series, container_id: &str) -> Result<(), String> {
    let positive = |what: &str| {
        if total(series) > 0.0 {
            Ok(())
        } else {
            Err(format!("no {what} counted"))
        }
    };
    match title {
        "Exporter up" => match series.as_slice() {
            [(_, v)] if *v == 1.0 => Ok(()),
            _ => Err("one target, up".to_owned()),
        },
        // Nothing is lost at this rate; the series is there, at zero.
        "Lost events /s" => (total(series) == 0.0)
            .then_some(())
            .ok_or_else(|| "events lost".to_owned()),
        "Teardowns /s by close kind" => {
            for close in ["active", "passive", "simultaneous", "fin_timeout"] {
                if with(series, "close", close).sum::<f64>() <= 0.0 {
                    return Err(format!("no {close} teardown"));
                }
            }
            Ok(())
        }
        "Hung sockets by state" => {
            if with(series, "state", "CLOSE_WAIT").sum::<f64>() >= 1.0 {
                Ok(())
            } else {
                Err("the CLOSE_WAIT leak is not hung".to_owned())
            }
        }
        "Hung sockets by container (--metrics-label container)" => {
            let ours: Vec<_> = series
                .iter()
                .filter(|(l, _)| {
                    l.get("container_id").map(String::as_str) == Some(container_id)
                        && l.get("state").map(String::as_str) == Some("CLOSE_WAIT")
                })
                .collect();
            match ours.as_slice() {
                [(_, v)] if *v == 1.0 => Ok(()),
                _ => Err(format!(
                    "container {container_id} holds one hung CLOSE_WAIT"
                )),
            }
        }
        "FIN_WAIT1" | "FIN_WAIT2" | "TIME_WAIT" => positive("active close"),
        "CLOSE_WAIT" | "LAST_ACK" => positive("passive close"),
        "CLOSING (simultaneous)" => positive("simultaneous close"),
        "FIN_WAIT2 (timed out: the peer never sent its FIN)" => positive("FIN_WAIT2 timeout"),
        other => Err(format!(
            "no check for panel {other:?}: give it traffic and a check in tests/dashboard.rs"
        )),
    }
}

/// `n` connections to `listener` (in `place`'s namespace): (client, server) pairs.
fn connections(place: &Place, listener: &TcpListener, n: usize) -> Vec<(TcpStream, TcpStream)> {
    let addr = place.server_addr;
    place.ns.run(|| {
        (0..n)
            .map(|_| {
                let client = TcpStream::connect(addr).expect("connect");
                let (server, _) = listener.accept().expect("accept");
                (client, server)
            })
            .collect()
    })
}

fn ends(s: &TcpStream) -> (SocketAddr, SocketAddr) {
    (s.local_addr().unwrap(), s.peer_addr().unwrap())
}

/// Waits for a scrape that started after now and satisfies `done` (given its timestamp); fails
/// naming `what` after 60 s.
fn scrape_until(prometheus: &Prometheus, what: &str, done: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut after = wall_secs();
    loop {
        assert!(
            Instant::now() < deadline,
            "{what}: not in any scrape within 60 s; prometheus log:\n{}",
            prometheus.log()
        );
        let at = prometheus.scrape_after(after, deadline + Duration::from_secs(10));
        if done(at) {
            return at;
        }
        after = at;
    }
}

#[test]
fn every_panel_shows_the_teardowns_it_is_about() {
    require_root();
    require_tool("prometheus");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(DASHBOARD).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}")),
    )
    .unwrap_or_else(|e| panic!("{DASHBOARD}: not JSON: {e}"));
    let queries = panel_queries(&dashboard);

    let place = Place::new("dashboard");
    // An orphaned FIN_WAIT2 times out after 2 s instead of 60.
    place.ns.sysctl("net.ipv4.tcp_fin_timeout", "2");
    let (uid, id) = cgroup::test_ids(9);
    let container = Cgroup::create(&cgroup::containerd_path(&uid, &id));

    let metrics = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), free_port());
    let tracer = Tracing::start(&[
        "--port",
        &place.port(),
        "--metrics",
        &metrics.port().to_string(),
        "--metrics-label",
        "container",
        "--hung",
        "CLOSE_WAIT=1s",
    ]);
    let prometheus = Prometheus::start(metrics);
    // A scrape before the traffic: the histograms' zeros, from which increase() counts.
    scrape_until(&prometheus, "a first scrape", |_| true);

    let listener = place
        .ns
        .run(|| TcpListener::bind(place.server_addr).expect("bind in the namespace"));

    // An active close (client) and a passive one (server).
    let mut pairs = connections(&place, &listener, 3);
    let (client, mut server) = pairs.remove(0);
    let client_side = ends(&client);
    drop(client);
    set_receive_timeout(&server, Duration::from_secs(5));
    assert_eq!(server.read(&mut [0; 16]).expect("read"), 0, "EOF");
    drop(server);
    place.wait_for_state(
        client_side,
        Some(TIME_WAIT),
        mono_ns(),
        Duration::from_secs(10),
        POLL,
    );

    // Two connections whose FINs cross (at least one side goes through CLOSING).
    for (client, server) in pairs {
        let (a, b) = (ends(&client), ends(&server));
        place.cross_fins(&client, &server);
        for side in [a, b] {
            place.wait_for_state(
                side,
                Some(TIME_WAIT),
                mono_ns(),
                Duration::from_secs(10),
                POLL,
            );
        }
    }
    // TIME_WAIT ends now rather than in 60 s.
    place.kill_time_wait();

    // A process in a Kubernetes container connects and never closes: the server's close leaves
    // it in CLOSE_WAIT (hung after 1 s), and the server's orphaned FIN_WAIT2 times out.
    let mut leak = Command::new("ip");
    leak.args([
        "netns",
        "exec",
        place.ns.name(),
        "bash",
        "-c",
        &format!(
            "exec 3<>/dev/tcp/127.0.0.1/{} && exec sleep 300",
            place.server_addr.port()
        ),
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let leaker = Kid(container
        .spawn(&mut leak)
        .expect("starting the leaking process"));
    let (server, _) = listener
        .accept()
        .expect("accepting the container's connection");
    let leaked = (server.peer_addr().unwrap(), server.local_addr().unwrap());
    drop(server);
    place.wait_for_state(
        leaked,
        Some(CLOSE_WAIT),
        mono_ns(),
        Duration::from_secs(10),
        POLL,
    );

    // Until a scrape shows the leak hung and the FIN_WAIT2 timeout counted.
    let hung = format!(
        "tcpclose_hung_sockets{{job=\"tcpclose\",state=\"CLOSE_WAIT\",container_id=\"{id}\"}}"
    );
    let timeouts = "tcpclose_teardowns_total{job=\"tcpclose\",close=\"fin_timeout\"}";
    let at = scrape_until(
        &prometheus,
        "the leak hung and the FIN_WAIT2 timeout",
        |at| {
            prometheus.value(&hung, at) == Some(1.0)
                && prometheus.value(timeouts, at).is_some_and(|n| n >= 1.0)
        },
    );

    let mut failures = Vec::new();
    for (name, promql) in variable_queries(&dashboard) {
        let series = prometheus.query(&promql, Some(at));
        if series.is_empty() {
            failures.push(format!("variable ${name}: {promql} has no values"));
        }
    }
    for Query { panel, expr } in &queries {
        let promql = substitute(expr);
        let series = prometheus.query(&promql, Some(at));
        if series.is_empty() {
            failures.push(format!("{panel:?}: no series from {promql}"));
        } else if let Err(why) = check_panel(panel, &series, &id) {
            failures.push(format!("{panel:?}: {why}: {promql} gave {series:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "at {at:.3}:\n{}\nprometheus log:\n{}",
        failures.join("\n"),
        prometheus.log()
    );

    // The labelled series on their own: once the leaking process exits, its socket's teardown
    // is counted in the container's histogram and the container holds no hung socket.
    drop(leaker);
    let ours = format!(
        "sum(tcpclose_teardown_phase_seconds_count{{job=\"tcpclose\",container_id=\"{id}\"}})"
    );
    scrape_until(
        &prometheus,
        "the container's teardown, its hang over",
        |at| {
            prometheus.value(&ours, at).is_some_and(|n| n >= 1.0)
                && prometheus.value(&hung, at) == Some(0.0)
        },
    );

    let run = tracer.stop();
    assert!(
        run.status.success(),
        "tcpclose: {}\n{}",
        run.status,
        run.stderr
    );
    let closes: Vec<&Value> = run.of_type("teardown").map(|t| &t["close"]).collect();
    for close in ["active", "passive", "simultaneous", "fin_timeout"] {
        assert!(
            closes.iter().any(|c| *c == close),
            "a {close} teardown in the records: {closes:?}"
        );
    }
}
