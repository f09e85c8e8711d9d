//! tcpclose's kernel programs: one on the `sock:inet_sock_set_state` tracepoint, and three on the
//! `timer:` tracepoints that follow timewait sockets, whose only visible activity is their timer.
//!
//! Per event each does the least it can: filter (timer function, protocol, family, ports),
//! count, reserve a ring buffer record, fill it, submit it without waking the consumer. What it
//! cannot deliver it counts. Everything else happens in userspace.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_jiffies64, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, PerCpuArray, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};
use tcpclose_common::{
    AF_INET, AF_INET6, COUNTER_ENTRIES, Config, Counter, DEFAULT_RING_BYTES, IPPROTO_TCP,
    PORT_FILTER_ENTRIES, PORT_LOCAL, PORT_REMOTE, TimewaitEvent, TimewaitLayout, TransitionEvent,
    made_by_syscall, record_kind, timer_action, tracepoint as tp,
};

/// Resized by the loader (`EbpfLoader::set_max_entries`) before loading.
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_ENTRIES, 0);

#[map(name = "PORT_FILTER")]
static PORT_FILTER: Array<u8> = Array::with_max_entries(PORT_FILTER_ENTRIES, 0);

/// Set by the loader before loading; lives in .rodata, so the verifier treats it as constant.
#[unsafe(no_mangle)]
static CONFIG: Config = Config {
    wakeup_bytes: 256 << 10,
    family: 0,
    port_filter: 0,
    _pad: [0; 5],
    timewait: TimewaitLayout {
        tw_timer_handler: 0,
        timer_function: 0,
        timer_expires: 0,
        tw_timer: 0,
        tw_substate: 0,
        skc_daddr: 0,
        skc_rcv_saddr: 0,
        skc_dport: 0,
        skc_num: 0,
        skc_family: 0,
        skc_v6_daddr: 0,
        skc_v6_rcv_saddr: 0,
        _pad: [0; 2],
    },
};

/// Reads the configuration; volatile so the compiler does not fold the default value in.
#[inline(always)]
fn config() -> Config {
    // SAFETY: plain read of a global the loader initialised.
    unsafe { core::ptr::read_volatile(&CONFIG) }
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    on_transition(&ctx);
    0
}

/// Reads a field of the tracepoint record. Tracepoint contexts may be loaded directly at constant,
/// size-aligned offsets (`tp_prog_is_valid_access` in kernel/trace/bpf_trace.c), which is one
/// instruction instead of a `bpf_probe_read_kernel` call per field.
#[inline(always)]
fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    // SAFETY: the offsets in `tracepoint` are checked against the kernel's format file by the
    // loader before it attaches this program, and each is aligned to its field's size.
    unsafe { core::ptr::read((ctx.as_ptr() as *const u8).add(offset) as *const T) }
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

#[inline(always)]
fn on_transition(ctx: &TracePointContext) {
    // The tracepoint also fires for SCTP and MPTCP sockets.
    if field::<u16>(ctx, tp::PROTOCOL) != IPPROTO_TCP {
        return;
    }
    let config = config();
    let family = field::<u16>(ctx, tp::FAMILY);
    if config.family != 0 && family != config.family {
        return;
    }
    let sport = field::<u16>(ctx, tp::SPORT);
    let dport = field::<u16>(ctx, tp::DPORT);
    if !ports_pass(&config, sport, dport) {
        return;
    }
    count(Counter::Matched);

    let Some(mut entry) = EVENTS.reserve::<TransitionEvent>(0) else {
        count(Counter::Lost);
        return;
    };
    // Whole words only: byte-wise copies would make the compiler step a pointer through the
    // context, which the verifier rejects. An IPv4 address fills the first 4 bytes.
    let (saddr, daddr) = if family == AF_INET {
        (
            words32([field::<u32>(ctx, tp::SADDR), 0, 0, 0]),
            words32([field::<u32>(ctx, tp::DADDR), 0, 0, 0]),
        )
    } else {
        (
            words64([field(ctx, tp::SADDR_V6), field(ctx, tp::SADDR_V6 + 8)]),
            words64([field(ctx, tp::DADDR_V6), field(ctx, tp::DADDR_V6 + 8)]),
        )
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let (oldstate, newstate) = (
        field::<i32>(ctx, tp::OLDSTATE),
        field::<i32>(ctx, tp::NEWSTATE),
    );
    // The current task owns the socket only when a system call made the change (connect,
    // listen, close, shutdown: see `Transition::made_by_syscall`); the others run in softirq or
    // timer context on whatever task was there. Its name is wanted only then.
    let comm = if made_by_syscall(oldstate, newstate) {
        bpf_get_current_comm().unwrap_or([0; 16])
    } else {
        [0; 16]
    };
    entry.write(TransitionEvent {
        kind: record_kind::TRANSITION,
        _pad: 0,
        family,
        sport,
        dport,
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        skaddr: field::<u64>(ctx, tp::SKADDR),
        saddr,
        daddr,
        tid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        oldstate,
        newstate,
        comm,
    });
    entry.submit(submit_flags(&config));
}

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
    on_timer(ctx.arg::<u64>(0), timer_action::START);
    0
}

#[raw_tracepoint(tracepoint = "timer_expire_entry")]
pub fn tw_timer_expire(ctx: RawTracePointContext) -> u32 {
    on_timer(ctx.arg::<u64>(0), timer_action::EXPIRE);
    0
}

#[raw_tracepoint(tracepoint = "timer_cancel")]
pub fn tw_timer_cancel(ctx: RawTracePointContext) -> u32 {
    on_timer(ctx.arg::<u64>(0), timer_action::CANCEL);
    0
}

/// Reads kernel memory; 0 when it cannot be read.
#[inline(always)]
fn read_kernel<T: Copy + Default>(addr: u64) -> T {
    // SAFETY: bpf_probe_read_kernel checks the address and fails instead of faulting.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.unwrap_or_default()
}

#[inline(always)]
fn on_timer(timer: u64, action: u8) {
    let config = config();
    let layout = config.timewait;
    if layout.tw_timer_handler == 0 {
        return;
    }
    let function = read_kernel::<u64>(timer + u64::from(layout.timer_function));
    if function != layout.tw_timer_handler {
        return;
    }
    let tw = timer - u64::from(layout.tw_timer);
    let family = read_kernel::<u16>(tw + u64::from(layout.skc_family));
    if config.family != 0 && family != config.family {
        return;
    }
    // skc_num is the local port in host order, skc_dport the remote port in network order.
    let sport = read_kernel::<u16>(tw + u64::from(layout.skc_num));
    let dport = u16::from_be(read_kernel::<u16>(tw + u64::from(layout.skc_dport)));
    if !ports_pass(&config, sport, dport) {
        return;
    }
    count(Counter::TimewaitMatched);
    let Some(mut entry) = EVENTS.reserve::<TimewaitEvent>(0) else {
        count(Counter::TimewaitLost);
        return;
    };
    let (saddr, daddr) = if family == AF_INET6 {
        (
            read_kernel::<[u64; 2]>(tw + u64::from(layout.skc_v6_rcv_saddr)),
            read_kernel::<[u64; 2]>(tw + u64::from(layout.skc_v6_daddr)),
        )
    } else {
        (
            [
                u64::from(read_kernel::<u32>(tw + u64::from(layout.skc_rcv_saddr))),
                0,
            ],
            [
                u64::from(read_kernel::<u32>(tw + u64::from(layout.skc_daddr))),
                0,
            ],
        )
    };
    entry.write(TimewaitEvent {
        kind: record_kind::TIMEWAIT,
        action,
        family,
        sport,
        dport,
        substate: read_kernel::<u8>(tw + u64::from(layout.tw_substate)),
        _pad: [0; 7],
        // SAFETY: helpers without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        jiffies: unsafe { bpf_jiffies64() },
        twaddr: tw,
        expires: read_kernel::<u64>(timer + u64::from(layout.timer_expires)),
        saddr: words64(saddr),
        daddr: words64(daddr),
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
