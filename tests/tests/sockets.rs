//! sock_diag and `/proc` across network namespaces, as the hang checks use them, on the real
//! kernel (entering another namespace needs root).

use std::{
    collections::HashSet,
    fs,
    net::{SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd, unix::fs::MetadataExt as _},
    time::Instant,
};

use tcpclose::{
    event::TcpState,
    sockets::{ProcessIndex, lookup, lookup_all_namespaces, snapshot},
};
use tcpclose_tests::{netns::Netns, require_root};

/// The inode of one of our descriptors, from its `socket:[N]` link.
fn inode_of(fd: &impl AsRawFd) -> u64 {
    let link = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("fd link");
    let link = link.to_string_lossy();
    link.strip_prefix("socket:[")
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a socket: {link}"))
}

fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let client = TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    (client, server)
}

fn ends(stream: &TcpStream) -> (SocketAddr, SocketAddr) {
    (
        stream.local_addr().expect("address"),
        stream.peer_addr().expect("address"),
    )
}

#[test]
fn lookup_crosses_network_namespaces() {
    require_root();
    let netns = Netns::new("lookup");
    let ns_inode = fs::metadata(format!("/run/netns/{}", netns.name()))
        .expect("the namespace")
        .ino();
    let (client, _server, _listener) = netns.run(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listening");
        let (client, server) = pair(&listener);
        (client, server, listener)
    });
    let (local, remote) = ends(&client);
    assert_eq!(lookup(local, remote).unwrap(), None, "not in our namespace");
    let all = lookup_all_namespaces(local, remote).unwrap();
    assert_eq!(all.len(), 1, "{all:?}");
    let s = all[0].clone();
    assert_eq!((s.local, s.remote), (local, remote));
    assert_eq!(s.state, TcpState::Established);
    assert_eq!(s.inode, inode_of(&client));
    assert_eq!(s.netns, ns_inode);
    let ours = fs::metadata("/proc/thread-self/ns/net")
        .expect("our namespace")
        .ino();
    assert_ne!(s.netns, ours);
    // Owners are found whatever the namespace: inodes are global.
    let index = ProcessIndex::scan(&HashSet::from([s.inode])).unwrap();
    assert_eq!(index.owners_of(s.inode)[0].pid, std::process::id());
    // This thread is still in our namespace.
    assert_eq!(lookup(local, remote).unwrap(), None);
    assert!(
        lookup_all_namespaces(local, SocketAddr::new(remote.ip(), 1))
            .unwrap()
            .is_empty()
    );
}

/// What each piece costs, with many sockets and namespaces:
/// `cargo xtask test -- --test sockets costs --ignored --nocapture`
#[test]
#[ignore = "a measurement, not a check"]
fn costs() {
    require_root();
    const PAIRS: usize = 2000;
    const NAMESPACES: usize = 20;
    let listener = TcpListener::bind("127.0.0.1:0").expect("listening");
    let pairs: Vec<_> = (0..PAIRS).map(|_| pair(&listener)).collect();
    let time = |what: &str, runs: u32, f: &mut dyn FnMut()| {
        let start = Instant::now();
        for _ in 0..runs {
            f();
        }
        eprintln!("{what}: {:?}", start.elapsed() / runs);
    };
    let mut n = 0;
    time("snapshot", 20, &mut || n = snapshot().unwrap().len());
    eprintln!("  ({n} sockets)");
    let (local, remote) = ends(&pairs[PAIRS / 2].0);
    time("exact lookup (hit)", 1000, &mut || {
        lookup(local, remote).unwrap().unwrap();
    });
    let missing = SocketAddr::new(remote.ip(), 1);
    time("lookup (miss: exact + filtered dump)", 100, &mut || {
        assert!(lookup(local, missing).unwrap().is_none());
    });
    let inodes: HashSet<u64> = pairs.iter().map(|(c, _)| inode_of(c)).collect();
    let mut index = ProcessIndex::default();
    time("/proc scan", 20, &mut || {
        index = ProcessIndex::scan(&inodes).unwrap()
    });
    eprintln!(
        "  ({} processes, {} fds, {} denied)",
        index.processes, index.fds, index.denied
    );
    let extra: Vec<_> = (0..NAMESPACES)
        .map(|i| Netns::new(&format!("costs{i}")))
        .collect();
    time("lookup_all_namespaces (miss)", 20, &mut || {
        assert!(lookup_all_namespaces(local, missing).unwrap().is_empty());
    });
    eprintln!("  ({NAMESPACES} namespaces of ours among the others)");
    drop(extra);
}
