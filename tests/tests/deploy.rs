//! The deployment files under deploy/: every YAML document parses; the DaemonSet keeps to least
//! privilege and has its mounts, probes and resources; the alerting rules pass `promtool check
//! rules` and their unit tests; the systemd unit passes `systemd-analyze verify`; and tcpclose
//! really starts, serves /metrics and follows timewait sockets with exactly the capabilities the
//! DaemonSet and the unit grant it (emulated with setpriv on this kernel).
//!
//! promtool (Debian package `prometheus`) and systemd-analyze (`systemd`) are external tools:
//! the set-up installs them, and a test that misses one fails.

use std::{
    collections::BTreeSet,
    fs,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde::Deserialize as _;
use serde_json::Value;
use tcpclose_tests::{
    TempDir, binary,
    cgroup::{self, Cgroup},
    free_port, http_get, output_with_deadline, require_root, run_ok, set_linger_zero,
    wait_with_deadline,
};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|err| panic!("reading {}: {err}", path.display()))
}

/// Every document of a YAML stream (empty ones left out), as JSON values.
fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .enumerate()
        .map(|(i, doc)| {
            Value::deserialize(doc)
                .unwrap_or_else(|err| panic!("{} document {}: {err}", path.display(), i + 1))
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

fn yaml_document(path: &Path) -> Value {
    let mut docs = yaml_documents(path);
    assert_eq!(docs.len(), 1, "{}: one document", path.display());
    docs.remove(0)
}

/// `name` on PATH; a test that needs it fails when it is not (never skips): `cargo xtask test`
/// installs it. Always `Some`.
fn external_tool(name: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    assert!(
        found.is_some(),
        "{name} is not installed: install the Debian package {package} \
         (`cargo xtask setup --tests` does)"
    );
    found
}

fn str_list(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|items| items.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

// ---- Kubernetes ----------------------------------------------------------------------------

fn manifests() -> Vec<Value> {
    yaml_documents(&deploy_dir().join("kubernetes/daemonset.yaml"))
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let mut found = docs.iter().filter(|doc| doc["kind"] == kind);
    let doc = found
        .next()
        .unwrap_or_else(|| panic!("daemonset.yaml has no {kind}"));
    assert!(
        found.next().is_none(),
        "daemonset.yaml has more than one {kind}"
    );
    doc
}

fn pod_spec(docs: &[Value]) -> &Value {
    &of_kind(docs, "DaemonSet")["spec"]["template"]["spec"]
}

fn container(docs: &[Value]) -> &Value {
    let containers = pod_spec(docs)["containers"]
        .as_array()
        .expect("DaemonSet pod has containers");
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

/// The capabilities tcpclose may be given, and why (deploy/README.md, "Privileges").
const NEEDED_CAPS: [&str; 5] = ["BPF", "PERFMON", "SYSLOG", "DAC_READ_SEARCH", "SYS_PTRACE"];

/// The value that follows `flag` in `args`.
fn arg_after<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| *a == flag)
        .and_then(|i| args.get(i + 1).copied())
}

#[test]
fn every_yaml_file_under_deploy_parses() {
    let mut files = Vec::new();
    let mut dirs = vec![deploy_dir()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path
                .extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
            {
                files.push(path);
            }
        }
    }
    files.sort();
    for expected in [
        "kubernetes/daemonset.yaml",
        "prometheus/tcpclose-rules.yaml",
        "prometheus/tcpclose-rules.test.yaml",
        "prometheus/prometheus.yaml",
    ] {
        assert!(
            files.contains(&deploy_dir().join(expected)),
            "deploy/{expected} is missing"
        );
    }
    for file in &files {
        let docs = yaml_documents(file);
        assert!(!docs.is_empty(), "{} holds no document", file.display());
        assert!(
            docs.iter().all(Value::is_object),
            "{}: every document is a mapping",
            file.display()
        );
    }
}

#[test]
fn daemonset_objects_belong_together() {
    let docs = manifests();
    assert_eq!(docs.len(), 3, "Namespace, ServiceAccount, DaemonSet");
    let namespace = of_kind(&docs, "Namespace")["metadata"]["name"]
        .as_str()
        .expect("Namespace name");
    let account = of_kind(&docs, "ServiceAccount");
    let daemonset = of_kind(&docs, "DaemonSet");
    for doc in [account, daemonset] {
        assert_eq!(doc["metadata"]["namespace"], namespace, "{}", doc["kind"]);
    }
    assert_eq!(daemonset["apiVersion"], "apps/v1");
    let pod = pod_spec(&docs);
    assert_eq!(pod["serviceAccountName"], account["metadata"]["name"]);
    // tcpclose never calls the Kubernetes API: no token in the pod.
    assert_eq!(account["automountServiceAccountToken"], false);
    assert_eq!(pod["automountServiceAccountToken"], false);
    let selector = &daemonset["spec"]["selector"]["matchLabels"];
    let labels = &daemonset["spec"]["template"]["metadata"]["labels"];
    for (key, value) in selector.as_object().expect("selector.matchLabels") {
        assert_eq!(
            &labels[key], value,
            "pod template lacks selector label {key}"
        );
    }
}

#[test]
fn daemonset_grants_least_privilege() {
    let docs = manifests();
    let pod = pod_spec(&docs);
    let security = &container(&docs)["securityContext"];
    assert_eq!(security["privileged"], false);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(str_list(&security["capabilities"]["drop"]), ["ALL"]);
    let added: BTreeSet<&str> = str_list(&security["capabilities"]["add"])
        .into_iter()
        .collect();
    for cap in ["BPF", "PERFMON"] {
        assert!(added.contains(cap), "capabilities.add lacks {cap}");
    }
    let extra: Vec<_> = added.iter().filter(|c| !NEEDED_CAPS.contains(c)).collect();
    assert!(
        extra.is_empty(),
        "capabilities beyond what tcpclose needs: {extra:?} (SYS_ADMIN is an opt-in edit, see \
         deploy/README.md)"
    );
    // Capabilities added in Kubernetes reach uid 0 only (no ambient capabilities).
    assert_eq!(security["runAsUser"], 0);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    // The host's processes (/proc/*/fd) and the host's sockets (sock_diag); never its IPC.
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["hostNetwork"], true);
    assert!(pod["hostIPC"].is_null() || pod["hostIPC"] == false);
    // Pod Security admission must let this pod in, in its own namespace only.
    assert_eq!(
        of_kind(&docs, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
}

/// The host paths the DaemonSet mounts, read-only: (host path, mount path in the container).
fn host_mounts(docs: &[Value]) -> Vec<(String, String)> {
    let volumes = pod_spec(docs)["volumes"].as_array().expect("volumes");
    let mounts = container(docs)["volumeMounts"]
        .as_array()
        .expect("volumeMounts");
    mounts
        .iter()
        .map(|mount| {
            assert_eq!(mount["readOnly"], true, "{mount} is read-only");
            let volume = volumes
                .iter()
                .find(|v| v["name"] == mount["name"])
                .unwrap_or_else(|| panic!("no volume {} for {mount}", mount["name"]));
            assert_eq!(
                volume["hostPath"]["type"], "Directory",
                "{volume} must exist on the host"
            );
            let host = volume["hostPath"]["path"].as_str().expect("a hostPath");
            let at = mount["mountPath"].as_str().expect("a mountPath");
            (host.to_owned(), at.to_owned())
        })
        .collect()
}

/// The host's BTF (tracefs is not needed: the programs are raw tracepoints, checked against the
/// BTF) and its cgroup2 hierarchy (the pod's own /sys/fs/cgroup shows only its cgroup
/// namespace), both read-only, and nothing else.
#[test]
fn daemonset_mounts_only_btf_and_the_cgroup_hierarchy_read_only() {
    let docs = manifests();
    let mounts = host_mounts(&docs);
    let hosts: BTreeSet<&str> = mounts.iter().map(|(host, _)| host.as_str()).collect();
    assert_eq!(
        hosts,
        BTreeSet::from(["/sys/kernel/btf", "/sys/fs/cgroup"]),
        "{mounts:?}"
    );
    assert!(
        mounts.contains(&("/sys/kernel/btf".to_owned(), "/sys/kernel/btf".to_owned())),
        "the BTF where tcpclose looks for it: {mounts:?}"
    );
    let pod = pod_spec(&docs);
    assert!(
        pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .all(|v| v["hostPath"].is_object())
    );
}

#[test]
fn daemonset_probes_and_scrapes_the_metrics_port() {
    let docs = manifests();
    let container = container(&docs);
    let args = str_list(&container["args"]);
    let listen = arg_after(&args, "--metrics").expect("args pass --metrics ADDR");
    // Probes and scrapes come to the node's IP (hostNetwork): not loopback only.
    assert_eq!(listen, "0.0.0.0:9464");
    assert!(args.contains(&"--json"), "JSON lines to stdout: {args:?}");
    let ports = container["ports"].as_array().expect("ports");
    let metrics = ports
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("a port named metrics");
    assert_eq!(metrics["containerPort"], 9464);
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], "/metrics", "{probe}");
        assert!(
            get["port"] == "metrics" || get["port"] == 9464,
            "{probe} port: {}",
            get["port"]
        );
        let period = container[probe]["periodSeconds"].as_u64().unwrap_or(10);
        let timeout = container[probe]["timeoutSeconds"].as_u64().unwrap_or(1);
        assert!(
            timeout < period,
            "{probe}: timeout {timeout}s, period {period}s"
        );
    }
    let annotations = &of_kind(&docs, "DaemonSet")["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9464");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
}

/// A resource quantity: CPU in millicores, memory in bytes.
fn quantity(value: &Value, memory: bool) -> u64 {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("not a quantity: {other}"),
    };
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().unwrap_or_else(|_| panic!("quantity {text}"));
    let scale = match (memory, unit) {
        (false, "m") => 1.0,
        (false, "") => 1000.0,
        (true, "") => 1.0,
        (true, "Ki") => 1024.0,
        (true, "Mi") => 1024.0 * 1024.0,
        (true, "Gi") => 1024.0 * 1024.0 * 1024.0,
        (true, "k") => 1e3,
        (true, "M") => 1e6,
        (true, "G") => 1e9,
        _ => panic!("unexpected unit in quantity {text}"),
    };
    (number * scale) as u64
}

#[test]
fn daemonset_requests_and_limits_resources() {
    let docs = manifests();
    let resources = &container(&docs)["resources"];
    for (resource, memory) in [("cpu", false), ("memory", true)] {
        let request = quantity(&resources["requests"][resource], memory);
        let limit = quantity(&resources["limits"][resource], memory);
        assert!(
            request > 0 && request <= limit,
            "{resource}: {request} > {limit}"
        );
    }
    // Idle, tcpclose holds ~35 MiB; its socket table grows to ~60 MiB more at --max-sockets.
    let memory_limit = quantity(&resources["limits"]["memory"], true);
    assert!(
        memory_limit >= 128 << 20,
        "memory limit {memory_limit} B is too tight"
    );
}

#[test]
fn daemonset_runs_on_every_node() {
    let docs = manifests();
    let tolerations = pod_spec(&docs)["tolerations"]
        .as_array()
        .expect("tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t["operator"] == "Exists" && t["key"].is_null() && t["effect"].is_null()),
        "no toleration of every taint: {tolerations:?}"
    );
    assert!(pod_spec(&docs)["nodeSelector"].is_null());
    assert!(pod_spec(&docs)["affinity"].is_null());
}

// ---- Prometheus ----------------------------------------------------------------------------

fn rules_path() -> PathBuf {
    deploy_dir().join("prometheus/tcpclose-rules.yaml")
}

/// Every `tcpclose_*` metric name the alerting rules use.
fn metrics_in_rules() -> BTreeSet<String> {
    let rules = yaml_document(&rules_path());
    let mut names = BTreeSet::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let expr = rule["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(at) = rest.find("tcpclose_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                names.insert(name);
            }
        }
    }
    names
}

#[test]
fn alerting_rules_cover_hangs_losses_and_the_exporter() {
    let rules = yaml_document(&rules_path());
    let all: Vec<&Value> = rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules"))
        .collect();
    let alert = |name: &str| -> &Value {
        all.iter()
            .find(|r| r["alert"] == name)
            .unwrap_or_else(|| panic!("no alert {name}"))
    };
    assert_eq!(
        alert("TcpcloseCloseWaitLeak")["expr"],
        "sum without (container_id, pod_uid) (tcpclose_hung_sockets{state=\"CLOSE_WAIT\"}) > 0",
        "per node and state, with or without --metrics-label"
    );
    assert_eq!(alert("TcpcloseCloseWaitLeak")["for"], "5m");
    for (name, needle) in [
        ("TcpcloseFinWait1Hung", "state=\"FIN_WAIT1\""),
        ("TcpcloseLastAckHung", "state=\"LAST_ACK\""),
        (
            "TcpcloseEventsLost",
            "increase(tcpclose_lost_events_total[5m]) > 0",
        ),
        ("TcpcloseExporterDown", "up{job=\"tcpclose\"} == 0"),
    ] {
        let expr = alert(name)["expr"].as_str().expect("expr");
        assert!(expr.contains(needle), "{name}: {expr}");
    }
    for rule in &all {
        let name = &rule["alert"];
        assert!(
            ["warning", "critical", "info"]
                .contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
            "{name}: severity"
        );
        let summary = rule["annotations"]["summary"].as_str().unwrap_or("");
        let description = rule["annotations"]["description"].as_str().unwrap_or("");
        assert!(
            !summary.is_empty() && !description.is_empty(),
            "{name}: annotations"
        );
        if name != "TcpcloseExporterAbsent" {
            assert!(
                description.contains("{{ $labels.instance }}"),
                "{name}: {description}"
            );
        }
    }
    // The job the exporter rules select is the one the example scrape configuration defines.
    let config = yaml_document(&deploy_dir().join("prometheus/prometheus.yaml"));
    let jobs: Vec<&str> = config["scrape_configs"]
        .as_array()
        .expect("scrape_configs")
        .iter()
        .filter_map(|job| job["job_name"].as_str())
        .collect();
    assert_eq!(jobs, ["tcpclose"]);
    assert_eq!(str_list(&config["rule_files"]), ["tcpclose-rules.yaml"]);
    assert!(metrics_in_rules().contains("tcpclose_hung_sockets"));
}

#[test]
fn alerting_rules_pass_promtool_check_and_unit_tests() {
    let Some(promtool) = external_tool("promtool", "prometheus") else {
        return;
    };
    let dir = deploy_dir().join("prometheus");
    for args in [
        &["check", "rules", "tcpclose-rules.yaml"][..],
        &["test", "rules", "tcpclose-rules.test.yaml"][..],
    ] {
        let child = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running promtool");
        let out = output_with_deadline("promtool", child, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "promtool {}: {}\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// ---- systemd -------------------------------------------------------------------------------

fn unit_path() -> PathBuf {
    deploy_dir().join("systemd/tcpclose.service")
}

/// The values of `key=` in the unit, in order (a key may repeat).
fn unit_values(key: &str) -> Vec<String> {
    read(&unit_path())
        .lines()
        .filter_map(|line| line.trim().strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_owned())
        .collect()
}

fn unit_value(key: &str) -> String {
    let values = unit_values(key);
    assert_eq!(values.len(), 1, "{key}= once in the unit: {values:?}");
    values[0].clone()
}

#[test]
fn systemd_unit_keeps_to_least_privilege() {
    let caps = |key: &str| -> BTreeSet<String> {
        unit_value(key)
            .split_whitespace()
            .map(|c| c.strip_prefix("CAP_").expect("CAP_ names").to_owned())
            .collect()
    };
    let ambient = caps("AmbientCapabilities");
    assert_eq!(ambient, caps("CapabilityBoundingSet"));
    for cap in ["BPF", "PERFMON"] {
        assert!(ambient.contains(cap), "AmbientCapabilities lacks CAP_{cap}");
    }
    let extra: Vec<_> = ambient
        .iter()
        .filter(|c| !NEEDED_CAPS.contains(&c.as_str()))
        .collect();
    assert!(
        extra.is_empty(),
        "capabilities beyond what tcpclose needs: {extra:?}"
    );
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(unit_value(key), value, "{key}=");
    }
    assert!(!unit_values("RestartSec").is_empty());
    assert_eq!(unit_value("WantedBy"), "multi-user.target");
    // Each takes away something tcpclose reads: /proc/kallsyms, CAP_SYSLOG, other processes.
    for absent in [
        "ProtectKernelTunables",
        "ProtectKernelLogs",
        "ProtectProc",
        "ProcSubset",
    ] {
        assert!(unit_values(absent).is_empty(), "{absent}= breaks tcpclose");
    }
    let exec = unit_value("ExecStart");
    let args: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(args[0], "/usr/local/bin/tcpclose");
    assert_eq!(arg_after(&args, "--metrics"), Some("127.0.0.1:9464"));
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = external_tool("systemd-analyze", "systemd") else {
        return;
    };
    // The unit verbatim, in a root of its own where ExecStart's path holds the built binary
    // (verify checks that it is executable) and the system's units answer its dependencies.
    let root = TempDir::new("unit-root");
    let units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .map(Path::new)
        .find(|dir| dir.join("multi-user.target").exists())
        .expect("the system's systemd units (multi-user.target)");
    for dir in ["etc/systemd/system", "usr/local/bin", "usr/lib/systemd"] {
        fs::create_dir_all(root.0.join(dir)).expect("creating the unit root");
    }
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(units)
            .arg(root.0.join("usr/lib/systemd/system")),
    );
    fs::copy(
        unit_path(),
        root.0.join("etc/systemd/system/tcpclose.service"),
    )
    .expect("copying");
    fs::copy(binary(), root.0.join("usr/local/bin/tcpclose")).expect("copying the binary");
    let child = Command::new(analyze)
        .arg("verify")
        .arg(format!("--root={}", root.0.display()))
        .arg("tcpclose.service")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running systemd-analyze");
    let out = output_with_deadline("systemd-analyze verify", child, Duration::from_secs(120));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify: {}\n{said}",
        out.status
    );
    // It exits 0 on directives it ignores (unknown keys, bad values): those must fail too.
    assert!(
        !said.contains("tcpclose"),
        "systemd-analyze verify warns:\n{said}"
    );
}

// ---- The privileges, for real --------------------------------------------------------------

/// Runs tcpclose with `args` under exactly `caps` (names without CAP_) as `uid`, the way the
/// container runtime (uid 0, bounding set) or systemd (another uid, ambient capabilities) runs
/// it, with no_new_privs, in a mount namespace of its own where tracefs and debugfs are not
/// mounted (as on a freshly booted host; neither privilege set could mount them); its
/// `--metrics` address is replaced by a free loopback port. Checks that it serves /metrics with
/// every metric the alerting rules use, reports a connection reset on loopback while it runs,
/// prints no warning (everything it follows, timewait sockets included, is within reach), names
/// the reset socket's cgroup, and ends cleanly.
///
/// `pod`: where the pod mounts the host's cgroup2 hierarchy (its hostPath volume's mountPath):
/// tcpclose then runs as in a pod, in a cgroup of its own and a cgroup namespace rooted there,
/// with a cgroup2 file system mounted in that namespace where the host has its own (as the
/// container runtime mounts /sys/fs/cgroup: it shows the pod's cgroup only) and, mounted after
/// it, the host's hierarchy bound read-only at that path (under a tmpfs on /mnt).
fn run_with_privileges(uid: u32, caps: &BTreeSet<String>, args: &[&str], pod: Option<&str>) {
    require_root();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let at = args
        .iter()
        .position(|a| a == "--metrics")
        .expect("--metrics in the arguments");
    args[at + 1] = listen.clone();
    // A safety net: the test stops it with SIGTERM, as the runtime and systemd do.
    args.extend(["--duration".to_owned(), "60s".to_owned()]);
    let set = caps
        .iter()
        .map(|c| format!("+{}", c.to_ascii_lowercase()))
        .collect::<Vec<_>>()
        .join(",");
    // `unshare` and `sh` exec what follows: the child's pid is tcpclose's.
    let mut script =
        "umount /sys/kernel/tracing 2>/dev/null; umount /sys/kernel/debug 2>/dev/null; \
                  if grep -qw tracefs /proc/self/mounts; then echo 'tracefs still mounted' >&2; \
                  exit 97; fi; "
            .to_owned();
    let mut unshare = Command::new("unshare");
    unshare.args(["-m", "--propagation", "private"]);
    let pod_cgroup = pod.map(|host_hierarchy| {
        let mount = cgroup::mount().display().to_string();
        let bound = format!("/mnt{host_hierarchy}");
        script.push_str(&format!(
            "mount -t tmpfs tcpclose-pod /mnt && mkdir -p /mnt/.host '{bound}' && \
             mount --bind '{mount}' /mnt/.host && umount '{mount}' && \
             mount -t cgroup2 none '{mount}' && mount --bind -o ro /mnt/.host '{bound}' && \
             umount /mnt/.host || {{ echo 'could not make the pod mounts' >&2; exit 96; }}; "
        ));
        unshare.arg("--cgroup");
        Cgroup::create(&format!("/tcpclose-test-pod-{}", std::process::id()))
    });
    script.push_str("exec \"$@\"");
    unshare
        .args(["sh", "-c", &script, "sh"])
        .arg("setpriv")
        .args([
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".to_owned(),
            format!("--inh-caps=-all,{set}"),
            format!("--ambient-caps=-all,{set}"),
            format!("--bounding-set=-all,{set}"),
            "--no-new-privs".to_owned(),
        ])
        .arg(binary())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child: Child = match &pod_cgroup {
        Some(cgroup) => cgroup.spawn(&mut unshare),
        None => tcpclose_tests::spawn(&mut unshare),
    }
    .expect("running unshare and setpriv (util-linux)");
    // Drain both pipes meanwhile: a full pipe would stall tcpclose, metrics server included.
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));

    let addr = listen.parse().expect("socket address");
    let deadline = Instant::now() + Duration::from_secs(20);
    let scraped = loop {
        match http_get(addr, "/metrics", Duration::from_secs(2)) {
            Ok(answer) if answer.status == 200 => break Ok(answer.body),
            Ok(answer) if Instant::now() > deadline => {
                break Err(format!("HTTP {}", answer.status));
            }
            Err(err) if Instant::now() > deadline => break Err(err.to_string()),
            _ if matches!(child.try_wait(), Ok(Some(_))) => break Err("it exited".to_owned()),
            _ => thread::sleep(Duration::from_millis(100)),
        }
    };
    // Attached (it serves metrics only once attached): a connection aborted with an RST is
    // reported at once, on both ends.
    let reset_port = reset_connection();
    thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_with_deadline(&mut child, Duration::from_secs(20));
    let (stdout, stderr) = (
        stdout.join().expect("stdout reader"),
        stderr.join().expect("stderr reader"),
    );
    let context = format!("uid {uid}, capabilities {set}, args {args:?}\nstderr:\n{stderr}");
    let body = scraped.unwrap_or_else(|err| panic!("GET /metrics failed ({err}); {context}"));
    let status = status.unwrap_or_else(|| panic!("tcpclose did not exit on SIGTERM; {context}"));
    assert!(status.success(), "tcpclose exited with {status}; {context}");
    for metric in metrics_in_rules() {
        assert!(
            body.lines().any(|line| line.starts_with(&metric)),
            "/metrics lacks {metric}, which the alerting rules use; {context}\n{body}"
        );
    }
    assert!(
        !stderr.contains("warning") && !stderr.contains("error"),
        "tcpclose warned; {context}"
    );
    let records: Vec<Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    let reset = records
        .iter()
        .find(|r| r["type"] == "teardown" && r["close"] == "reset" && r["lport"] == reset_port)
        .unwrap_or_else(|| {
            panic!(
                "no teardown record of the reset connection from port {reset_port}; \
                 {context}\n{stdout}"
            )
        });
    // This test's own cgroup: outside the pod's cgroup namespace.
    assert_eq!(
        reset["cgroup"],
        cgroup::own_path(),
        "the socket's cgroup named; {context}"
    );
    if let Some(label) = arg_after(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "--metrics-label",
    ) {
        let key = if label == "pod" {
            "pod_uid"
        } else {
            "container_id"
        };
        assert!(
            body.contains(&format!("{key}=\"none\"")),
            "--metrics-label {label}: /metrics has no {key} label; {context}\n{body}"
        );
    }
    drop(pod_cgroup);
    assert_eq!(
        records.last().map(|r| &r["type"]),
        Some(&Value::from("summary")),
        "no summary record last; {context}"
    );
}

/// Connects to a listener on loopback and aborts the connection with an RST (`SO_LINGER` 0);
/// returns the client's port.
fn reset_connection() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listening on loopback");
    let client = std::net::TcpStream::connect(listener.local_addr().expect("address"))
        .expect("connecting on loopback");
    let (_server, _) = listener.accept().expect("accepting");
    set_linger_zero(&client);
    let port = client.local_addr().expect("address").port();
    drop(client);
    port
}

#[test]
fn tcpclose_runs_with_exactly_the_daemonsets_capabilities() {
    let docs = manifests();
    let container = container(&docs);
    let caps: BTreeSet<String> = str_list(&container["securityContext"]["capabilities"]["add"])
        .into_iter()
        .map(str::to_owned)
        .collect();
    let uid = container["securityContext"]["runAsUser"]
        .as_u64()
        .expect("runAsUser") as u32;
    let hierarchy = host_mounts(&docs)
        .into_iter()
        .find(|(host, _)| host == "/sys/fs/cgroup")
        .map(|(_, at)| at)
        .expect("the host's cgroup hierarchy mounted");
    run_with_privileges(uid, &caps, &str_list(&container["args"]), Some(&hierarchy));
}

#[test]
fn tcpclose_runs_with_exactly_the_systemd_units_capabilities() {
    let caps: BTreeSet<String> = unit_value("AmbientCapabilities")
        .split_whitespace()
        .map(|c| c.trim_start_matches("CAP_").to_owned())
        .collect();
    let exec = unit_value("ExecStart");
    let args: Vec<&str> = exec.split_whitespace().skip(1).collect();
    // DynamicUser: a uid of its own, in no group, owning nothing on the host; nobody is the
    // closest stand-in.
    run_with_privileges(65534, &caps, &args, None);
}
