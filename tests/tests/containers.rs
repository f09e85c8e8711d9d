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
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use tcpclose_tests::{
    Kid, Tracing, about,
    cgroup::{self, Cgroup},
    connect_with, free_port, mono_ns,
    netns::Netns,
    require_root, tcp_state,
    tcp_state::TIME_WAIT,
    timing::{POLL, wait_for},
};

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
    let (uid, id) = cgroup::test_ids(1);
    let path = cgroup::containerd_path(&uid, &id);
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
    // Connections of this cgroup, which the filter must keep out: to a listener of their own,
    // since churn() waits for every connection to its listener to close, and the leaks stay.
    const ELSEWHERE: usize = 100;
    let elsewhere = TcpListener::bind("127.0.0.1:0").unwrap();
    tcpclose_tests::churn(&elsewhere, ELSEWHERE);

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
    let (uid, id) = cgroup::test_ids(2);
    let (_, docker_id) = cgroup::test_ids(3);
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

/// Containers reuse addresses: the same connection (127.0.0.1:C -> 127.0.0.1:S) made and closed
/// in two network namespaces at once is two teardowns, each with its own namespace and both its
/// timewait phases. Their timewait sockets share the 4-tuple and are told apart by namespace.
/// (Here each close() arms its timewait socket and reports its full socket's CLOSE back to back;
/// when two CPUs interleave them, only the namespace tells the armings apart: the engine's test
/// `the_same_tuple_in_two_namespaces_is_two_connections` feeds that order.)
#[test]
fn the_same_connection_in_two_namespaces_is_two_teardowns() {
    require_root();
    let twins = [Netns::new("twin-a"), Netns::new("twin-b")];
    let mut inodes: Vec<u64> = twins
        .iter()
        .map(|ns| netns_inode(&format!("/run/netns/{}", ns.name())))
        .collect();
    inodes.sort_unstable();
    let server = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let client = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let tuple = (client, server);
    let tracer = Tracing::start(&["--port", &server.port().to_string()]);
    let pairs: Vec<(TcpStream, TcpStream)> = twins
        .iter()
        .map(|ns| {
            ns.run(|| {
                let listener = TcpListener::bind(server).expect("listening");
                let c = connect_with(server, Some(client.port()), false).expect("connecting");
                let (s, _) = listener.accept().expect("accepting");
                (c, s)
            })
        })
        .collect();
    // Both clients close, then both servers: both clients go to TIME_WAIT at about once.
    let (clients, servers): (Vec<TcpStream>, Vec<TcpStream>) = pairs.into_iter().unzip();
    drop(clients);
    for mut s in servers {
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("reading the client's FIN");
    }
    for ns in &twins {
        ns.run(|| {
            wait_for(
                "the client in TIME_WAIT",
                mono_ns(),
                Duration::from_secs(10),
                POLL,
                || tcp_state(client, server) == Some(TIME_WAIT),
            )
        });
    }
    for ns in &twins {
        let filter = format!("( sport = :{} )", client.port());
        ns.exec(&["ss", "-K", "-tn", "state", "time-wait", &filter]);
    }
    let is_client = |r: &Value| r["type"] == "teardown" && about(r, tuple);
    let records = tracer.wait_for("both clients' teardowns", Duration::from_secs(10), |rs| {
        rs.iter().filter(|r| is_client(r)).count() >= 2
    });
    let clients: Vec<&Value> = records.iter().filter(|r| is_client(r)).collect();
    assert_eq!(clients.len(), 2, "{clients:#?}");
    let mut seen: Vec<u64> = clients
        .iter()
        .map(|r| r["netns"].as_u64().expect("netns"))
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, inodes, "one teardown in each namespace: {clients:#?}");
    for r in clients {
        assert_eq!(r["close"], "active", "{r}");
        for phase in ["FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT"] {
            assert!(r["phases"][phase].is_u64(), "{phase} timed: {r}");
        }
        assert_eq!(r["timewait_end"], "killed", "{r}");
        assert_eq!(r["complete"], true, "{r}");
    }
    tracer.stop();
}
