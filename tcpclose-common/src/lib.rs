//! The ABI shared by tcpclose's kernel program and its loader, defined once.
//!
//! Everything here is plain data: the records the kernel programs write into the ring buffer, the
//! configuration the loader writes into the programs' read-only globals before loading them, the
//! names of the maps, and the layout of the tracepoint records the programs read.
#![no_std]

/// Ring buffer carrying [`TransitionEvent`]s, [`TimewaitEvent`]s and [`CauseEvent`]s from the
/// kernel to the loader. Every record starts with its [`record_kind`] byte.
pub const EVENTS_MAP: &str = "EVENTS";
/// Per-CPU `u64` counters, indexed by [`Counter`].
pub const COUNTERS_MAP: &str = "COUNTERS";
/// `u8` per port (65536 entries): which side of a socket a port must be on to pass the filter.
pub const PORT_FILTER_MAP: &str = "PORT_FILTER";
/// Hash of network namespace inodes (`u32` -> `u8`): with [`Config::netns_filter`], only sockets
/// in these namespaces pass.
pub const NETNS_FILTER_MAP: &str = "NETNS_FILTER";
/// Hash of cgroup ids (`u64` -> `u8`): with [`Config::cgroup_filter`], only sockets made in one
/// of these cgroup2 directories or below pass.
pub const CGROUP_FILTER_MAP: &str = "CGROUP_FILTER";
/// Entries of `NETNS_FILTER` and of `CGROUP_FILTER` each: how many `--netns` and `--cgroup`
/// a run takes.
pub const FILTER_ENTRIES: u32 = 256;
/// How many levels above a socket's cgroup the cgroup filter looks for one of its cgroups.
pub const CGROUP_FILTER_DEPTH: u32 = 32;
/// Name of the read-only global holding the [`Config`].
pub const CONFIG_GLOBAL: &str = "CONFIG";
/// Name of the tracepoint program in the object file.
pub const TRANSITION_PROGRAM: &str = "inet_sock_set_state";
/// Programs on the `timer:` tracepoints (raw) that follow timewait sockets:
/// `(program, tracepoint)`.
/// Names fit the kernel's 15 characters (BPF_OBJ_NAME_LEN), so that tools tell them apart.
pub const TIMER_PROGRAMS: [(&str, &str); 3] = [
    ("tw_timer_start", "timer_start"),
    ("tw_timer_expire", "timer_expire_entry"),
    ("tw_timer_cancel", "timer_cancel"),
];

/// The typed (BTF) transition program: `tp_btf` on [`TRANSITION_TRACEPOINT`].
pub const TYPED_TRANSITION_PROGRAM: &str = "btf_set_state";
/// The typed programs that follow timewait sockets: fentry on the timewait socket's own
/// functions, `(program, kernel function)`: arming and re-arming (`__inet_twsk_schedule`, since
/// Linux 4.3), an early end (`inet_twsk_deschedule_put`, 4.3), the timer's expiry
/// (`tw_timer_handler`, 2.6.x). Each is the same role as a [`TIMER_PROGRAMS`] entry: a
/// [`timer_action`] START, CANCEL and EXPIRE.
pub const TYPED_TIMEWAIT_PROGRAMS: [(&str, &str); 3] = [
    ("tw_schedule", "__inet_twsk_schedule"),
    ("tw_deschedule", "inet_twsk_deschedule_put"),
    ("tw_expire", "tw_timer_handler"),
];

/// Programs on the `tcp:` tracepoints that explain how a teardown went (a reset, a retransmitted
/// FIN), raw: `(program, tracepoint, cause)`. Each writes a [`CauseEvent`].
pub const CAUSE_PROGRAMS: [(&str, &str, u8); 3] = [
    ("tcp_send_reset", "tcp_send_reset", cause::RESET_SENT),
    ("tcp_recv_reset", "tcp_receive_reset", cause::RESET_RECEIVED),
    (
        "tcp_retransmit",
        "tcp_retransmit_skb",
        cause::FIN_RETRANSMIT,
    ),
];

/// The same, typed (`tp_btf` on the same tracepoints): `(program, tracepoint, cause)`.
pub const TYPED_CAUSE_PROGRAMS: [(&str, &str, u8); 3] = [
    ("btf_send_reset", "tcp_send_reset", cause::RESET_SENT),
    ("btf_recv_reset", "tcp_receive_reset", cause::RESET_RECEIVED),
    (
        "btf_retransmit",
        "tcp_retransmit_skb",
        cause::FIN_RETRANSMIT,
    ),
];

/// Default ring buffer size (bytes). At ~250k transitions/s (10 per connection at 25k
/// connections/s) 96-byte records fill 2.4 MB per 100 ms; 8 MiB leaves room for a consumer that
/// is descheduled for a few hundred milliseconds.
pub const DEFAULT_RING_BYTES: u32 = 8 << 20;

/// Bytes of output lines the loader lets wait for its writer thread at most, when standard
/// output is slow: what memory that queue can take (the soak's RSS ceiling counts it).
pub const OUTPUT_QUEUE_BYTES: usize = 16 << 20;

/// `PORT_FILTER` value bit: the port passes when it is the socket's local port.
pub const PORT_LOCAL: u8 = 1;
/// `PORT_FILTER` value bit: the port passes when it is the socket's remote port.
pub const PORT_REMOTE: u8 = 2;
/// Number of entries of `PORT_FILTER` (one per port).
pub const PORT_FILTER_ENTRIES: u32 = 1 << 16;

/// `AF_INET` and `AF_INET6` as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
/// `IPPROTO_TCP`; the tracepoint also fires for SCTP and MPTCP sockets.
pub const IPPROTO_TCP: u16 = 6;

/// TCP states as the kernel numbers them (`include/net/tcp_states.h`): in the tracepoint's
/// arguments, in a timewait socket's `tw_substate`, in sock_diag and `/proc/net/tcp`.
pub mod tcp_state {
    pub const ESTABLISHED: i32 = 1;
    pub const SYN_SENT: i32 = 2;
    pub const SYN_RECV: i32 = 3;
    pub const FIN_WAIT1: i32 = 4;
    pub const FIN_WAIT2: i32 = 5;
    pub const TIME_WAIT: i32 = 6;
    pub const CLOSE: i32 = 7;
    pub const CLOSE_WAIT: i32 = 8;
    pub const LAST_ACK: i32 = 9;
    pub const LISTEN: i32 = 10;
    pub const CLOSING: i32 = 11;
    pub const NEW_SYN_RECV: i32 = 12;
}

/// Whether a system call on the socket made the state change `old -> new` (`TCP_*` numbers,
/// include/net/tcp_states.h), so that the current task is the socket's owner. The others are
/// driven by an arriving segment (softirq, on the stack of whichever task was running) or a
/// timer. The kernel program fetches the task's name only for these.
/// - `CLOSE -> SYN_SENT`: `connect()` (`tcp_v4_connect`/`tcp_v6_connect`).
/// - `CLOSE -> LISTEN`: `listen()` (`inet_csk_listen_start`).
/// - `LISTEN -> CLOSE`: `close()`/`shutdown()` of a listener (`tcp_close`, `tcp_disconnect`).
/// - `ESTABLISHED -> FIN_WAIT1`, `CLOSE_WAIT -> LAST_ACK`: `close()`/`shutdown()`
///   (`tcp_close_state` via `tcp_close` or `tcp_shutdown`).
#[inline(always)]
pub fn made_by_syscall(old: i32, new: i32) -> bool {
    use tcp_state::*;
    matches!(
        (old, new),
        (CLOSE, SYN_SENT)
            | (CLOSE, LISTEN)
            | (LISTEN, CLOSE)
            | (ESTABLISHED, FIN_WAIT1)
            | (CLOSE_WAIT, LAST_ACK)
    )
}

/// Indexes into the per-CPU `COUNTERS` map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// TCP transitions that passed the filters (each one is either delivered or lost).
    Matched = 0,
    /// Transitions that found the ring buffer full and were dropped.
    Lost = 1,
    /// Timewait timer events that passed the filters.
    TimewaitMatched = 2,
    /// Timewait timer events dropped because the ring buffer was full.
    TimewaitLost = 3,
    /// Resets and FIN retransmissions of full sockets that passed the filters.
    CauseMatched = 4,
    /// Of those, the ones dropped because the ring buffer was full.
    CauseLost = 5,
}

/// Number of entries of the `COUNTERS` map.
pub const COUNTER_ENTRIES: u32 = 6;

/// First byte of every ring buffer record: which struct follows.
pub mod record_kind {
    /// A [`super::TransitionEvent`].
    pub const TRANSITION: u8 = 1;
    /// A [`super::TimewaitEvent`].
    pub const TIMEWAIT: u8 = 2;
    /// A [`super::CauseEvent`].
    pub const CAUSE: u8 = 3;
}

/// [`CauseEvent::cause`]: what the kernel did to the socket.
pub mod cause {
    /// `tcp:tcp_send_reset`: the kernel sent an RST for the socket (tcp_send_active_reset() on
    /// close with unread data or `SO_LINGER` 0, tcp_v4_send_reset()/tcp_v6_send_reset() in
    /// answer to a segment).
    pub const RESET_SENT: u8 = 1;
    /// `tcp:tcp_receive_reset`: an RST from the peer was accepted (tcp_reset(), before
    /// tcp_done() closes the socket).
    pub const RESET_RECEIVED: u8 = 2;
    /// `tcp:tcp_retransmit_skb` in FIN_WAIT1, CLOSING or LAST_ACK: a segment retransmitted after
    /// the socket sent its FIN, which is unacknowledged in these states.
    pub const FIN_RETRANSMIT: u8 = 3;
}

/// [`CauseEvent::reason`] when the kernel gives none (before Linux 6.10, or not a reset sent).
pub const NO_REASON: u32 = u32::MAX;

/// [`TimewaitEvent::action`]: which timer tracepoint fired.
pub mod timer_action {
    /// `timer:timer_start`: the timer was queued (armed or moved to another wheel bucket).
    pub const START: u8 = 1;
    /// `timer:timer_expire_entry`: the timer fired.
    pub const EXPIRE: u8 = 2;
    /// `timer:timer_cancel`: the timer was taken off its wheel (deleted, moved, or about to
    /// fire: `expire_timers()` detaches a timer before it calls it).
    pub const CANCEL: u8 = 3;
}

/// Filters and delivery settings, written by the loader into the programs' read-only data before
/// they are loaded (so the verifier sees them as constants of this run).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Submit with `BPF_RB_FORCE_WAKEUP` once this many bytes wait in the ring; below it the
    /// program never wakes the consumer, which polls on a timer instead.
    pub wakeup_bytes: u64,
    /// Only this address family (`AF_INET`/`AF_INET6`); 0 for both.
    pub family: u16,
    /// Non-zero when `PORT_FILTER` is in force.
    pub port_filter: u8,
    /// Non-zero: the two transitions that end a handshake (`SYN_SENT -> ESTABLISHED` and
    /// `SYN_RECV -> ESTABLISHED`) are not delivered. No teardown record reads them; only the
    /// transition stream and the per-state metrics do.
    pub skip_established: u8,
    /// Non-zero when `NETNS_FILTER` is in force.
    pub netns_filter: u8,
    /// Non-zero when `CGROUP_FILTER` is in force.
    pub cgroup_filter: u8,
    pub _pad: [u8; 2],
    /// Where the programs find the sockets' fields; `tw_timer_handler == 0` when timewait
    /// sockets are not followed.
    pub layout: SocketLayout,
}

const _: () = assert!(core::mem::size_of::<Config>() == 56);

/// The running kernel's layout of what the programs read, from its BTF at start-up: full sockets
/// (`struct sock`) for the transition program, timewait sockets and their timer for the timer
/// programs. Both kinds of socket start with a `struct sock_common`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketLayout {
    /// Address of `tw_timer_handler`, the function of every timewait socket's timer; 0 when
    /// timewait sockets are not followed.
    pub tw_timer_handler: u64,
    /// `offsetof(struct timer_list, function)`.
    pub timer_function: u16,
    /// `offsetof(struct timer_list, expires)`.
    pub timer_expires: u16,
    /// `offsetof(struct inet_timewait_sock, tw_timer)`.
    pub tw_timer: u16,
    /// `offsetof(struct inet_timewait_sock, tw_substate)`.
    pub tw_substate: u16,
    /// `offsetof(struct sock_common, skc_daddr)`: the start of the [`sock_common`] block.
    pub skc_daddr: u16,
    /// `offsetof(struct sock_common, skc_v6_daddr)`: the start of the IPv6 addresses.
    pub skc_v6_daddr: u16,
    /// `offsetof(struct sock, sk_protocol)`.
    pub sk_protocol: u16,
    /// `offsetof(struct inet_sock, inet_sport)`: a full socket's local port (network order).
    /// Its `skc_num` is no good: tcp_set_state() releases the port (inet_put_port() zeroes it)
    /// before it reports `-> CLOSE`.
    pub inet_sport: u16,
    /// `offsetof(struct sock_common, skc_net)`: the socket's `struct net *` (`possible_net_t`).
    pub skc_net: u16,
    /// `offsetof(struct net, ns) + offsetof(struct ns_common, inum)`: the namespace's inode
    /// number, as `stat -L /proc/PID/ns/net` shows it. 0 when the placement is not read.
    pub net_ns_inum: u16,
    /// `offsetof(struct sock, sk_cgrp_data)` plus that of its cgroup pointer: the cgroup2 cgroup
    /// of the task that made the socket (`cgroup_sk_alloc()`, at `socket()` and, for an accepted
    /// socket, copied from its listener by `sk_clone_lock()`).
    pub sk_cgroup: u16,
    /// `offsetof(struct cgroup, kn)`.
    pub cgroup_kn: u16,
    /// `offsetof(struct kernfs_node, id)`: the cgroup's id, its directory's inode number.
    pub kernfs_id: u16,
    /// `offsetof(struct kernfs_node, parent)` (`__parent` since 6.15).
    pub kernfs_parent: u16,
    /// Non-zero before Linux 5.15, when `sock_cgroup_data` is a tagged word: a value with
    /// either low bit set is not a pointer and stands for the root cgroup
    /// (`sock_cgroup_ptr()`).
    pub cgroup_tagged: u8,
    /// Non-zero when `tcp:tcp_send_reset` passes an `enum sk_rst_reason` third (Linux 6.10+).
    pub rst_reason: u8,
    /// Non-zero when `tcp:tcp_retransmit_skb` passes the transmission's `int err` third
    /// (Linux 6.14+): the tracepoint then fires for transmissions that failed too.
    pub retransmit_err: u8,
    pub _pad: u8,
}

const _: () = assert!(core::mem::size_of::<SocketLayout>() == 40);

/// What the programs read of a `struct sock_common` (the start of full and timewait sockets
/// alike), in two reads: the 4-tuple and family from `skc_daddr` on, and the IPv6 addresses from
/// `skc_v6_daddr` on. Offsets are relative to the start of each; the loader checks them against
/// the kernel's BTF (they have not moved since Linux 4.x: `skc_addrpair`, `skc_hash`,
/// `skc_portpair`, `skc_family`).
pub mod sock_common {
    /// Bytes read from `skc_daddr`.
    pub const BLOCK: usize = 20;
    /// `skc_daddr`, the remote IPv4 address (network order).
    pub const DADDR: usize = 0;
    /// `skc_rcv_saddr`, the local IPv4 address (network order).
    pub const RCV_SADDR: usize = 4;
    /// `skc_dport`, the remote port (network order).
    pub const DPORT: usize = 12;
    /// `skc_num`, the local port (host order).
    pub const NUM: usize = 14;
    /// `skc_family`.
    pub const FAMILY: usize = 16;
    /// `skc_state`, a byte.
    pub const STATE: usize = 18;
    /// Bytes read from `skc_v6_daddr`.
    pub const V6_BLOCK: usize = 32;
    /// `skc_v6_rcv_saddr`, after `skc_v6_daddr`.
    pub const V6_RCV_SADDR: usize = 16;
}

/// One TCP state change, as the kernel program writes it into the ring buffer.
///
/// Addresses are in network byte order; an IPv4 address occupies the first 4 bytes and the rest
/// are zero. Ports are in host byte order (the tracepoint converts them). States are the
/// kernel's `TCP_*` numbers, unchecked: the loader converts them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransitionEvent {
    /// [`record_kind::TRANSITION`].
    pub kind: u8,
    pub _pad: u8,
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC, nanoseconds.
    pub ts_ns: u64,
    /// Kernel address of the `struct sock`: the socket's identity while it lives.
    pub skaddr: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Thread id of the current task (the kernel's `pid`).
    pub tid: u32,
    /// Process id of the current task (the kernel's `tgid`).
    pub tgid: u32,
    pub oldstate: i32,
    pub newstate: i32,
    /// `comm` of the current task, NUL-padded.
    pub comm: [u8; 16],
    /// Id of the socket's cgroup2 cgroup (its directory's inode number); 0 when unknown.
    pub cgroup: u64,
    /// Inode number of the socket's network namespace; 0 when unknown.
    pub netns: u32,
    pub _pad2: u32,
}

/// Size of one event in the ring buffer (the ring adds an 8-byte header per record).
pub const TRANSITION_EVENT_SIZE: usize = 104;
const _: () = assert!(core::mem::size_of::<TransitionEvent>() == TRANSITION_EVENT_SIZE);
const _: () = assert!(core::mem::align_of::<TransitionEvent>() == 8);

/// One event of a timewait socket's timer, as the timer programs write it into the ring buffer.
/// Addresses and ports as in [`TransitionEvent`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimewaitEvent {
    /// [`record_kind::TIMEWAIT`].
    pub kind: u8,
    /// A [`timer_action`] value.
    pub action: u8,
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    /// `tw_substate`: `TCP_FIN_WAIT2` or `TCP_TIME_WAIT`.
    pub substate: u8,
    pub _pad: [u8; 3],
    /// Inode number of the timewait socket's network namespace; 0 when unknown.
    pub netns: u32,
    /// `bpf_ktime_get_ns()`, as in [`TransitionEvent`].
    pub ts_ns: u64,
    /// `jiffies` at `ts_ns` (`bpf_jiffies64()`): anchors `expires` to `ts_ns`.
    pub jiffies: u64,
    /// Kernel address of the `struct inet_timewait_sock`.
    pub twaddr: u64,
    /// `timer_list.expires`, in jiffies.
    pub expires: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

pub const TIMEWAIT_EVENT_SIZE: usize = 80;
const _: () = assert!(core::mem::size_of::<TimewaitEvent>() == TIMEWAIT_EVENT_SIZE);
const _: () = assert!(core::mem::align_of::<TimewaitEvent>() == 8);

/// A reset or FIN retransmission of a full socket, as the cause programs write it into the ring
/// buffer. The loader matches it to the socket's life by address: the socket was filtered like its
/// transitions, in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CauseEvent {
    /// [`record_kind::CAUSE`].
    pub kind: u8,
    /// A [`cause`] value.
    pub cause: u8,
    /// `skc_state` when it happened (a `TCP_*` number).
    pub state: u8,
    pub _pad: u8,
    /// The `enum sk_rst_reason` value of a reset sent, [`NO_REASON`] otherwise.
    pub reason: u32,
    /// `bpf_ktime_get_ns()`, as in [`TransitionEvent`].
    pub ts_ns: u64,
    /// Kernel address of the `struct sock`.
    pub skaddr: u64,
}

pub const CAUSE_EVENT_SIZE: usize = 24;
const _: () = assert!(core::mem::size_of::<CauseEvent>() == CAUSE_EVENT_SIZE);
const _: () = assert!(core::mem::align_of::<CauseEvent>() == 8);

/// Ring buffer records as bytes and back, for [`aya::Pod`] types only: `repr(C)`, every byte
/// a field (no implicit padding to expose), every bit pattern a valid value.
#[cfg(feature = "user")]
pub mod record_bytes {
    /// The bytes of `record`, as the kernel programs write them into the ring buffer.
    pub fn of<T: aya::Pod>(record: &T) -> &[u8] {
        // SAFETY: `T: Pod` has no padding and no invalid bit pattern; the slice borrows
        // `record` for its whole size.
        unsafe {
            core::slice::from_raw_parts(
                (record as *const T).cast::<u8>(),
                core::mem::size_of::<T>(),
            )
        }
    }

    /// The record in `bytes`, or `None` when they are not exactly one record long.
    pub fn read<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
        if bytes.len() != core::mem::size_of::<T>() {
            return None;
        }
        // SAFETY: the length is checked above; every bit pattern is a valid `T: Pod`;
        // `read_unaligned` makes no alignment assumption.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `repr(C)`, made of integers and byte arrays, every padding byte an explicit
    // field; every bit pattern is a valid value. The same holds for the two records below.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TransitionEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TimewaitEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CauseEvent {}
}

/// What a kernel program reads from one argument of its raw tracepoint. Raw tracepoint programs
/// receive the tracepoint's arguments as 64-bit words, and the loader checks each one it reads
/// against the kernel's own description of the tracepoint: the BTF typedef
/// `btf_trace_<tracepoint>`, a pointer to a function whose first parameter is the `void *`
/// context and the rest are the tracepoint's arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TracepointArg {
    /// A pointer to `struct <name>` (qualifiers such as `const` do not matter).
    PointerTo(&'static str),
    /// A signed integer of this many bytes.
    Int(u32),
}

/// `sock:inet_sock_set_state`, which the transition program attaches to: it reads
/// `(const struct sock *sk, int oldstate, int newstate)` (`include/trace/events/sock.h`).
pub const TRANSITION_TRACEPOINT: &str = "inet_sock_set_state";
/// The arguments the transition program reads, in order.
pub const TRANSITION_ARGS: [TracepointArg; 3] = [
    TracepointArg::PointerTo("sock"),
    TracepointArg::Int(4),
    TracepointArg::Int(4),
];

/// The arguments the timer programs read from their `timer:` tracepoints: the
/// `struct timer_list *` first, in all three (`include/trace/events/timer.h`). The arguments
/// after it changed between kernels (`timer_start`'s `(timer, expires, flags)` became
/// `(timer, bucket_expiry)` in 6.8) and are not read.
pub const TIMER_ARGS: [TracepointArg; 1] = [TracepointArg::PointerTo("timer_list")];

/// The argument the cause programs read first from their `tcp:` tracepoints: the socket
/// (`include/trace/events/tcp.h`). What follows it differs between them and between kernels (an
/// `enum sk_rst_reason` third in tcp_send_reset since 6.10, an `int err` third in
/// tcp_retransmit_skb since 6.14): the loader looks for those by themselves.
pub const CAUSE_ARGS: [TracepointArg; 1] = [TracepointArg::PointerTo("sock")];
