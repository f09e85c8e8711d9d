//! Where sockets live, against the real kernel: processes placed in real cgroup2 cgroups made
//! under the paths container runtimes use (Kubernetes with the systemd and the cgroupfs drivers,
//! Docker), and sockets in a network namespace of their own. Records name the socket's cgroup,
//! container, pod and network namespace; `--cgroup` and `--netns` filter in the kernel;
//! `--group-by container` tallies the leak view per container.
//!
//! The kernel gives a socket the cgroup of the task that made it (cgroup_sk_alloc(), at
//! `socket()`): a child moves itself into its cgroup before it execs the program that makes its
//! sockets, and a socket made before the move stays where it was made, whoever holds it later.
//!
//! Each test makes cgroups under a top directory no other test uses, so that each removes what it
//! made.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpListener, TcpStream},
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use tcpclose_tests::{
    Tracing, about,
    cgroup::{self, Cgroup},
    netns::Netns,
    require_root,
};

/// A Kubernetes pod UID and a container id (64 hex digits) of this run's own.
fn ids(tag: u8) -> (String, String) {
    let seed = (std::process::id() as u64) << 8 | u64::from(tag);
    let uid = format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        seed as u32,
        tag,
        0x4000 | (seed & 0xfff),
        0x8000 | (seed & 0xfff),
        seed
    );
    let id = format!("{seed:016x}").repeat(4);
    (uid, id)
}

/// A child killed and reaped on drop.
struct Kid(Child);

impl Kid {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = tcpclose_tests::wait_with_deadline(&mut self.0, Duration::from_secs(10));
    }
}

fn quiet(cmd: &mut Command) -> &mut Command {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
}

/// bash connects to `port` on 127.0.0.1 (so the socket is made in bash's cgroup and
/// namespace), then `then` (a shell command that runs with the connection on fd 3).
fn bash_client(port: u16, then: &str) -> Command {
    let mut cmd = Command::new("bash");
    cmd.args([
        "-c",
        &format!("exec 3<>/dev/tcp/127.0.0.1/{port} && {then}"),
    ]);
    quiet(&mut cmd);
    cmd
}

/// Accepts bash's connection: `(server side, the client's (local, remote))`.
fn accept(listener: &TcpListener) -> (TcpStream, (SocketAddr, SocketAddr)) {
    let (server, peer) = listener.accept().expect("accepting");
    let local = server.local_addr().unwrap();
    (server, (peer, local))
}

fn netns_inode(path: &str) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .ino()
}

fn the<'a>(records: &'a [Value], kind: &str, tuple: (SocketAddr, SocketAddr)) -> &'a Value {
    records
        .iter()
        .find(|r| r["type"] == kind && about(r, tuple))
        .unwrap_or_else(|| panic!("no {kind} record about {tuple:?}: {records:#?}"))
}

fn check_placement(
    r: &Value,
    cgroup: &str,
    container: Option<&str>,
    pod: Option<&str>,
    netns: u64,
) {
    assert_eq!(r["cgroup"], cgroup, "{r}");
    assert_eq!(r["container_id"].as_str(), container, "{r}");
    assert_eq!(r["pod_uid"].as_str(), pod, "{r}");
    assert_eq!(r["netns"], netns, "{r}");
}

/// The case: a CLOSE_WAIT leak in a Kubernetes container (systemd driver) is reported
/// hung with its cgroup, container, pod and namespace; `--cgroup` on the container's directory
/// reports it and nothing from other cgroups (filtered in the kernel: the summary's `matched`
/// stays small while other connections come and go); a socket made before its holder moved into
/// the container stays in its first cgroup; `--group-by container` tallies the leak view per
/// container.
#[test]
fn a_containers_leak_is_named_filtered_and_grouped_by_its_cgroup() {
    require_root();
    let (uid, id) = ids(1);
    let path = format!(
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/\
         cri-containerd-{id}.scope",
        uid.replace('-', "_")
    );
    let container = Cgroup::create(&path);
    let host_netns = netns_inode("/proc/self/ns/net");
    let own = cgroup::own_path();

    let all = Tracing::start(&["--hung", "CLOSE_WAIT=1s"]);
    let absolute = container.dir.to_string_lossy().into_owned();
    let filtered = Tracing::start(&["--hung", "CLOSE_WAIT=1s", "--cgroup", &absolute]);
    let grouped = Tracing::start(&[
        "--hung",
        "CLOSE_WAIT=1s",
        "--group-by",
        "container",
        "--interval",
        "1s",
    ]);

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // The leak: made in the container, the peer closes, the process never does.
    let leaker = Kid(container
        .spawn(&mut bash_client(port, "exec sleep 30"))
        .expect("spawning bash in the container"));
    let (server, leak) = accept(&listener);
    drop(server);
    // Made here, then held by a process in the container.
    let before = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (before_server, _) = listener.accept().unwrap();
    let moved = (before.local_addr().unwrap(), before.peer_addr().unwrap());
    let holder = Kid(container
        .spawn_holding(quiet(Command::new("sleep").arg("30")), &[before.as_fd()])
        .expect("spawning sleep in the container"));
    drop(before);
    drop(before_server);
    // Connections of this cgroup, which the filter must keep out.
    const ELSEWHERE: usize = 100;
    tcpclose_tests::churn(&listener, ELSEWHERE);

    let hung = |r: &Value, t| r["type"] == "hung" && about(r, t);
    let records = all.wait_for("both hangs", Duration::from_secs(10), |rs| {
        rs.iter().any(|r| hung(r, leak)) && rs.iter().any(|r| hung(r, moved))
    });
    let r = the(&records, "hung", leak);
    check_placement(r, &path, Some(&id), Some(&uid), host_netns);
    assert_eq!(r["pid"], leaker.pid(), "{r}");
    let r = the(&records, "hung", moved);
    let own_container = tcpclose::cgroups::container_id(&own);
    let own_pod = tcpclose::cgroups::pod_uid(&own);
    check_placement(
        r,
        &own,
        own_container.as_deref(),
        own_pod.as_deref(),
        host_netns,
    );
    assert_eq!(r["pid"], holder.pid(), "{r}");

    filtered.wait_for("the leak", Duration::from_secs(10), |rs| {
        rs.iter().any(|r| hung(r, leak))
    });
    let records = grouped.wait_for(
        "the container in the leak view",
        Duration::from_secs(10),
        |rs| {
            rs.iter().any(|r| {
                r["type"] == "leaks"
                    && r["leaks"].as_array().is_some_and(|leaks| {
                        leaks
                            .iter()
                            .any(|l| l["group"] == id[..12] && l["hung_now"] == 1)
                    })
            })
        },
    );
    let view = records.iter().rev().find(|r| r["type"] == "leaks").unwrap();
    assert_eq!(view["group_by"], "container", "{view}");

    let leaker_pid = leaker.pid();
    drop(leaker);
    drop(holder);
    let run = filtered.stop();
    let cgroups: Vec<&Value> = run
        .records
        .iter()
        .filter(|r| r.get("laddr").is_some())
        .map(|r| &r["cgroup"])
        .collect();
    assert!(
        !cgroups.is_empty() && cgroups.iter().all(|c| **c == path.as_str()),
        "only the container's sockets: {:#?}",
        run.records
    );
    assert!(
        !run.records.iter().any(|r| about(r, moved)),
        "the socket made outside the container is filtered out: {:#?}",
        run.records
    );
    // The leak view's per-process lines say where the sockets are too.
    let view = run
        .records
        .iter()
        .rev()
        .find(|r| r["type"] == "leaks")
        .unwrap_or_else(|| panic!("no leak view: {:#?}", run.records));
    let line = view["leaks"]
        .as_array()
        .and_then(|lines| lines.iter().find(|l| l["pid"] == leaker_pid))
        .unwrap_or_else(|| panic!("no line for the leaker: {view}"));
    check_placement(line, &path, Some(&id), Some(&uid), host_netns);
    let matched = run.summary()["matched"].as_u64().expect("matched");
    assert!(
        (1..=12).contains(&matched),
        "the kernel delivered only the container's transitions ({ELSEWHERE} connections \
         elsewhere): {matched}"
    );
    all.stop();
    grouped.stop();
}

/// The cgroupfs driver's and Docker's paths name the container (and the pod) of a teardown.
#[test]
fn cgroupfs_and_docker_paths_name_the_container_of_a_teardown() {
    require_root();
    let (uid, id) = ids(2);
    let (_, docker_id) = ids(3);
    let kubepods = Cgroup::create(&format!("/kubepods/besteffort/pod{uid}/{id}"));
    let docker = Cgroup::create(&format!("/docker/{docker_id}"));
    let host_netns = netns_inode("/proc/self/ns/net");
    let tracer = Tracing::start(&[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut tuples = Vec::new();
    let mut kids = Vec::new();
    for cgroup in [&kubepods, &docker] {
        // The peer closes first; bash reads the end, then closes: a passive close.
        let kid = Kid(cgroup
            .spawn(&mut bash_client(
                port,
                "read -r -t 10 -u 3 _; exec 3<&-; sleep 5",
            ))
            .expect("spawning bash"));
        let (server, tuple) = accept(&listener);
        drop(server);
        tuples.push(tuple);
        kids.push(kid);
    }
    let records = tracer.wait_for("both teardowns", Duration::from_secs(10), |rs| {
        tuples
            .iter()
            .all(|&t| rs.iter().any(|r| r["type"] == "teardown" && about(r, t)))
    });
    let r = the(&records, "teardown", tuples[0]);
    assert_eq!(r["close"], "passive", "{r}");
    check_placement(r, &kubepods.path, Some(&id), Some(&uid), host_netns);
    let r = the(&records, "teardown", tuples[1]);
    check_placement(r, &docker.path, Some(&docker_id), None, host_netns);
    drop(kids);
    tracer.stop();
}

/// A socket in another network namespace carries that namespace's inode, and `--netns` keeps
/// only that namespace's sockets, in the kernel.
#[test]
fn a_socket_in_another_namespace_carries_its_inode_and_netns_filters() {
    require_root();
    let ns = Netns::new("place");
    let path = format!("/run/netns/{}", ns.name());
    let inode = netns_inode(&path);
    let all = Tracing::start(&[]);
    let only = Tracing::start(&["--netns", &path]);
    // A passive close on the client's side, in the namespace and on the host.
    let close_passively = || {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let tuple = (client.local_addr().unwrap(), client.peer_addr().unwrap());
        drop(server);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        drop(client);
        tuple
    };
    let inside = ns.run(close_passively);
    let outside = close_passively();
    let is_teardown = |r: &Value, t| r["type"] == "teardown" && about(r, t);
    let records = all.wait_for("both teardowns", Duration::from_secs(10), |rs| {
        rs.iter().any(|r| is_teardown(r, inside)) && rs.iter().any(|r| is_teardown(r, outside))
    });
    assert_eq!(the(&records, "teardown", inside)["netns"], inode);
    assert_eq!(
        the(&records, "teardown", outside)["netns"],
        netns_inode("/proc/self/ns/net")
    );
    only.wait_for("the namespace's teardown", Duration::from_secs(10), |rs| {
        rs.iter().any(|r| is_teardown(r, inside))
    });
    let run = only.stop();
    let sockets: Vec<&Value> = run
        .records
        .iter()
        .filter(|r| r.get("laddr").is_some())
        .collect();
    assert!(
        !sockets.is_empty() && sockets.iter().all(|r| r["netns"] == inode),
        "only the namespace's sockets: {:#?}",
        run.records
    );
    all.stop();
}
