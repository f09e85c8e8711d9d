//! The kernel's socket table and the processes that hold its sockets, the way `ss -tanp` finds
//! them: NETLINK_SOCK_DIAG for the TCP sockets (addresses, state, inode, timers, `tcp_info`),
//! `/proc/*/fd` for which processes hold each socket inode.
//!
//! This is for hung teardowns (sockets stuck in CLOSE_WAIT, FIN_WAIT*, LAST_ACK, CLOSING,
//! TIME_WAIT) and for one snapshot at start-up, never for the per-event path: every call makes
//! blocking system calls (from an async task, call it through `spawn_blocking`).
//!
//! Costs, measured on Linux 6.18 (2 vCPUs, 4,000 sockets, 70 processes): a [`snapshot`] takes
//! 5.5 ms (two dumps, one per family); a [`lookup`] that finds its socket 18 µs (one request,
//! one reply), one that does not ~1 ms (see there); [`ProcessIndex::scan`] ~20 ms, ~5 µs per
//! open file descriptor on the host, as for `ss -p`; [`lookup_all_namespaces`] adds one `stat`
//! per process, then ~40 µs per other namespace.
//!
//! The sock_diag wire format is decoded here, not by `netlink-packet-sock-diag` (0.5): that crate
//! drops `idiag_expires` for timewait sockets (its `Timer::TimeWait` has no duration), which is
//! the remaining time we report for them, and its `tcp_info` decoding needs the kernel's struct to
//! be at least as long as the crate's. The two fixed layouts (`inet_diag_req_v2`,
//! `inet_diag_msg`) and the attribute walk are a few dozen lines; `netlink-sys` owns the socket.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use crate::event::{Family, TcpState};
use anyhow::{Context as _, Result, bail};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};

// ABI: include/uapi/linux/netlink.h, sock_diag.h, inet_diag.h.
const NLMSG_HDRLEN: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg`.
const MSG_LEN: usize = 72;
const INET_DIAG_INFO: u16 = 2;
/// The socket's cgroup2 id (`u64`): sent for every full socket since Linux 5.7
/// (inet_diag_msg_attrs_fill()), unasked.
const INET_DIAG_CGROUP_ID: u16 = 21;
const INET_DIAG_NOCOOKIE: [u8; 8] = [0xff; 8];
const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;
/// Every TCP state from ESTABLISHED (1) to CLOSING (11), and NEW_SYN_RECV (12: request sockets,
/// reported as SYN_RECV). Not TCP_BOUND_INACTIVE (13, bound but idle sockets), which `ss -a`
/// leaves out too. Timewait sockets are matched by their substate (FIN_WAIT2 or TIME_WAIT).
const ALL_STATES: u32 = 0x1ffe;
/// Offsets in `struct tcp_info` (include/uapi/linux/tcp.h), stable since 2.6.
const TCPI_LAST_DATA_RECV: usize = 52;
const TCPI_LAST_ACK_RECV: usize = 56;
/// Large enough for any sock_diag datagram: the kernel sizes dump skbs to at most 32 KiB.
const RECV_BUF: usize = 64 * 1024;

/// One TCP socket as sock_diag reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketInfo {
    /// The socket's family: an IPv6 socket talking IPv4 is `Ipv6` with v4-mapped addresses.
    pub family: Family,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// For timewait sockets, their substate: FIN_WAIT2 (orphaned, waiting for the peer's FIN)
    /// or TIME_WAIT. Request sockets (SYN received, not yet accepted) are SYN_RECV.
    pub state: TcpState,
    /// A timewait socket (`inet_timewait_sock`): the application has closed it.
    pub timewait: bool,
    /// The socket's inode (`socket:[N]` in `/proc/PID/fd`); 0 when no file refers to it:
    /// timewait and request sockets, and full sockets orphaned by `close()`.
    pub inode: u64,
    /// The owner's uid; 0 for timewait and request sockets.
    pub uid: u32,
    /// The kernel's socket cookie (`SO_COOKIE`, `bpf_get_socket_cookie()`).
    pub cookie: u64,
    /// Bytes received but not read by the application, plus one once the peer's FIN has arrived
    /// and the application has not read to the end (`rcv_nxt - copied_seq`: the FIN takes a
    /// sequence number). For a listener, connections waiting to be accepted.
    pub recv_queue: u32,
    /// Bytes sent but not acknowledged (the backlog limit for a listener).
    pub send_queue: u32,
    pub timer: Option<Timer>,
    /// From `tcp_info` (full sockets only): milliseconds since the last segment carrying data
    /// arrived. A bare FIN does not count, see [`SocketInfo::last_ack_recv_ms`].
    pub last_data_recv_ms: Option<u32>,
    /// From `tcp_info` (full sockets only): milliseconds since the last ACK arrived. Every
    /// segment after the handshake carries one, the peer's FIN included: in CLOSE_WAIT, unless we
    /// sent data since, this is how long ago the peer closed.
    pub last_ack_recv_ms: Option<u32>,
    /// The inode of the network namespace the socket was found in (`/proc/PID/ns/net`).
    pub netns: u64,
    /// The socket's cgroup2 id (full sockets only; 0 when the kernel does not say).
    pub cgroup: u64,
}

impl SocketInfo {
    /// Its network namespace and cgroup, as the kernel programs report them.
    pub fn placement(&self) -> crate::event::Placement {
        crate::event::Placement {
            netns: u32::try_from(self.netns).unwrap_or(0),
            cgroup: self.cgroup,
        }
    }

    /// Time until a timewait socket's timer fires and the socket goes away.
    pub fn timewait_remaining_ms(&self) -> Option<u32> {
        self.timer
            .filter(|timer| timer.kind == TimerKind::TimeWait)
            .map(|timer| timer.expires_ms)
    }
}

/// The timer pending on a socket (`idiag_timer`, `idiag_expires`, `idiag_retrans`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timer {
    pub kind: TimerKind,
    /// Milliseconds until it fires (0 when overdue).
    pub expires_ms: u32,
    /// Retransmissions (`Retransmit`) or unanswered probes (`KeepAlive`, `ZeroWindowProbe`).
    pub retransmits: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerKind {
    /// Retransmission (also a request socket's SYN-ACK timer).
    Retransmit,
    /// Keepalive, or an orphaned FIN_WAIT2 socket's timer before it becomes a timewait socket.
    KeepAlive,
    /// A timewait socket's timer: it ends TIME_WAIT, or an orphaned FIN_WAIT2.
    TimeWait,
    ZeroWindowProbe,
}

/// Every TCP socket, IPv4 and IPv6, in all states, in the calling thread's network namespace.
pub fn snapshot() -> Result<Vec<SocketInfo>> {
    snapshot_in(&TcpState::ALL)
}

/// The TCP sockets in `states` (timewait sockets by their substate), IPv4 and IPv6, in the
/// calling thread's network namespace: the kernel leaves the others out of its dump.
pub fn snapshot_in(states: &[TcpState]) -> Result<Vec<SocketInfo>> {
    let mask = states_mask(states);
    let mut diag = Diag::open()?;
    let mut sockets = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let request = request_in(family, SockId::default(), mask);
        diag.dump(&request, |socket| sockets.push(socket))
            .with_context(|| format!("listing {} TCP sockets", family_name(family)))?;
    }
    Ok(sockets)
}

/// [`snapshot`] of our network namespace, then of every other one we may enter (the way
/// [`lookup_all_namespaces`] finds and enters them; one that refuses entry is skipped). The
/// tracepoint sees every namespace: so must the start-up snapshot.
pub fn snapshot_all_namespaces() -> Result<Vec<SocketInfo>> {
    snapshot_all_namespaces_in(&TcpState::ALL)
}

/// [`snapshot_all_namespaces`] of the sockets in `states` only.
pub fn snapshot_all_namespaces_in(states: &[TcpState]) -> Result<Vec<SocketInfo>> {
    let states = states.to_vec();
    let mut sockets = snapshot_in(&states)?;
    let namespaces = other_namespaces(current_netns()?)?;
    if namespaces.is_empty() {
        return Ok(sockets);
    }
    let others = std::thread::Builder::new()
        .name("tcpclose-netns".into())
        .spawn(move || {
            let mut found = Vec::new();
            for netns in &namespaces {
                let Ok(file) = fs::File::open(&netns.path) else {
                    continue;
                };
                if enter_netns(&file, &netns.path).is_err() {
                    continue;
                }
                if let Ok(mut in_netns) = snapshot_in(&states) {
                    found.append(&mut in_netns);
                }
            }
            found
        })
        .context("starting a thread to list other network namespaces")?
        .join()
        .map_err(|_| anyhow::anyhow!("the thread listing other network namespaces panicked"))?;
    sockets.extend(others);
    Ok(sockets)
}

/// The socket with this exact 4-tuple in the calling thread's network namespace, if any.
///
/// An exact query (`inet_diag_req_v2` without `NLM_F_DUMP`, cookie `INET_DIAG_NOCOOKIE`): the
/// kernel looks the tuple up in its hash tables, O(1). Two things to know about it: when no
/// connection matches, the kernel falls back to a listener on the local port (checked away
/// here); and a socket bound to an interface (`SO_BINDTODEVICE`, VRF) only matches a query that
/// names that interface, which a tracepoint does not give. So a miss is confirmed by dumps (one
/// per family) filtered by both ports in the kernel, which walk the whole established hash table
/// (~1 ms with 4,000 sockets) but only run when the exact query found nothing.
pub fn lookup(local: SocketAddr, remote: SocketAddr) -> Result<Option<SocketInfo>> {
    let mut diag = Diag::open()?;
    if let Some(found) = diag.exact(local, remote)? {
        return Ok(Some(found));
    }
    diag.filtered(local, remote)
}

/// The sockets with this 4-tuple in every network namespace of the host, ours first.
///
/// sock_diag only sees the caller's namespace. The others are found through `/proc/*/ns/net`
/// and the bind mounts of `ip netns` (`/run/netns/*`), deduplicated by namespace inode; one
/// short-lived thread enters each with `setns(CLONE_NEWNET)` (which changes only that thread)
/// and makes one exact query there. Cost: one `stat` per process, then ~40 µs per namespace.
/// Needs CAP_SYS_ADMIN. Namespaces that no process or bind mount holds (kept alive only by a
/// socket passed out of them, or entered by a single thread) cannot be reached this way.
/// Containers often reuse the same addresses (127.0.0.1 in each), so the same 4-tuple can exist
/// in more than one namespace: the caller chooses (e.g. by state).
pub fn lookup_all_namespaces(local: SocketAddr, remote: SocketAddr) -> Result<Vec<SocketInfo>> {
    let mut found: Vec<_> = lookup(local, remote)?.into_iter().collect();
    found.extend(in_other_namespaces(local, remote, false)?);
    Ok(found)
}

/// A process holding a socket.
pub use crate::hung::Holder as Owner;

/// Which processes hold which socket inodes: one pass over `/proc/*/fd`.
#[derive(Debug, Default)]
pub struct ProcessIndex {
    owners: HashMap<u64, Vec<Owner>>,
    /// Processes whose file descriptors were read.
    pub processes: usize,
    /// File descriptors read.
    pub fds: usize,
    /// Processes skipped because reading their file descriptors was refused (without
    /// CAP_SYS_PTRACE, other users' processes): owners there are missing.
    pub denied: usize,
}

impl ProcessIndex {
    /// Reads every process's file descriptors once and records the holders of `inodes`.
    /// Processes that exit or refuse access during the scan are skipped.
    pub fn scan(inodes: &HashSet<u64>) -> Result<Self> {
        let mut index = Self::default();
        if inodes.is_empty() {
            return Ok(index);
        }
        let proc = fs::read_dir("/proc").context("listing /proc (is procfs mounted?)")?;
        for entry in proc {
            let Ok(entry) = entry else { continue };
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let fds = match fs::read_dir(entry.path().join("fd")) {
                Ok(fds) => fds,
                Err(err) => {
                    if err.kind() == io::ErrorKind::PermissionDenied {
                        index.denied += 1;
                    }
                    continue;
                }
            };
            index.processes += 1;
            let mut comm: Option<String> = None;
            for fd in fds {
                let Ok(fd) = fd else { break };
                index.fds += 1;
                let Ok(target) = fs::read_link(fd.path()) else {
                    continue;
                };
                let Some(inode) = socket_inode(target.as_os_str().as_encoded_bytes()) else {
                    continue;
                };
                if !inodes.contains(&inode) {
                    continue;
                }
                let comm = comm.get_or_insert_with(|| read_comm(pid));
                let holders = index.owners.entry(inode).or_default();
                // One process may hold a socket in several descriptors (dup, SCM_RIGHTS).
                if !holders.iter().any(|owner| owner.pid == pid) {
                    holders.push(Owner {
                        pid,
                        comm: comm.clone(),
                    });
                }
            }
        }
        Ok(index)
    }

    /// The processes holding this inode; empty when none was found.
    pub fn owners_of(&self, inode: u64) -> &[Owner] {
        self.owners.get(&inode).map_or(&[], Vec::as_slice)
    }

    #[cfg(test)]
    pub fn into_map(self) -> HashMap<u64, Vec<Owner>> {
        self.owners
    }
}

/// The processes holding each of `inodes` (those held by none are absent): see
/// [`ProcessIndex::scan`].
#[cfg(test)]
pub fn owners(inodes: &HashSet<u64>) -> Result<HashMap<u64, Vec<Owner>>> {
    ProcessIndex::scan(inodes).map(ProcessIndex::into_map)
}

/// `socket:[12345]` -> 12345.
fn socket_inode(link: &[u8]) -> Option<u64> {
    let digits = link.strip_prefix(b"socket:[")?.strip_suffix(b"]")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The process's name, empty if it exited meanwhile.
fn read_comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|comm| comm.trim_end_matches('\n').to_owned())
        .unwrap_or_default()
}

/// A network namespace found on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Netns {
    inode: u64,
    /// A file that refers to it: `/proc/PID/ns/net` or `/run/netns/NAME`.
    path: PathBuf,
}

/// The namespace inode of the calling thread.
fn current_netns() -> Result<u64> {
    let meta = fs::metadata("/proc/thread-self/ns/net")
        .context("reading /proc/thread-self/ns/net (is procfs mounted?)")?;
    Ok(meta.ino())
}

/// Every network namespace reachable through a process or an `ip netns` name, but `except`.
fn other_namespaces(except: u64) -> Result<Vec<Netns>> {
    let mut seen = HashSet::from([except]);
    let mut namespaces = Vec::new();
    let mut consider = |path: PathBuf| {
        // `stat` follows the magic link to the namespace's nsfs inode.
        if let Ok(meta) = fs::metadata(&path) {
            if seen.insert(meta.ino()) {
                namespaces.push(Netns {
                    inode: meta.ino(),
                    path,
                });
            }
        }
    };
    for entry in fs::read_dir("/proc").context("listing /proc (is procfs mounted?)")? {
        let Ok(entry) = entry else { continue };
        if entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.bytes().all(|b| b.is_ascii_digit()))
        {
            consider(entry.path().join("ns/net"));
        }
    }
    if let Ok(named) = fs::read_dir("/run/netns") {
        for entry in named.flatten() {
            consider(entry.path());
        }
    }
    Ok(namespaces)
}

fn in_other_namespaces(
    local: SocketAddr,
    remote: SocketAddr,
    first_only: bool,
) -> Result<Vec<SocketInfo>> {
    let namespaces = other_namespaces(current_netns()?)?;
    if namespaces.is_empty() {
        return Ok(Vec::new());
    }
    // setns() moves only the calling thread; this one exits when done, so no thread of ours is
    // left in another namespace.
    std::thread::Builder::new()
        .name("tcpclose-netns".into())
        .spawn(move || query_namespaces(&namespaces, local, remote, first_only))
        .context("starting a thread to query other network namespaces")?
        .join()
        .map_err(|_| anyhow::anyhow!("the thread querying other network namespaces panicked"))?
}

fn query_namespaces(
    namespaces: &[Netns],
    local: SocketAddr,
    remote: SocketAddr,
    first_only: bool,
) -> Result<Vec<SocketInfo>> {
    let mut found = Vec::new();
    for netns in namespaces {
        // Gone since it was listed (its last process exited): nothing to find there.
        let Ok(file) = fs::File::open(&netns.path) else {
            continue;
        };
        // A namespace we may not enter (no CAP_SYS_ADMIN, as in a least-privilege container)
        // hides only its own sockets: go on with the others.
        if enter_netns(&file, &netns.path).is_err() {
            continue;
        }
        let in_netns = || format!("in the network namespace {}", netns.path.display());
        let mut diag = Diag::open().with_context(in_netns)?;
        if let Some(socket) = diag.exact(local, remote).with_context(in_netns)? {
            found.push(socket);
            if first_only {
                break;
            }
        }
    }
    Ok(found)
}

fn enter_netns(file: &fs::File, path: &Path) -> Result<()> {
    // SAFETY: setns() takes any descriptor and changes only this thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EPERM) {
        bail!(
            "entering the network namespace {} was refused: looking for sockets in other \
             network namespaces needs CAP_SYS_ADMIN (run tcpclose as root)",
            path.display()
        );
    }
    Err(err).with_context(|| format!("entering the network namespace {}", path.display()))
}

/// A NETLINK_SOCK_DIAG socket, bound to the network namespace of the thread that opened it.
struct Diag {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
    netns: u64,
}

impl Diag {
    fn open() -> Result<Self> {
        let socket = Socket::new(NETLINK_SOCK_DIAG).context(
            "opening a NETLINK_SOCK_DIAG socket (the kernel needs CONFIG_INET_DIAG; in a \
             container, netlink may be filtered)",
        )?;
        Ok(Self {
            socket,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
            netns: current_netns()?,
        })
    }

    /// The socket with exactly this 4-tuple, from the kernel's hash tables.
    fn exact(&mut self, local: SocketAddr, remote: SocketAddr) -> Result<Option<SocketInfo>> {
        let family = match (local.ip(), remote.ip()) {
            (IpAddr::V4(_), IpAddr::V4(_)) => AF_INET,
            (IpAddr::V6(_), IpAddr::V6(_)) => AF_INET6,
            _ => return Ok(None),
        };
        let request = request(family, SockId::tuple(local, remote));
        let mut found = None;
        let complete = self
            .exchange(&request, false, |socket| found = Some(socket))
            .with_context(|| format!("looking up the TCP socket {local} -> {remote}"))?;
        // Not found (ENOENT), or the kernel's fallback to a listener on the local port.
        Ok(found.filter(|socket| complete && matches(socket, local, remote)))
    }

    /// The socket with this 4-tuple from dumps filtered by port in the kernel, both families
    /// (an IPv6 socket may carry an IPv4 connection).
    fn filtered(&mut self, local: SocketAddr, remote: SocketAddr) -> Result<Option<SocketInfo>> {
        let mut found = None;
        for family in [AF_INET, AF_INET6] {
            let id = SockId {
                sport: local.port(),
                dport: remote.port(),
                ..SockId::default()
            };
            let request = request(family, id);
            self.dump(&request, |socket| {
                if found.is_none() && matches(&socket, local, remote) {
                    found = Some(socket);
                }
            })
            .with_context(|| format!("looking for the TCP socket {local} -> {remote}"))?;
            if found.is_some() {
                break;
            }
        }
        Ok(found)
    }

    fn dump(&mut self, request: &[u8], each: impl FnMut(SocketInfo)) -> Result<()> {
        self.exchange(request, true, each).map(|_| ())
    }

    /// Sends one request and reads its replies; false when the kernel answered ENOENT (an
    /// exact query that found nothing).
    fn exchange(
        &mut self,
        request: &[u8],
        dump: bool,
        mut each: impl FnMut(SocketInfo),
    ) -> Result<bool> {
        let mut request = request.to_vec();
        self.seq = self.seq.wrapping_add(1);
        let flags = if dump {
            NLM_F_REQUEST | NLM_F_DUMP
        } else {
            NLM_F_REQUEST
        };
        request[6..8].copy_from_slice(&flags.to_ne_bytes());
        request[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        self.socket
            .send(&request, 0)
            .context("sending a sock_diag request")?;
        loop {
            self.buf.clear();
            let len = match self.socket.recv(&mut self.buf, libc::MSG_TRUNC) {
                Ok(len) => len,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err).context("reading the sock_diag reply"),
            };
            if len > self.buf.len() {
                bail!(
                    "a sock_diag reply of {len} bytes did not fit in {} bytes",
                    self.buf.len()
                );
            }
            let mut rest = &self.buf[..len];
            while rest.len() >= NLMSG_HDRLEN {
                let msg_len = read_u32(rest, 0).unwrap_or(0) as usize;
                if msg_len < NLMSG_HDRLEN || msg_len > rest.len() {
                    bail!(
                        "malformed sock_diag reply: a message of {msg_len} bytes in {}",
                        rest.len()
                    );
                }
                let kind = read_u16(rest, 4).unwrap_or(0);
                let seq = read_u32(rest, 8).unwrap_or(0);
                let payload = &rest[NLMSG_HDRLEN..msg_len];
                rest = rest.get(align4(msg_len)..).unwrap_or(&[]);
                if seq != self.seq {
                    // A late reply to an earlier request on this socket.
                    continue;
                }
                match kind {
                    SOCK_DIAG_BY_FAMILY => {
                        if let Some(socket) = decode(payload, self.netns)? {
                            each(socket);
                        }
                        if !dump {
                            return Ok(true);
                        }
                    }
                    NLMSG_DONE => {
                        let status = read_i32(payload, 0).unwrap_or(0);
                        if status < 0 {
                            return Err(io::Error::from_raw_os_error(-status))
                                .context("the kernel ended the sock_diag dump with an error");
                        }
                        return Ok(true);
                    }
                    NLMSG_ERROR => {
                        let errno = -read_i32(payload, 0).unwrap_or(0);
                        if errno == 0 {
                            return Ok(true);
                        }
                        if errno == libc::ENOENT && !dump {
                            return Ok(false);
                        }
                        return Err(io::Error::from_raw_os_error(errno)).context(
                            "the kernel refused the sock_diag request (if it says \"No such \
                             file or directory\", load the tcp_diag module: modprobe tcp_diag)",
                        );
                    }
                    NLMSG_NOOP => {}
                    NLMSG_OVERRUN => bail!("the sock_diag reply overran; try again"),
                    other => bail!("unexpected netlink message type {other} in a sock_diag reply"),
                }
            }
        }
    }
}

/// The `inet_diag_sockid` of a request: the 4-tuple of an exact query, or the ports a dump is
/// filtered by in the kernel (0: any; the addresses are ignored).
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u8; 16],
    dst: [u8; 16],
    interface: u32,
}

impl SockId {
    fn tuple(local: SocketAddr, remote: SocketAddr) -> Self {
        Self {
            sport: local.port(),
            dport: remote.port(),
            src: addr_bytes(local.ip()),
            dst: addr_bytes(remote.ip()),
            // A link-local IPv6 address needs its interface.
            interface: match local {
                SocketAddr::V6(v6) => v6.scope_id(),
                SocketAddr::V4(_) => 0,
            },
        }
    }
}

/// A `nlmsghdr` and `inet_diag_req_v2` for TCP in `family`, all states, asking for `tcp_info`;
/// flags and sequence number are set by [`Diag::exchange`].
fn request(family: u8, id: SockId) -> Vec<u8> {
    request_in(family, id, ALL_STATES)
}

/// `idiag_states` for `states`: bit N for TCP state N (see [`ALL_STATES`]).
fn states_mask(states: &[TcpState]) -> u32 {
    states
        .iter()
        .fold(0, |mask, &state| mask | 1 << (state as u32))
        & ALL_STATES
}

/// An `inet_diag_req_v2` for `family` sockets matching `id`, in the states of `mask`.
fn request_in(family: u8, id: SockId, mask: u32) -> Vec<u8> {
    let mut msg = Vec::with_capacity(NLMSG_HDRLEN + REQ_LEN);
    msg.extend_from_slice(&((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
    msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    msg.push(family);
    msg.push(libc::IPPROTO_TCP as u8);
    msg.push(1 << (INET_DIAG_INFO - 1)); // idiag_ext
    msg.push(0);
    msg.extend_from_slice(&mask.to_ne_bytes());
    msg.extend_from_slice(&id.sport.to_be_bytes());
    msg.extend_from_slice(&id.dport.to_be_bytes());
    msg.extend_from_slice(&id.src);
    msg.extend_from_slice(&id.dst);
    msg.extend_from_slice(&id.interface.to_ne_bytes());
    msg.extend_from_slice(&INET_DIAG_NOCOOKIE);
    msg
}

fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    let mut bytes = [0; 16];
    match ip {
        IpAddr::V4(v4) => bytes[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => bytes = v6.octets(),
    }
    bytes
}

/// Decodes one `inet_diag_msg` and its attributes; `None` for a socket this module does not
/// report (a family or state it does not know).
fn decode(payload: &[u8], netns: u64) -> Result<Option<SocketInfo>> {
    if payload.len() < MSG_LEN {
        bail!(
            "malformed sock_diag reply: an inet_diag_msg of {} bytes, expected {MSG_LEN}",
            payload.len()
        );
    }
    let field = |at: usize| read_u32(payload, at).unwrap_or(0);
    let addr = |at: usize| -> [u8; 16] {
        payload
            .get(at..at + 16)
            .and_then(|b| b.try_into().ok())
            .unwrap_or([0; 16])
    };
    let (src, dst) = (addr(8), addr(24));
    let (family, local_ip, remote_ip) = match payload[0] {
        AF_INET => (
            Family::Ipv4,
            IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3])),
            IpAddr::V4(Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3])),
        ),
        AF_INET6 => (
            Family::Ipv6,
            IpAddr::V6(Ipv6Addr::from(src)),
            IpAddr::V6(Ipv6Addr::from(dst)),
        ),
        _ => return Ok(None),
    };
    let Ok(state) = TcpState::try_from(i32::from(payload[1])) else {
        return Ok(None);
    };
    let port = |at: usize| u16::from_be_bytes([payload[at], payload[at + 1]]);
    let timer = match payload[2] {
        1 => Some(TimerKind::Retransmit),
        2 => Some(TimerKind::KeepAlive),
        3 => Some(TimerKind::TimeWait),
        4 => Some(TimerKind::ZeroWindowProbe),
        _ => None,
    }
    .map(|kind| Timer {
        kind,
        expires_ms: field(52),
        retransmits: payload[3],
    });
    // idiag_cookie is two u32 in host order, low half first.
    let cookie = u64::from(field(44)) | (u64::from(field(48)) << 32);
    let mut socket = SocketInfo {
        family,
        local: SocketAddr::new(local_ip, port(4)),
        remote: SocketAddr::new(remote_ip, port(6)),
        state,
        timewait: payload[2] == 3,
        inode: u64::from(field(68)),
        uid: field(64),
        cookie,
        recv_queue: field(56),
        send_queue: field(60),
        timer,
        last_data_recv_ms: None,
        last_ack_recv_ms: None,
        netns,
        cgroup: 0,
    };
    let mut attrs = payload.get(MSG_LEN..).unwrap_or(&[]);
    while attrs.len() >= 4 {
        let len = usize::from(read_u16(attrs, 0).unwrap_or(0));
        let kind = read_u16(attrs, 2).unwrap_or(0) & 0x3fff;
        if len < 4 || len > attrs.len() {
            break;
        }
        if kind == INET_DIAG_INFO {
            let info = &attrs[4..len];
            socket.last_data_recv_ms = read_u32(info, TCPI_LAST_DATA_RECV);
            socket.last_ack_recv_ms = read_u32(info, TCPI_LAST_ACK_RECV);
        } else if kind == INET_DIAG_CGROUP_ID && len >= 12 {
            socket.cgroup = attrs[4..12].try_into().map(u64::from_ne_bytes).unwrap_or(0);
        }
        attrs = attrs.get(align4(len)..).unwrap_or(&[]);
    }
    Ok(Some(socket))
}

/// Whether the socket has this 4-tuple, an IPv4 address matching its v4-mapped IPv6 form.
fn matches(socket: &SocketInfo, local: SocketAddr, remote: SocketAddr) -> bool {
    let same = |a: SocketAddr, b: SocketAddr| {
        a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
    };
    same(socket.local, local) && same(socket.remote, remote)
}

fn family_name(family: u8) -> &'static str {
    if family == AF_INET { "IPv4" } else { "IPv6" }
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn read_i32(bytes: &[u8], at: usize) -> Option<i32> {
    read_u32(bytes, at).map(|v| v as i32)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kernel_is_asked_for_the_states_wanted() {
        use super::*;
        assert_eq!(states_mask(&TcpState::ALL), ALL_STATES);
        assert_eq!(
            states_mask(&[TcpState::CloseWait, TcpState::FinWait2]),
            1 << 8 | 1 << 5
        );
        assert_eq!(states_mask(&[]), 0);
    }

    use std::{
        io::Write as _,
        net::{Shutdown, TcpListener, TcpStream},
        os::fd::AsRawFd,
        thread,
        time::{Duration, Instant},
    };

    use super::*;

    /// The inode of one of our descriptors, from its `socket:[N]` link.
    fn inode_of(fd: &impl AsRawFd) -> u64 {
        let link = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        socket_inode(link.as_os_str().as_encoded_bytes()).expect("a socket")
    }

    fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    fn ends(stream: &TcpStream) -> (SocketAddr, SocketAddr) {
        (stream.local_addr().unwrap(), stream.peer_addr().unwrap())
    }

    fn find(sockets: &[SocketInfo], local: SocketAddr, remote: SocketAddr) -> Option<&SocketInfo> {
        sockets
            .iter()
            .find(|s| s.local == local && s.remote == remote)
    }

    /// Snapshots until `ready` holds (state changes on loopback take a few µs, timers longer).
    fn snapshot_until(ready: impl Fn(&[SocketInfo]) -> bool) -> Vec<SocketInfo> {
        let start = Instant::now();
        loop {
            let sockets = snapshot().unwrap();
            if ready(&sockets) || start.elapsed() > Duration::from_secs(5) {
                return sockets;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn check_snapshot(ip: IpAddr) {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let (est_client, est_server) = pair(&listener);
        // CLOSE_WAIT: the client closes, the server does not. The closed client becomes an
        // orphaned FIN_WAIT2, handed to a timewait socket at once.
        let (cw_client, cw_server) = pair(&listener);
        let cw = ends(&cw_server);
        drop(cw_client);
        // TIME_WAIT: the client closes first, then the server.
        let (tw_client, tw_server) = pair(&listener);
        let tw = ends(&tw_client);
        drop(tw_client);
        thread::sleep(Duration::from_millis(20));
        drop(tw_server);

        let sockets = snapshot_until(|s| {
            find(s, cw.0, cw.1).is_some_and(|s| s.state == TcpState::CloseWait)
                && find(s, tw.0, tw.1).is_some_and(|s| s.state == TcpState::TimeWait)
                && find(s, cw.1, cw.0).is_some_and(|s| s.timewait)
        });
        let family = if ip.is_ipv4() {
            Family::Ipv4
        } else {
            Family::Ipv6
        };
        let netns = current_netns().unwrap();

        let listen = find(
            &sockets,
            listener.local_addr().unwrap(),
            SocketAddr::new(
                if ip.is_ipv4() {
                    Ipv4Addr::UNSPECIFIED.into()
                } else {
                    Ipv6Addr::UNSPECIFIED.into()
                },
                0,
            ),
        )
        .expect("the listener");
        assert_eq!(listen.state, TcpState::Listen);
        assert_eq!(listen.family, family);
        assert_eq!(listen.inode, inode_of(&listener));
        assert!(!listen.timewait);
        assert_eq!(listen.netns, netns);

        for stream in [&est_client, &est_server] {
            let (local, remote) = ends(stream);
            let s = find(&sockets, local, remote).expect("an established socket");
            assert_eq!(s.state, TcpState::Established, "{s:?}");
            assert_eq!(s.family, family);
            assert_eq!(s.inode, inode_of(stream));
            // SAFETY: getuid() has no preconditions and cannot fail.
            assert_eq!(s.uid, unsafe { libc::getuid() });
            assert!(s.cookie != 0);
            assert!(s.last_data_recv_ms.is_some() && s.last_ack_recv_ms.is_some());
        }

        let close_wait = find(&sockets, cw.0, cw.1).expect("the CLOSE_WAIT socket");
        assert_eq!(close_wait.state, TcpState::CloseWait);
        assert_eq!(close_wait.inode, inode_of(&cw_server));
        assert!(!close_wait.timewait);

        let fin_wait2 = find(&sockets, cw.1, cw.0).expect("the orphaned FIN_WAIT2 socket");
        assert_eq!(fin_wait2.state, TcpState::FinWait2, "{fin_wait2:?}");
        assert!(fin_wait2.timewait);
        assert_eq!(fin_wait2.inode, 0);
        assert_eq!(
            fin_wait2.last_data_recv_ms, None,
            "no tcp_info for timewait sockets"
        );
        let fin_timeout: u32 = fs::read_to_string("/proc/sys/net/ipv4/tcp_fin_timeout")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let left = fin_wait2.timewait_remaining_ms().expect("a timewait timer");
        assert!(left > 0 && left <= fin_timeout.min(60) * 1000, "{left} ms");

        let time_wait = find(&sockets, tw.0, tw.1).expect("the TIME_WAIT socket");
        assert_eq!(time_wait.state, TcpState::TimeWait);
        assert_eq!(time_wait.family, family);
        assert!(time_wait.timewait);
        assert_eq!(time_wait.inode, 0);
        let left = time_wait.timewait_remaining_ms().expect("a timewait timer");
        assert!(left > 50_000 && left <= 60_000, "{left} ms");
    }

    #[test]
    fn snapshot_finds_every_state_ipv4() {
        check_snapshot(Ipv4Addr::LOCALHOST.into());
    }

    #[test]
    fn snapshot_finds_every_state_ipv6() {
        check_snapshot(Ipv6Addr::LOCALHOST.into());
    }

    /// In CLOSE_WAIT, the peer's FIN is the last ACK received, but not the last data: the
    /// kernel updates `tcpi_last_data_recv` only for segments that carry data.
    #[test]
    fn close_wait_age_is_the_last_ack() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut client, server) = pair(&listener);
        client.write_all(b"request").unwrap();
        thread::sleep(Duration::from_millis(400));
        client.shutdown(Shutdown::Write).unwrap();
        thread::sleep(Duration::from_millis(400));
        let (local, remote) = ends(&server);
        let s = lookup(local, remote)
            .unwrap()
            .expect("the CLOSE_WAIT socket");
        assert_eq!(s.state, TcpState::CloseWait);
        // rcv_nxt - copied_seq: the unread request, and the FIN's sequence number.
        assert_eq!(s.recv_queue, 7 + 1);
        let data = s.last_data_recv_ms.unwrap();
        let ack = s.last_ack_recv_ms.unwrap();
        assert!((750..2000).contains(&data), "last data {data} ms ago");
        assert!((350..750).contains(&ack), "last ACK (the FIN) {ack} ms ago");
    }

    #[test]
    fn lookup_by_four_tuple() {
        for ip in [
            IpAddr::from(Ipv4Addr::LOCALHOST),
            Ipv6Addr::LOCALHOST.into(),
        ] {
            let listener = TcpListener::bind((ip, 0)).unwrap();
            let (client, server) = pair(&listener);
            let (local, remote) = ends(&client);
            let s = lookup(local, remote).unwrap().expect("the client");
            assert_eq!((s.local, s.remote), (local, remote));
            assert_eq!(s.state, TcpState::Established);
            assert_eq!(s.inode, inode_of(&client));
            let s = lookup(remote, local).unwrap().expect("the server");
            assert_eq!(s.inode, inode_of(&server));
            // No such connection, though the kernel's exact lookup falls back to the listener
            // on that local port.
            let listening = listener.local_addr().unwrap();
            assert_eq!(lookup(listening, SocketAddr::new(ip, 1)).unwrap(), None);
            assert_eq!(lookup(SocketAddr::new(ip, 1), listening).unwrap(), None);
        }
    }

    /// An IPv6 socket carrying IPv4 is found by its IPv4 tuple and by its v4-mapped one.
    #[test]
    fn lookup_dual_stack() {
        let listener = TcpListener::bind("[::]:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (server, _) = listener.accept().unwrap();
        let (local, remote) = ends(&server); // [::ffff:127.0.0.1]:port
        assert!(matches!(local, SocketAddr::V6(_)));
        let v4 = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        for (l, r) in [(local, remote), (v4(local), v4(remote))] {
            let s = lookup(l, r).unwrap().expect("the server socket");
            assert_eq!(s.family, Family::Ipv6);
            assert_eq!(s.inode, inode_of(&server));
        }
        drop(client);
    }

    /// A socket bound to an interface escapes the exact query (no interface given); the
    /// filtered dump finds it.
    #[test]
    fn lookup_socket_bound_to_device() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let dev = b"lo\0";
        // SAFETY: a valid descriptor and a NUL-terminated name of the given length.
        let rc = unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                dev.as_ptr().cast(),
                dev.len() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        let (_client, server) = pair(&listener);
        let (local, remote) = ends(&server);
        let mut diag = Diag::open().unwrap();
        assert_eq!(diag.exact(local, remote).unwrap(), None);
        let s = lookup(local, remote)
            .unwrap()
            .expect("found by the filtered dump");
        assert_eq!(s.inode, inode_of(&server));
    }

    #[test]
    fn owners_of_our_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (client, _server) = pair(&listener);
        let inode = inode_of(&client);
        let dup = client.try_clone().unwrap();
        let map = owners(&HashSet::from([inode, inode_of(&listener), 1])).unwrap();
        let comm = fs::read_to_string("/proc/self/comm").unwrap();
        let me = Owner {
            pid: std::process::id(),
            comm: comm.trim_end().to_owned(),
        };
        // Two descriptors, one owner.
        assert_eq!(map.get(&inode), Some(&vec![me.clone()]));
        assert_eq!(map.get(&inode_of(&listener)), Some(&vec![me]));
        assert!(!map.contains_key(&1));
        drop(dup);
        let index = ProcessIndex::scan(&HashSet::from([inode])).unwrap();
        // Unprivileged, other users' processes are refused: at least ours was read.
        assert!(index.processes >= 1 && index.fds > 3);
        assert_eq!(index.owners_of(inode).len(), 1);
        assert!(index.owners_of(1).is_empty());
        assert!(ProcessIndex::scan(&HashSet::new()).unwrap().fds == 0);
    }

    #[test]
    fn socket_inode_parsing() {
        assert_eq!(socket_inode(b"socket:[12345]"), Some(12345));
        assert_eq!(socket_inode(b"pipe:[12345]"), None);
        assert_eq!(socket_inode(b"socket:[]"), None);
        assert_eq!(socket_inode(b"/dev/null"), None);
    }

    #[test]
    fn decode_rejects_short_and_skips_unknown() {
        assert!(decode(&[0; MSG_LEN - 1], 1).is_err());
        let mut msg = [0u8; MSG_LEN];
        msg[0] = 1; // AF_UNIX
        msg[1] = 1;
        assert_eq!(decode(&msg, 1).unwrap(), None);
        msg[0] = AF_INET;
        msg[1] = 13; // TCP_BOUND_INACTIVE
        assert_eq!(decode(&msg, 1).unwrap(), None);
        msg[1] = 8;
        // A truncated attribute is ignored, not read past.
        let mut with_attr = msg.to_vec();
        with_attr.extend_from_slice(&[200, 0, 2, 0, 1, 2]);
        let s = decode(&with_attr, 1).unwrap().unwrap();
        assert_eq!(s.state, TcpState::CloseWait);
        assert_eq!(s.last_data_recv_ms, None);
    }
}
