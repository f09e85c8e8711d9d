//! Network namespaces of the test's own: their own TCP settings (sysctls) and firewall rules
//! (nftables), without touching the host's.
//!
//! A [`Netns`] is made with `ip netns add`, has its loopback up, and is deleted when dropped
//! (which also kills its timewait sockets). Sockets are made inside it by [`Netns::run`], on a
//! thread that first joins it (`setns`); a socket stays in its namespace wherever it is used from
//! afterwards, so the test's own thread can then read, shut down and close it. xtask's bench
//! makes them with [`Netns::create`] and moves its churn threads in with [`Netns::enter`], the
//! forms that fail with an error rather than a panic.
//!
//! A [`Place`] is a namespace and a port of 127.0.0.1 for a test's sockets there. The port is
//! held on the host (bound, never listening), so that no other socket of the host uses it and a
//! tracer following it (`--port`) sees only the test's sockets.
//!
//! A socket is named by its ends, `(local, remote)`, as `/proc/net/tcp` shows it.

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::Duration,
};

use crate::{
    BoundSocket, mono_ns, run_checked, run_ok, tcp_state,
    tcp_state::{FIN_WAIT1, FIN_WAIT2},
    timed,
    timing::{MS, Moment, POLL, SPIN, sleep_until, wait_for},
};

/// A network namespace, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Makes a fresh namespace (named after `tag`, this process and a counter) with `lo` up;
    /// panics if it cannot.
    pub fn new(tag: &str) -> Self {
        crate::require_root();
        Self::create(tag).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Netns::new`], failing with an error rather than a panic.
    pub fn create(tag: &str) -> io::Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tcpclose-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run_checked(Command::new("ip").args(["netns", "add", &name]))?;
        // Deleted again if what follows fails.
        let ns = Self { name };
        run_checked(
            Command::new("ip")
                .args(["-n", &ns.name])
                .args(["link", "set", "lo", "up"]),
        )?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS`; panics unless it succeeds; returns its standard output.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = run_ok(Command::new("ip").args(["-n", &self.name]).args(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `argv` inside the namespace (`ip netns exec`); panics unless it succeeds; returns its
    /// standard output.
    pub fn exec(&self, argv: &[&str]) -> String {
        let out = run_ok(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(argv),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One nftables command in the namespace, e.g. `add table inet t`.
    pub fn nft(&self, command: &str) -> String {
        self.exec(&["nft", command])
    }

    /// Sets `key` (dotted, e.g. `net.ipv4.tcp_fin_timeout`) in the namespace and checks it took.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        // Network sysctls are those of the namespace of the thread that opens them.
        let now = self.run(|| {
            std::fs::write(&path, value).unwrap_or_else(|e| panic!("writing {path}: {e}"));
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
        });
        assert_eq!(now.trim(), value, "{key} in {}", self.name);
    }

    /// Moves the calling thread into the namespace (see [`enter`]).
    pub fn enter(&self) -> io::Result<()> {
        enter(&self.name)
    }

    /// Runs `f` on a thread inside the namespace: sockets it makes belong to the namespace, and
    /// `/proc/thread-self/net/*` (see [`crate::tcp_state`]) shows the namespace's sockets.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.enter().unwrap_or_else(|e| panic!("{e}"));
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

/// Moves the calling thread into the network namespace `name` (`/run/netns/NAME`, as `ip netns`
/// makes it): sockets it makes from now on belong to the namespace, and
/// `/proc/thread-self/net/*` shows the namespace's. The process's other threads stay where they
/// are.
pub fn enter(name: &str) -> io::Result<()> {
    let path = format!("/run/netns/{name}");
    let ns =
        File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("opening {path}: {e}")))?;
    // SAFETY: setns(2) on a namespace fd that stays open for the call; affects only this thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("setns({path}): {e}")));
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        let result = crate::spawn(
            Command::new("ip")
                .args(["netns", "del", &self.name])
                .stdin(std::process::Stdio::null()),
        )
        .map(|mut child| crate::wait_with_deadline(&mut child, Duration::from_secs(60)));
        match result {
            Ok(Some(status)) if status.success() => {}
            other => eprintln!("ip netns del {}: {other:?}", self.name),
        }
    }
}

/// The addresses a [`Place`]'s connections use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addresses {
    /// 127.0.0.1, IPv4 sockets.
    V4,
    /// ::1, IPv6 sockets.
    V6,
    /// ::ffff:127.0.0.1: IPv6 sockets carrying IPv4 (the kernel's `ipv6_mapped` sockets, as a
    /// dual-stack server accepts IPv4 clients).
    V4Mapped,
}

/// A namespace of the test's own and a port for it, held on the host.
pub struct Place {
    pub ns: Netns,
    /// The loopback address of [`Addresses`] at the reserved port.
    pub server_addr: SocketAddr,
    _reserved: BoundSocket,
}

impl Place {
    /// A fresh [`Netns`] named after `tag`, and a port held on the host; IPv4.
    pub fn new(tag: &str) -> Self {
        Self::with(tag, Addresses::V4)
    }

    /// [`Place::new`], its connections on `addresses`.
    pub fn with(tag: &str, addresses: Addresses) -> Self {
        crate::require_root();
        let (held, server): (IpAddr, IpAddr) = match addresses {
            Addresses::V4 => (Ipv4Addr::LOCALHOST.into(), Ipv4Addr::LOCALHOST.into()),
            Addresses::V6 => (Ipv6Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()),
            // IPv4's port space: hold the port there.
            Addresses::V4Mapped => (
                Ipv4Addr::LOCALHOST.into(),
                Ipv4Addr::LOCALHOST.to_ipv6_mapped().into(),
            ),
        };
        let reserved = BoundSocket::new(held);
        Self {
            ns: Netns::new(tag),
            server_addr: SocketAddr::new(server, reserved.port),
            _reserved: reserved,
        }
    }

    /// The port, as tcpclose's `--port` takes it.
    pub fn port(&self) -> String {
        self.server_addr.port().to_string()
    }

    /// The state of the socket `(local, remote)` in the namespace (see [`tcp_state`]).
    pub fn state(&self, (local, remote): (SocketAddr, SocketAddr)) -> Option<u8> {
        self.ns.run(|| tcp_state(local, remote))
    }

    /// [`wait_for`] the socket `(local, remote)` to be in `state` (`None`: gone), polled in the
    /// namespace.
    pub fn wait_for_state(
        &self,
        (local, remote): (SocketAddr, SocketAddr),
        state: Option<u8>,
        since: u64,
        timeout: Duration,
        interval: Duration,
    ) -> Moment {
        let what = format!("{local} -> {remote} in state {state:?}");
        self.ns.run(|| {
            wait_for(&what, since, timeout, interval, || {
                tcp_state(local, remote) == state
            })
        })
    }

    /// Runs `close` (the close of `socket`, or the shutdown of its sending side: its FIN) as a
    /// [`timed`] close, then waits for `socket` to reach FIN_WAIT2 (the peer's ACK of the FIN):
    /// when it closed, and when it reached FIN_WAIT2.
    pub fn close_to_fin_wait2(
        &self,
        socket: (SocketAddr, SocketAddr),
        close: impl FnOnce(),
    ) -> (Moment, Moment) {
        let (closed, ()) = Moment::of(|| timed(close));
        let fin_wait2 = self.wait_for_state(
            socket,
            Some(FIN_WAIT2),
            closed.lo,
            Duration::from_secs(1),
            SPIN,
        );
        (closed, fin_wait2)
    }

    /// Checks that `socket` is still in `state` 100 ms before `due` (`lasts` says why it should
    /// be), then waits up to `timeout` for it to be gone: when it went.
    pub fn wait_for_expiry(
        &self,
        socket: (SocketAddr, SocketAddr),
        state: u8,
        due: u64,
        timeout: Duration,
        lasts: &str,
    ) -> Moment {
        sleep_until(due - 100 * MS);
        let before = mono_ns();
        assert_eq!(self.state(socket), Some(state), "{lasts}");
        self.wait_for_state(socket, None, before, timeout, POLL)
    }

    /// A listener on the place's port and `n` connections to it, accepted: (client, server)
    /// pairs, made in the namespace. The listener is closed.
    pub fn connections(&self, n: usize) -> Vec<(TcpStream, TcpStream)> {
        let addr = self.server_addr;
        self.ns.run(|| {
            let listener = TcpListener::bind(addr).expect("bind in the namespace");
            (0..n)
                .map(|_| {
                    let client = TcpStream::connect(addr).expect("connect");
                    let (server, peer) = listener.accept().expect("accept");
                    assert_eq!(peer, client.local_addr().unwrap());
                    (client, server)
                })
                .collect()
        })
    }

    /// nftables in the namespace: drop every packet that `socket` sends, until
    /// [`Place::deliver_packets_again`].
    pub fn drop_packets(&self, (from, to): (SocketAddr, SocketAddr)) {
        self.ns.nft("add table inet tcpclose_drop");
        self.ns.nft(
            "add chain inet tcpclose_drop out { type filter hook output priority 0; policy accept; }",
        );
        self.ns.nft(&format!(
            "add rule inet tcpclose_drop out ip saddr {} tcp sport {} ip daddr {} tcp dport {} drop",
            from.ip(),
            from.port(),
            to.ip(),
            to.port()
        ));
    }

    pub fn deliver_packets_again(&self) {
        self.ns.nft("delete table inet tcpclose_drop");
    }

    /// nftables in the namespace: every FIN arriving for local port `port` is lost, until
    /// [`Place::deliver_fins_again`]. Lost on arrival (the input hook), not on output: there a
    /// drop fails the transmission, and the kernel would retry it as a probe rather than
    /// retransmit a FIN it counts as sent.
    pub fn lose_fins_to(&self, port: u16) {
        self.ns.nft("add table inet tcpclose_lost_fins");
        self.ns.nft(
            "add chain inet tcpclose_lost_fins in { type filter hook input priority 0; policy accept; }",
        );
        self.ns.nft(&format!(
            "add rule inet tcpclose_lost_fins in tcp dport {port} tcp flags & fin == fin drop"
        ));
    }

    pub fn deliver_fins_again(&self) {
        self.ns.nft("delete table inet tcpclose_lost_fins");
    }

    /// Makes the FINs of `client` and `server` (a connection in this namespace) cross. An
    /// nftables output rule in the namespace drops every packet with FIN while both sides shut
    /// down their sending side: the FIN never leaves (the drop fails the transmission), so each
    /// side sits in FIN_WAIT1 with its FIN unsent and the zero-window probe timer armed. With the
    /// rule gone, the two timers, armed in the same jiffy from the same thread, fire in the same
    /// timer run, and each side sends its FIN before the other's arrives: both go FIN_WAIT1 ->
    /// CLOSING -> (ACK) TIME_WAIT. Should the two shutdowns straddle a jiffy boundary, the first
    /// FIN arrives alone: only its receiver goes CLOSING (and sends its own FIN at once), and the
    /// first sender, acked, goes FIN_WAIT2 -> TIME_WAIT (an active close). When both shut down.
    pub fn cross_fins(&self, client: &TcpStream, server: &TcpStream) -> Moment {
        let ns = &self.ns;
        let tuple = (
            client.local_addr().expect("client's address"),
            server.local_addr().expect("server's address"),
        );
        ns.nft("add table inet tcpclose_fins");
        ns.nft(
            "add chain inet tcpclose_fins out { type filter hook output priority 0; policy accept; }",
        );
        ns.nft("add rule inet tcpclose_fins out tcp flags & fin == fin drop");
        let (shut, ()) = Moment::of(|| {
            client.shutdown(Shutdown::Write).expect("client shutdown");
            server.shutdown(Shutdown::Write).expect("server shutdown");
        });
        let held = ns.run(|| (tcp_state(tuple.0, tuple.1), tcp_state(tuple.1, tuple.0)));
        ns.nft("delete table inet tcpclose_fins");
        assert_eq!(held, (Some(FIN_WAIT1), Some(FIN_WAIT1)), "both FINs held");
        shut
    }

    /// Kills the timewait sockets of the port (`ss -K`: SOCK_DESTROY, which aborts timewait
    /// sockets too) and checks that none is left: when they were killed.
    pub fn kill_time_wait(&self) -> Moment {
        let port = self.port();
        let filter = format!("( sport = :{port} or dport = :{port} )");
        let (killed, out) = Moment::of(|| {
            self.ns
                .exec(&["ss", "-K", "-tn", "state", "time-wait", &filter])
        });
        let left = self.ns.exec(&["ss", "-Htn", "state", "time-wait", &filter]);
        assert!(left.trim().is_empty(), "ss -K killed {out}, left {left}");
        killed
    }
}
