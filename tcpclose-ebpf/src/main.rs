//! tcpclose's kernel programs, in two sets the loader chooses between (`--programs`).
//!
//! Raw: one on the `sock:inet_sock_set_state` tracepoint, three on the `timer:` tracepoints
//! that follow timewait sockets, whose only visible activity is their timer, and three on the
//! `tcp:` tracepoints that explain a teardown (a reset sent or received, a FIN retransmitted).
//! Raw tracepoints load on every kernel tcpclose supports: the kernel calls them with the
//! tracepoint's arguments instead of first building a trace record (`perf_trace_*()`, then
//! `trace_call_bpf()`), and they read what they need from the socket themselves, at offsets the
//! loader takes from the kernel's BTF.
//!
//! Typed (BTF): the same transition and cause programs as `tp_btf` programs, and fentry programs
//! on the timewait socket's own functions (armed and re-armed: `__inet_twsk_schedule()`; killed:
//! `inet_twsk_deschedule_put()`; expired: `tw_timer_handler()`), which run for timewait sockets
//! only, where the timer programs see every timer of the kernel, and see every re-arm with its
//! exact time. They read the socket through its typed pointer with plain loads ([`Typed`]) where
//! the raw set calls bpf_probe_read_kernel() ([`Probed`]). Kernels without BPF trampolines (or
//! that refuse tracing programs) get the raw set.
//!
//! Per event each does the least it can: filter (timer function, protocol, family, ports),
//! count, reserve a ring buffer record, fill it, submit it without waking the consumer. What it
//! cannot deliver it counts. Everything else happens in userspace.
#![no_std]
#![no_main]

use core::ptr::addr_of_mut;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_jiffies64, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::bpf_get_current_comm as bpf_get_current_comm_into,
    },
    macros::{btf_tracepoint, fentry, map, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, FEntryContext, RawTracePointContext},
};
use aya_log_ebpf::debug;
use tcpclose_common::{
    AF_INET, AF_INET6, CGROUP_FILTER_DEPTH, COUNTER_ENTRIES, CauseEvent, Config, Counter,
    DEFAULT_RING_BYTES, FILTER_ENTRIES, IPPROTO_TCP, NO_REASON, PORT_FILTER_ENTRIES, PORT_LOCAL,
    PORT_REMOTE, SocketLayout, TimewaitEvent, TransitionEvent, cause, made_by_syscall, record_kind,
    sock_common as skc, timer_action,
};

// The maps are named after their statics (`EVENTS_MAP`, `COUNTERS_MAP`, `PORT_FILTER_MAP`,
// `NETNS_FILTER_MAP` and `CGROUP_FILTER_MAP` in tcpclose-common, which the loader looks up; a test of the loader checks the built object).

/// Resized by the loader (`EbpfLoader::set_max_entries`) before loading.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_ENTRIES, 0);

#[map]
static PORT_FILTER: Array<u8> = Array::with_max_entries(PORT_FILTER_ENTRIES, 0);

#[map]
static NETNS_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(FILTER_ENTRIES, 0);

#[map]
static CGROUP_FILTER: HashMap<u64, u8> = HashMap::with_max_entries(FILTER_ENTRIES, 0);

/// Set by the loader before loading; lives in .rodata, so the verifier treats it as constant.
#[unsafe(no_mangle)]
static CONFIG: Config = Config {
    wakeup_bytes: 256 << 10,
    family: 0,
    port_filter: 0,
    skip_established: 0,
    netns_filter: 0,
    cgroup_filter: 0,
    _pad: [0; 2],
    layout: SocketLayout {
        tw_timer_handler: 0,
        timer_function: 0,
        timer_expires: 0,
        tw_timer: 0,
        tw_substate: 0,
        skc_daddr: 0,
        skc_v6_daddr: 0,
        sk_protocol: 0,
        inet_sport: 0,
        skc_net: 0,
        net_ns_inum: 0,
        sk_cgroup: 0,
        cgroup_kn: 0,
        kernfs_id: 0,
        kernfs_parent: 0,
        cgroup_tagged: 0,
        rst_reason: 0,
        retransmit_err: 0,
        _pad: 0,
    },
};

/// Reads the configuration; volatile so the compiler does not fold the default value in.
#[inline(always)]
fn config() -> Config {
    // SAFETY: plain read of a global the loader initialised.
    unsafe { core::ptr::read_volatile(&CONFIG) }
}

/// One field of the socket layout, read from the read-only data where it is used. The verifier
/// knows a value loaded from a frozen read-only map at a constant offset as a constant
/// (bpf_map_direct_read()), which a typed program's direct loads need: it checks `sk + offset`
/// against the socket's BTF type, and refuses a variable offset. A copy of the whole
/// configuration goes through the stack in pieces, where the verifier loses the constants.
macro_rules! layout {
    ($field:ident) => {
        // SAFETY: plain read of a global the loader initialised.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!(CONFIG.layout.$field)) }
    };
}

/// The offset `layout!($field)` as an address increment.
macro_rules! offset {
    ($field:ident) => {
        u64::from(layout!($field))
    };
}

/// How a program reads kernel memory.
trait Memory {
    /// Reads a `T` at `addr`; `None` when it cannot be read.
    fn read<T: Copy>(addr: u64) -> Option<T>;
    /// Reads the [`Ends`] of the socket at `sk` (full or timewait).
    fn ends(sk: u64) -> Option<Ends>;
    /// Reads `skc_v6_daddr` and `skc_v6_rcv_saddr`, from `addr`, the first.
    fn v6(addr: u64) -> Option<[u64; skc::V6_BLOCK / 8]>;
}

/// Raw tracepoints get plain numbers: every read goes through bpf_probe_read_kernel(), which
/// checks the address and fails instead of faulting.
struct Probed;

impl Memory for Probed {
    #[inline(always)]
    fn read<T: Copy>(addr: u64) -> Option<T> {
        read_kernel(addr)
    }

    /// One read for the whole block: a helper call costs more than the bytes it copies.
    #[inline(always)]
    fn ends(sk: u64) -> Option<Ends> {
        let block = read_kernel::<[u32; skc::BLOCK / 4]>(sk + offset!(skc_daddr))?;
        let word = |offset: usize| block[offset / 4];
        let half = |offset: usize| (word(offset) >> (8 * (offset % 4))) as u16;
        Some(Ends {
            family: half(skc::FAMILY),
            sport: half(skc::NUM),
            dport: u16::from_be(half(skc::DPORT)),
            saddr: word(skc::RCV_SADDR),
            daddr: word(skc::DADDR),
        })
    }

    #[inline(always)]
    fn v6(addr: u64) -> Option<[u64; skc::V6_BLOCK / 8]> {
        read_kernel(addr)
    }
}

/// Typed programs get pointers the verifier knows the BTF type of, and load from them directly:
/// each load is checked against the type (it must fall within one member: btf_struct_access()),
/// compiled as a plain load, and a fault reads zero instead of crashing (BPF_PROBE_MEM, through
/// the exception table). No helper call.
struct Typed;

impl Memory for Typed {
    #[inline(always)]
    fn read<T: Copy>(addr: u64) -> Option<T> {
        // SAFETY: the verifier checked the access against the pointer's BTF type, and the
        // kernel turns a fault into a zero.
        Some(unsafe { core::ptr::read_volatile(addr as *const T) })
    }

    /// Member by member: `skc_addrpair` (both IPv4 addresses), `skc_portpair` (both ports),
    /// `skc_family`; a load across two members is refused.
    #[inline(always)]
    fn ends(sk: u64) -> Option<Ends> {
        let base = sk + offset!(skc_daddr);
        let addresses = Self::read::<u64>(base + skc::DADDR as u64)?;
        let ports = Self::read::<u32>(base + skc::DPORT as u64)?;
        let family = Self::read::<u16>(base + skc::FAMILY as u64)?;
        Some(Ends {
            family,
            sport: (ports >> (8 * (skc::NUM - skc::DPORT))) as u16,
            dport: u16::from_be(ports as u16),
            saddr: (addresses >> (8 * (skc::RCV_SADDR - skc::DADDR))) as u32,
            daddr: addresses as u32,
        })
    }

    /// Eight bytes at a time, within each `struct in6_addr`.
    #[inline(always)]
    fn v6(addr: u64) -> Option<[u64; skc::V6_BLOCK / 8]> {
        Some([
            Self::read(addr)?,
            Self::read(addr + 8)?,
            Self::read(addr + 16)?,
            Self::read(addr + 24)?,
        ])
    }
}

/// `inet_sock_set_state(const struct sock *sk, int oldstate, int newstate)`.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: RawTracePointContext) -> u32 {
    on_transition::<_, Probed>(
        &ctx,
        ctx.arg::<u64>(0),
        ctx.arg::<u64>(1) as i32,
        ctx.arg::<u64>(2) as i32,
    );
    0
}

/// The same tracepoint, typed: the kernel checks the arguments against the tracepoint's BTF.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn btf_set_state(ctx: BtfTracePointContext) -> u32 {
    on_transition::<_, Typed>(
        &ctx,
        ctx.arg::<u64>(0),
        ctx.arg::<u64>(1) as i32,
        ctx.arg::<u64>(2) as i32,
    );
    0
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(value) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, and tracepoint programs do not nest on one CPU.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
fn port_matches(port: u16, side: u8) -> bool {
    match PORT_FILTER.get(u32::from(port)) {
        Some(sides) => sides & side != 0,
        None => false,
    }
}

#[inline(always)]
fn ports_pass(config: &Config, sport: u16, dport: u16) -> bool {
    config.port_filter == 0 || port_matches(sport, PORT_LOCAL) || port_matches(dport, PORT_REMOTE)
}

/// The 4-tuple and family of a socket, read from its `struct sock_common`.
struct Ends {
    family: u16,
    /// Local port, host order (`skc_num`).
    sport: u16,
    /// Remote port, host order.
    dport: u16,
    /// IPv4 addresses, network order.
    saddr: u32,
    daddr: u32,
}

/// The local and remote addresses as the records carry them: an IPv4 address in the first 4
/// bytes, IPv6 addresses read from `skc_v6_*`.
#[inline(always)]
fn addresses<M: Memory>(sk: u64, ends: &Ends) -> ([u8; 16], [u8; 16]) {
    if ends.family == AF_INET6 {
        let v6 = M::v6(sk + offset!(skc_v6_daddr)).unwrap_or_default();
        const SADDR: usize = skc::V6_RCV_SADDR / 8;
        (words64([v6[SADDR], v6[SADDR + 1]]), words64([v6[0], v6[1]]))
    } else {
        (
            words32([ends.saddr, 0, 0, 0]),
            words32([ends.daddr, 0, 0, 0]),
        )
    }
}

/// Inode number of the network namespace of the socket at `sk` (full or timewait: both start
/// with a `struct sock_common`): `sk->__sk_common.skc_net.net->ns.inum`. 0 when not read.
#[inline(always)]
fn netns_of<M: Memory>(sk: u64) -> u32 {
    if layout!(net_ns_inum) == 0 {
        return 0;
    }
    M::read::<u64>(sk + offset!(skc_net))
        .and_then(|net| M::read::<u32>(net + offset!(net_ns_inum)))
        .unwrap_or(0)
}

/// The `struct kernfs_node *` of the cgroup2 cgroup of the full socket at `sk`, from
/// `sk->sk_cgrp_data` (set by cgroup_sk_alloc() when the socket was made; an accepted socket
/// gets its listener's in sk_clone_lock()). 0 when not read.
#[inline(always)]
fn cgroup_node<M: Memory>(sk: u64) -> u64 {
    if layout!(cgroup_kn) == 0 {
        return 0;
    }
    if layout!(cgroup_tagged) != 0 {
        // Before 5.15 the word is tagged: low bits set (a net_cls/net_prio value) or 0 mean
        // the root cgroup (sock_cgroup_ptr()), whose id the loader knows: reported as 1. The
        // word is a number for the verifier (`u64 val`), read probed in both sets.
        return match Probed::read::<u64>(sk + offset!(sk_cgroup)) {
            None => 0,
            Some(word) if word == 0 || word & 3 != 0 => ROOT_CGROUP_NODE,
            Some(cgroup) => Probed::read::<u64>(cgroup + offset!(cgroup_kn)).unwrap_or(0),
        };
    }
    match M::read::<u64>(sk + offset!(sk_cgroup)) {
        None => 0,
        // Not set (cgroup_sk_alloc() found no cgroup2 cgroup to charge): the root cgroup.
        Some(0) => ROOT_CGROUP_NODE,
        Some(cgroup) => M::read::<u64>(cgroup + offset!(cgroup_kn)).unwrap_or(0),
    }
}

/// Stands for the root cgroup's kernfs node where the socket holds no pointer to it.
const ROOT_CGROUP_NODE: u64 = 1;
/// The root cgroup2 directory's id (`kernfs_node.id` of the hierarchy's root).
const ROOT_CGROUP_ID: u64 = 1;

/// The id of the cgroup whose kernfs node is `node`; 0 when unknown.
#[inline(always)]
fn cgroup_id<M: Memory>(node: u64) -> u64 {
    match node {
        0 => 0,
        ROOT_CGROUP_NODE => ROOT_CGROUP_ID,
        node => M::read::<u64>(node + offset!(kernfs_id)).unwrap_or(0),
    }
}

/// Whether the cgroup at kernfs node `node` (id `id`), or one of the cgroups above it, is in
/// `CGROUP_FILTER`. Walks `kernfs_node.parent` up to [`CGROUP_FILTER_DEPTH`] levels.
#[inline(always)]
fn cgroup_passes<M: Memory>(mut node: u64, id: u64) -> bool {
    if id == 0 {
        return false;
    }
    if CGROUP_FILTER.get_ptr(id).is_some() {
        return true;
    }
    if node == ROOT_CGROUP_NODE {
        return false;
    }
    for _ in 0..CGROUP_FILTER_DEPTH {
        node = match M::read::<u64>(node + offset!(kernfs_parent)) {
            Some(parent) if parent != 0 => parent,
            _ => return false,
        };
        let Some(id) = M::read::<u64>(node + offset!(kernfs_id)) else {
            return false;
        };
        if CGROUP_FILTER.get_ptr(id).is_some() {
            return true;
        }
    }
    false
}

#[inline(always)]
fn netns_passes(config: &Config, netns: u32) -> bool {
    config.netns_filter == 0 || NETNS_FILTER.get_ptr(netns).is_some()
}

// Diagnostics (`debug!`) go through aya-log. The loader sets its level in the read-only data
// before loading (`AYA_LOG_LEVEL`): at its default, off, the verifier sees the level as a
// constant and removes the logging code, so it costs nothing per event.

#[inline(always)]
fn on_transition<C: EbpfContext, M: Memory>(ctx: &C, sk: u64, oldstate: i32, newstate: i32) {
    let config = config();
    // A handshake's end (tcp_finish_connect() for a client, tcp_rcv_state_process() for an
    // accepted child) is a fifth of all transitions and feeds no teardown record: when nothing
    // else reads it, it is dropped before anything is read from the socket.
    if config.skip_established != 0
        && newstate == TCP_ESTABLISHED
        && (oldstate == TCP_SYN_SENT || oldstate == TCP_SYN_RECV)
    {
        return;
    }
    // The tracepoint also fires for SCTP and MPTCP sockets.
    match M::read::<u16>(sk + offset!(sk_protocol)) {
        Some(IPPROTO_TCP) => {}
        Some(_) => return,
        None => {
            debug!(
                ctx,
                "cannot read the protocol of the socket at {:x}",
                scalar(sk)
            );
            return;
        }
    }
    let Some(mut ends) = M::ends(sk) else {
        debug!(
            ctx,
            "cannot read the addresses of the socket at {:x}",
            scalar(sk)
        );
        return;
    };
    if ends.family != AF_INET && ends.family != AF_INET6 {
        // Delivered anyway: the loader counts it undecodable.
        debug!(
            ctx,
            "socket at {:x}: unexpected family {}",
            scalar(sk),
            ends.family
        );
    }
    if !(TCP_ESTABLISHED..=TCP_NEW_SYN_RECV).contains(&oldstate)
        || !(TCP_ESTABLISHED..=TCP_NEW_SYN_RECV).contains(&newstate)
    {
        debug!(
            ctx,
            "socket at {:x}: unexpected state change {} -> {}",
            scalar(sk),
            oldstate,
            newstate
        );
    }
    if config.family != 0 && ends.family != config.family {
        return;
    }
    // At `-> CLOSE` the local port comes from inet_sock: tcp_set_state() has already released
    // the port (inet_put_port() zeroes `skc_num`) when it reports the change. At any other
    // change `skc_num` holds it: connect() sets both together (__inet_hash_connect()), a child
    // copies its listener's; both are 0 at `CLOSE -> SYN_SENT`, before a port is picked.
    // `struct inet_sock` lies beyond the `struct sock` a typed program's pointer is known as,
    // so this one read is probed in both sets.
    if newstate == TCP_CLOSE {
        ends.sport = u16::from_be(Probed::read::<u16>(sk + offset!(inet_sport)).unwrap_or(0));
    }
    if !ports_pass(&config, ends.sport, ends.dport) {
        return;
    }
    let netns = netns_of::<M>(sk);
    if !netns_passes(&config, netns) {
        return;
    }
    let node = cgroup_node::<M>(sk);
    let cgroup = cgroup_id::<M>(node);
    if config.cgroup_filter != 0 && !cgroup_passes::<M>(node, cgroup) {
        return;
    }
    count(Counter::Matched);

    let Some(mut entry) = EVENTS.reserve::<TransitionEvent>(0) else {
        count(Counter::Lost);
        return;
    };
    let (saddr, daddr) = addresses::<M>(sk, &ends);
    let pid_tgid = bpf_get_current_pid_tgid();
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points to the reserved record, which is written whole before submission;
    // fields are written in place, field by field, not built on the stack and copied.
    unsafe {
        // Field by field: a whole-struct write zeroes `comm` through a byte-wise memset loop.
        addr_of_mut!((*ev).kind).write(record_kind::TRANSITION);
        addr_of_mut!((*ev)._pad).write(0);
        addr_of_mut!((*ev).family).write(ends.family);
        addr_of_mut!((*ev).sport).write(ends.sport);
        addr_of_mut!((*ev).dport).write(ends.dport);
        addr_of_mut!((*ev).ts_ns).write(bpf_ktime_get_ns());
        addr_of_mut!((*ev).skaddr).write(sk);
        addr_of_mut!((*ev).saddr).write(saddr);
        addr_of_mut!((*ev).daddr).write(daddr);
        addr_of_mut!((*ev).tid).write(pid_tgid as u32);
        addr_of_mut!((*ev).tgid).write((pid_tgid >> 32) as u32);
        addr_of_mut!((*ev).oldstate).write(oldstate);
        addr_of_mut!((*ev).newstate).write(newstate);
        addr_of_mut!((*ev).cgroup).write(cgroup);
        addr_of_mut!((*ev).netns).write(netns);
        addr_of_mut!((*ev)._pad2).write(0);
        let comm = addr_of_mut!((*ev).comm);
        if made_by_syscall(oldstate, newstate) {
            bpf_get_current_comm_into(comm.cast(), COMM_LEN);
        } else {
            // 8-aligned in the record (see `TransitionEvent`): two stores, volatile so that
            // LLVM does not turn them into a call to a byte-wise memset.
            let words = comm.cast::<u64>();
            words.write_volatile(0);
            words.add(1).write_volatile(0);
        }
    }
    entry.submit(submit_flags(&config));
}

use tcpclose_common::tcp_state::{
    CLOSE as TCP_CLOSE, CLOSING as TCP_CLOSING, ESTABLISHED as TCP_ESTABLISHED,
    FIN_WAIT1 as TCP_FIN_WAIT1, LAST_ACK as TCP_LAST_ACK, NEW_SYN_RECV as TCP_NEW_SYN_RECV,
    SYN_RECV as TCP_SYN_RECV, SYN_SENT as TCP_SYN_SENT, TIME_WAIT as TCP_TIME_WAIT,
};

/// `TASK_COMM_LEN`.
const COMM_LEN: u32 = 16;

/// A wakeup per record costs the traced CPU an irq_work and an IPI; the consumer polls on a timer
/// instead, and is woken only when a backlog builds up.
#[inline(always)]
fn submit_flags(config: &Config) -> u64 {
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA.into()) >= config.wakeup_bytes {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    flags.into()
}

// Timewait sockets. When a connection reaches TIME_WAIT, or FIN_WAIT2 after the application
// closed it, tcp_time_wait() replaces the full socket by a `struct inet_timewait_sock` and the
// full socket reports `-> CLOSE`. The timewait socket never passes through
// inet_sock_set_state: its timer (function tw_timer_handler, armed by inet_twsk_schedule()) is
// all there is to see. These programs see every timer of the kernel and reject all others
// first, in as few instructions as possible.

// They are raw tracepoints: the kernel calls them with the tracepoint's arguments (the
// `struct timer_list *` first, in all three) instead of building a trace record first
// (perf_trace_timer_*, then trace_call_bpf), which every kernel timer would pay for.

#[raw_tracepoint(tracepoint = "timer_start")]
pub fn tw_timer_start(ctx: RawTracePointContext) -> u32 {
    on_timer(&ctx, ctx.arg::<u64>(0), timer_action::START);
    0
}

#[raw_tracepoint(tracepoint = "timer_expire_entry")]
pub fn tw_timer_expire(ctx: RawTracePointContext) -> u32 {
    on_timer(&ctx, ctx.arg::<u64>(0), timer_action::EXPIRE);
    0
}

#[raw_tracepoint(tracepoint = "timer_cancel")]
pub fn tw_timer_cancel(ctx: RawTracePointContext) -> u32 {
    on_timer(&ctx, ctx.arg::<u64>(0), timer_action::CANCEL);
    0
}

/// `address` as a plain number, for printing. In a typed program a socket's address is a typed
/// pointer for the verifier, which forbids the shifts that formatting it takes ("pointer
/// arithmetic with >>= operator prohibited"); copied through the stack by a helper it is a
/// scalar. Only the diagnostics call it: with them off, the verifier removes the call.
#[inline(always)]
fn scalar(address: u64) -> u64 {
    let on_stack = address;
    read_kernel::<u64>(core::ptr::addr_of!(on_stack) as u64).unwrap_or(0)
}

/// Reads kernel memory; `None` when it cannot be read.
#[inline(always)]
fn read_kernel<T: Copy>(addr: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel checks the address and fails instead of faulting.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

#[inline(always)]
fn on_timer(ctx: &RawTracePointContext, timer: u64, action: u8) {
    let config = config();
    let handler = layout!(tw_timer_handler);
    if handler == 0 {
        return;
    }
    if Probed::read::<u64>(timer + offset!(timer_function)) != Some(handler) {
        return;
    }
    let expires = Probed::read::<u64>(timer + offset!(timer_expires)).unwrap_or(0);
    on_timewait::<_, Probed>(ctx, &config, timer - offset!(tw_timer), action, expires);
}

// The typed set: fentry programs on the timewait socket's functions, called for timewait sockets
// only. Each arming and re-arming goes through __inet_twsk_schedule(tw, timeo, rearm)
// (tcp_time_wait() through inet_twsk_schedule(), tcp_timewait_state_process() on the peer's FIN
// through inet_twsk_reschedule()), which sets the timer to `jiffies + timeo`; every early end
// (a SYN or connect() reusing the 4-tuple, `ss -K`, the namespace's deletion) through
// inet_twsk_deschedule_put(); the timer's expiry calls tw_timer_handler().

/// `__inet_twsk_schedule(struct inet_timewait_sock *tw, int timeo, bool rearm)`.
#[fentry(function = "__inet_twsk_schedule")]
pub fn tw_schedule(ctx: FEntryContext) -> u32 {
    let config = config();
    // The timer will expire `timeo` jiffies from now (mod_timer(&tw->tw_timer, jiffies + timeo)).
    let timeo = ctx.arg::<u64>(1) as i32;
    // SAFETY: a helper without preconditions.
    let expires = unsafe { bpf_jiffies64() }.wrapping_add(timeo as i64 as u64);
    on_timewait::<_, Typed>(
        &ctx,
        &config,
        ctx.arg::<u64>(0),
        timer_action::START,
        expires,
    );
    0
}

/// `inet_twsk_deschedule_put(struct inet_timewait_sock *tw)`: the timewait socket is killed
/// before its timer expires (unless the timer is already running, which kills it itself).
#[fentry(function = "inet_twsk_deschedule_put")]
pub fn tw_deschedule(ctx: FEntryContext) -> u32 {
    let config = config();
    let tw = ctx.arg::<u64>(0);
    let expires = Typed::read::<u64>(tw + offset!(tw_timer) + offset!(timer_expires)).unwrap_or(0);
    on_timewait::<_, Typed>(&ctx, &config, tw, timer_action::CANCEL, expires);
    0
}

/// `tw_timer_handler(struct timer_list *t)`: the timewait socket's timer expired. The timer lies
/// within the timewait socket: the socket is reached by going back from it, which a typed
/// pointer cannot do (the verifier refuses a negative offset), so this one reads probed.
#[fentry(function = "tw_timer_handler")]
pub fn tw_expire(ctx: FEntryContext) -> u32 {
    let config = config();
    let timer = ctx.arg::<u64>(0);
    let expires = Probed::read::<u64>(timer + offset!(timer_expires)).unwrap_or(0);
    on_timewait::<_, Probed>(
        &ctx,
        &config,
        timer - offset!(tw_timer),
        timer_action::EXPIRE,
        expires,
    );
    0
}

/// Delivers one event of the timewait socket at `tw` whose timer expires at `expires`
/// (jiffies), if it passes the filters.
#[inline(always)]
fn on_timewait<C: EbpfContext, M: Memory>(
    ctx: &C,
    config: &Config,
    tw: u64,
    action: u8,
    expires: u64,
) {
    let Some(ends) = M::ends(tw) else {
        debug!(ctx, "cannot read the timewait socket at {:x}", scalar(tw));
        return;
    };
    if config.family != 0 && ends.family != config.family {
        return;
    }
    if !ports_pass(config, ends.sport, ends.dport) {
        return;
    }
    // A timewait socket has no cgroup (it is a `sock_common` only): the cgroup filter passes
    // it, and the loader keeps it only when it follows the full socket it came from.
    let netns = netns_of::<M>(tw);
    if !netns_passes(config, netns) {
        return;
    }
    count(Counter::TimewaitMatched);
    let Some(mut entry) = EVENTS.reserve::<TimewaitEvent>(0) else {
        count(Counter::TimewaitLost);
        return;
    };
    let (saddr, daddr) = addresses::<M>(tw, &ends);
    entry.write(TimewaitEvent {
        kind: record_kind::TIMEWAIT,
        action,
        family: ends.family,
        sport: ends.sport,
        dport: ends.dport,
        substate: M::read::<u8>(tw + offset!(tw_substate)).unwrap_or(0),
        _pad: [0; 3],
        netns,
        // SAFETY: helpers without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        jiffies: unsafe { bpf_jiffies64() },
        twaddr: tw,
        expires,
        saddr,
        daddr,
    });
    entry.submit(submit_flags(config));
}

// Causes: what explains a teardown that did not go by the book. The `tcp:` tracepoints fire
// rarely (a reset, a retransmission), so their cost at full churn is that of never firing.

/// `tcp_send_reset(const struct sock *sk, const struct sk_buff *skb)`, with
/// `enum sk_rst_reason reason` third since 6.10 (read only where the loader found it, a
/// read-only constant: on older kernels the verifier never sees the read).
#[raw_tracepoint(tracepoint = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: RawTracePointContext) -> u32 {
    let reason = if layout!(rst_reason) != 0 {
        ctx.arg::<u64>(2) as u32
    } else {
        NO_REASON
    };
    on_cause::<_, Probed>(&ctx, ctx.arg::<u64>(0), cause::RESET_SENT, reason);
    0
}

#[btf_tracepoint(function = "tcp_send_reset")]
pub fn btf_send_reset(ctx: BtfTracePointContext) -> u32 {
    let reason = if layout!(rst_reason) != 0 {
        ctx.arg::<u64>(2) as u32
    } else {
        NO_REASON
    };
    on_cause::<_, Typed>(&ctx, ctx.arg::<u64>(0), cause::RESET_SENT, reason);
    0
}

/// `tcp_receive_reset(struct sock *sk)`, from tcp_reset().
#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
pub fn tcp_recv_reset(ctx: RawTracePointContext) -> u32 {
    on_cause::<_, Probed>(&ctx, ctx.arg::<u64>(0), cause::RESET_RECEIVED, NO_REASON);
    0
}

#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn btf_recv_reset(ctx: BtfTracePointContext) -> u32 {
    on_cause::<_, Typed>(&ctx, ctx.arg::<u64>(0), cause::RESET_RECEIVED, NO_REASON);
    0
}

/// `tcp_retransmit_skb(const struct sock *sk, const struct sk_buff *skb)`, with `int err` third
/// since 6.14, when the tracepoint fires for failed transmissions too: only those that went out
/// count (before, it fired for those only).
#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn tcp_retransmit(ctx: RawTracePointContext) -> u32 {
    if layout!(retransmit_err) != 0 && ctx.arg::<u64>(2) as i32 != 0 {
        return 0;
    }
    on_cause::<_, Probed>(&ctx, ctx.arg::<u64>(0), cause::FIN_RETRANSMIT, NO_REASON);
    0
}

#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn btf_retransmit(ctx: BtfTracePointContext) -> u32 {
    if layout!(retransmit_err) != 0 && ctx.arg::<u64>(2) as i32 != 0 {
        return 0;
    }
    on_cause::<_, Typed>(&ctx, ctx.arg::<u64>(0), cause::FIN_RETRANSMIT, NO_REASON);
    0
}

/// Delivers one cause of the full socket at `sk`, if it passes the filters.
#[inline(always)]
fn on_cause<C: EbpfContext, M: Memory>(ctx: &C, sk: u64, what: u8, reason: u32) {
    // tcp_v4_send_reset() answers a segment that found no socket (NULL), or a timewait or
    // request socket: not a full socket, whose life tcpclose follows.
    if sk == 0 {
        return;
    }
    let Some(state) = M::read::<u8>(sk + offset!(skc_daddr) + skc::STATE as u64) else {
        return;
    };
    let state = i32::from(state);
    if what == cause::FIN_RETRANSMIT {
        // The state is read first: retransmissions of established connections are the
        // common case, and go no further.
        if state != TCP_FIN_WAIT1 && state != TCP_CLOSING && state != TCP_LAST_ACK {
            return;
        }
    } else if state == TCP_TIME_WAIT || state == TCP_NEW_SYN_RECV {
        return;
    }
    let config = config();
    let Some(mut ends) = M::ends(sk) else {
        debug!(
            ctx,
            "cannot read the addresses of the socket at {:x}",
            scalar(sk)
        );
        return;
    };
    if config.family != 0 && ends.family != config.family {
        return;
    }
    // A reset sent on close comes after `-> CLOSE`, which released the port (see
    // `on_transition`).
    if state == TCP_CLOSE {
        ends.sport = u16::from_be(Probed::read::<u16>(sk + offset!(inet_sport)).unwrap_or(0));
    }
    if !ports_pass(&config, ends.sport, ends.dport) {
        return;
    }
    if !netns_passes(&config, netns_of::<M>(sk)) {
        return;
    }
    if config.cgroup_filter != 0 {
        let node = cgroup_node::<M>(sk);
        if !cgroup_passes::<M>(node, cgroup_id::<M>(node)) {
            return;
        }
    }
    count(Counter::CauseMatched);
    let Some(mut entry) = EVENTS.reserve::<CauseEvent>(0) else {
        count(Counter::CauseLost);
        return;
    };
    entry.write(CauseEvent {
        kind: record_kind::CAUSE,
        cause: what,
        state: state as u8,
        _pad: 0,
        reason,
        // SAFETY: a helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        skaddr: sk,
    });
    entry.submit(submit_flags(&config));
}

/// The bytes of four words as they lay in memory.
#[inline(always)]
fn words32(words: [u32; 4]) -> [u8; 16] {
    // SAFETY: same size, every bit pattern valid.
    unsafe { core::mem::transmute(words) }
}

/// The bytes of two words as they lay in memory.
#[inline(always)]
fn words64(words: [u64; 2]) -> [u8; 16] {
    // SAFETY: same size, every bit pattern valid.
    unsafe { core::mem::transmute(words) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
