//! A real Prometheus server for the tests: started on loopback with a scrape configuration of
//! the test's own, queried through its HTTP API, killed on drop. The metrics tests and the
//! dashboard's test share it.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

use crate::{TempDir, free_port, http_get, spawn, wait_with_deadline};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// Fails the test unless `tool` is on PATH (never skips): `cargo xtask test` installs the
/// Debian package `prometheus`, which has both `prometheus` and `promtool`.
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::metadata(dir.join(tool))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    });
    assert!(
        found,
        "`{tool}` is not on PATH: install the Debian package `prometheus` \
         (`cargo xtask setup --tests` does)"
    );
}

/// Seconds since the epoch, as Prometheus timestamps its samples.
pub fn wall_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// Percent-encodes a query-string value.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server on loopback scraping one target every second as job `tcpclose`; killed on
/// drop.
pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
}

impl Prometheus {
    pub fn start(target: SocketAddr) -> Self {
        Self::start_with_rules(target, None)
    }

    /// [`Prometheus::start`], evaluating the alerting rules `rules` (a rule file's text) every
    /// second.
    pub fn start_with_rules(target: SocketAddr, rules: Option<&str>) -> Self {
        let dir = TempDir::new("prometheus");
        let config = dir.0.join("prometheus.yml");
        let mut text = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: tcpclose\n    static_configs:\n      \
             - targets: ['{target}']\n"
        );
        if let Some(rules) = rules {
            let path = dir.0.join("rules.yml");
            std::fs::write(&path, rules).expect("writing rules.yml");
            text.push_str(&format!("rule_files:\n  - {}\n", path.display()));
        }
        std::fs::write(&config, text).expect("writing prometheus.yml");
        let log = std::fs::File::create(dir.0.join("prometheus.log")).expect("prometheus.log");
        let addr = SocketAddr::new(LOOPBACK, free_port());
        let child = spawn(
            Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.0.join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("prometheus.log"))
                .stderr(log),
        )
        .expect("starting prometheus");
        let mut prometheus = Self { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http_get(addr, "/-/ready", HTTP_TIMEOUT)
                && r.status == 200
            {
                return prometheus;
            }
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", prometheus.log());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready on {addr} after 20 s:\n{}",
                prometheus.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query, evaluated at `at` (seconds since the epoch) or now: each series' labels
    /// and value.
    pub fn query(&self, promql: &str, at: Option<f64>) -> Vec<(BTreeMap<String, String>, f64)> {
        let mut target = format!("/api/v1/query?query={}", url_encode(promql));
        if let Some(at) = at {
            target.push_str(&format!("&time={at:.3}"));
        }
        let r = http_get(self.addr, &target, HTTP_TIMEOUT)
            .unwrap_or_else(|e| panic!("querying prometheus for {promql}: {e}"));
        let json: Value = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("{promql}: not JSON ({e}): {}", r.body));
        assert_eq!(json["status"], "success", "{promql}: {}", r.body);
        assert_eq!(json["data"]["resultType"], "vector", "{promql}: {}", r.body);
        json["data"]["result"]
            .as_array()
            .expect("result array")
            .iter()
            .map(|series| {
                let labels = series["metric"]
                    .as_object()
                    .expect("metric")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect();
                let value = series["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{promql}: bad value in {series}"));
                (labels, value)
            })
            .collect()
    }

    /// The value of a query that selects at most one series.
    pub fn value(&self, promql: &str, at: f64) -> Option<f64> {
        let result = self.query(promql, Some(at));
        assert!(
            result.len() <= 1,
            "{promql}: more than one series: {result:?}"
        );
        result.first().map(|(_, v)| *v)
    }

    /// Waits for a scrape of job `tcpclose` that started after `after` (seconds since the epoch)
    /// and returns its timestamp.
    pub fn scrape_after(&self, after: f64, deadline: Instant) -> f64 {
        loop {
            let latest = self.value("timestamp(up{job=\"tcpclose\"})", wall_secs());
            if let Some(at) = latest
                && at > after
            {
                return at;
            }
            assert!(
                Instant::now() < deadline,
                "no scrape of tcpclose after {after:.3} (latest: {latest:?}); prometheus log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = wait_with_deadline(&mut self.child, Duration::from_secs(10));
    }
}
