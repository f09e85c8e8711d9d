//! What the kernel programs assume about the running kernel, checked against its BTF before
//! anything is loaded: the arguments of each raw tracepoint they attach to, and where in a
//! socket, a timewait socket and a timer the fields they read are.

use std::fmt::Write as _;

use anyhow::{Result, bail};
use tcpclose_common::{
    CAUSE_ARGS, CAUSE_PROGRAMS, SocketLayout, TIMER_ARGS, TIMER_PROGRAMS, TRANSITION_ARGS,
    TRANSITION_TRACEPOINT, TracepointArg, sock_common,
};

use crate::{
    btf::{Btf, Param},
    reset_reasons::ResetReasons,
};

/// Checks that the kernel has the raw tracepoint `event` and that the arguments a program reads
/// from it (`expected`, the first ones) are what the kernel passes. The error names the
/// tracepoint, what tcpclose reads and what the kernel has.
pub fn check_tracepoint(btf: &Btf, event: &str, expected: &[TracepointArg]) -> Result<()> {
    let Some(found) = btf.tracepoint_args(event) else {
        bail!(
            "this kernel has no {event} tracepoint (its BTF has no `btf_trace_{event}`): \
             tcpclose needs Linux 5.8 or newer"
        );
    };
    let fits = found.len() >= expected.len()
        && expected
            .iter()
            .zip(&found)
            .all(|(want, param)| arg_fits(*want, param));
    if !fits {
        bail!(
            "this kernel's {event} tracepoint passes ({}), tcpclose reads ({}{}): \
             this tcpclose does not support this kernel",
            spell_found(&found),
            spell_expected(expected),
            if expected.len() < found.len() {
                ", ..."
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// Checks the tracepoint the transition program attaches to.
pub fn check_transition_tracepoint(btf: &Btf) -> Result<()> {
    check_tracepoint(btf, TRANSITION_TRACEPOINT, &TRANSITION_ARGS)
}

/// Checks the `timer:` tracepoints the timewait programs attach to.
pub fn check_timer_tracepoints(btf: &Btf) -> Result<()> {
    for (_, event) in TIMER_PROGRAMS {
        check_tracepoint(btf, event, &TIMER_ARGS)?;
    }
    Ok(())
}

/// Checks the `tcp:` tracepoints the cause programs attach to, and adds what their optional
/// arguments are to `layout`: whether tcp_send_reset passes its `enum sk_rst_reason` (whose names
/// are returned, empty when it does not) and whether tcp_retransmit_skb passes `int err`.
pub fn add_cause_layout(btf: &Btf, layout: &mut SocketLayout) -> Result<ResetReasons> {
    for (_, event, _) in CAUSE_PROGRAMS {
        check_tracepoint(btf, event, &CAUSE_ARGS)?;
    }
    let third = |event: &str| {
        btf.tracepoint_args(event)
            .and_then(|args| args.get(2).copied())
    };
    let mut reasons = ResetReasons::default();
    if let Some(reason) = third("tcp_send_reset")
        && let Some(name) = reason.enum_name()
    {
        let values = btf.enum_values(name).unwrap_or_default();
        reasons = ResetReasons::from_enumerators(values);
        layout.rst_reason = 1;
    }
    if third("tcp_retransmit_skb").and_then(|err| err.int_size()) == Some(4) {
        layout.retransmit_err = 1;
    }
    Ok(reasons)
}

fn arg_fits(want: TracepointArg, param: &Param<'_>) -> bool {
    match want {
        TracepointArg::PointerTo(name) => param.pointee_struct() == Some(name),
        TracepointArg::Int(size) => param.int_size() == Some(size),
    }
}

fn spell_found(found: &[Param<'_>]) -> String {
    let mut out = String::new();
    for (i, param) in found.iter().enumerate() {
        let _ = write!(out, "{}{param}", if i == 0 { "" } else { ", " });
    }
    out
}

fn spell_expected(expected: &[TracepointArg]) -> String {
    let spelled: Vec<String> = expected
        .iter()
        .map(|arg| match arg {
            TracepointArg::PointerTo(name) => format!("struct {name} *"),
            TracepointArg::Int(4) => "int".to_owned(),
            TracepointArg::Int(size) => format!("a {size}-byte integer"),
        })
        .collect();
    spelled.join(", ")
}

fn member_offset(btf: &Btf, ty: &str, member: &str) -> Result<u16> {
    let offset = btf.member_offset(ty, member).map_err(|err| {
        anyhow::anyhow!("{err} in this kernel's BTF: this tcpclose does not support this kernel")
    })?;
    u16::try_from(offset).map_err(|_| anyhow::anyhow!("`{ty}.{member}` is too far in"))
}

/// Where the transition program finds a socket's protocol, family, ports and addresses, in the
/// running kernel. The programs read `struct sock_common` in two blocks whose inner layout is
/// fixed at build time ([`sock_common`]): checked here. `sk_protocol` is read as a whole `u16`:
/// before Linux 5.6 it was an 8-bit bit field, which is refused.
pub fn socket_layout(btf: &Btf) -> Result<SocketLayout> {
    let offset = |ty: &str, member: &str| member_offset(btf, ty, member);
    let daddr = offset("sock_common", "skc_daddr")?;
    let v6_daddr = offset("sock_common", "skc_v6_daddr")?;
    for (member, base, expected) in [
        ("skc_rcv_saddr", daddr, sock_common::RCV_SADDR),
        ("skc_dport", daddr, sock_common::DPORT),
        ("skc_num", daddr, sock_common::NUM),
        ("skc_family", daddr, sock_common::FAMILY),
        ("skc_state", daddr, sock_common::STATE),
        ("skc_v6_rcv_saddr", v6_daddr, sock_common::V6_RCV_SADDR),
    ] {
        let found = usize::from(offset("sock_common", member)?);
        if found != usize::from(base) + expected {
            bail!(
                "this kernel's `struct sock_common` has `{member}` at offset {found}, tcpclose \
                 was built for {}; this tcpclose does not support this kernel's socket layout",
                usize::from(base) + expected
            );
        }
    }
    Ok(SocketLayout {
        skc_daddr: daddr,
        skc_v6_daddr: v6_daddr,
        sk_protocol: offset("sock", "sk_protocol")?,
        inet_sport: offset("inet_sock", "inet_sport")?,
        ..SocketLayout::default()
    })
}

/// Adds where the timer programs find a timewait socket's timer and substate, and the timer
/// function they keep (`tw_timer_handler`, at `handler` in this kernel).
pub fn add_timewait_layout(btf: &Btf, layout: &mut SocketLayout, handler: u64) -> Result<()> {
    let timer_struct = btf
        .member_struct_name("inet_timewait_sock", "tw_timer")
        .map_err(anyhow::Error::new)?;
    if timer_struct != Some("timer_list") {
        bail!(
            "this kernel's timewait sockets use a `{}` timer, tcpclose knows `timer_list`",
            timer_struct.unwrap_or("non-struct")
        );
    }
    let offset = |ty: &str, member: &str| member_offset(btf, ty, member);
    // The timewait socket starts with a `struct sock_common`, like a full socket.
    if offset("inet_timewait_sock", "__tw_common")? != 0 {
        bail!("this kernel's timewait sockets do not start with their `sock_common`");
    }
    layout.timer_function = offset("timer_list", "function")?;
    layout.timer_expires = offset("timer_list", "expires")?;
    layout.tw_timer = offset("inet_timewait_sock", "tw_timer")?;
    layout.tw_substate = offset("inet_timewait_sock", "tw_substate")?;
    layout.tw_timer_handler = handler;
    Ok(())
}

/// Adds where the transition program finds a socket's network namespace and cgroup, and the
/// timer programs a timewait socket's namespace. What this kernel's BTF lacks is left out (the
/// records then carry 0 for it) and each such gap is returned as a warning: a kernel built
/// without network namespaces or cgroup socket data still runs tcpclose.
pub fn add_placement_layout(btf: &Btf, layout: &mut SocketLayout) -> Vec<String> {
    let mut warnings = Vec::new();
    let offset = |ty: &str, member: &str| btf.member_offset(ty, member);
    // `possible_net_t` holds the `struct net *` first (and only).
    let netns = (|| {
        let net = offset("sock_common", "skc_net")?;
        let inum = offset("net", "ns")? + offset("ns_common", "inum")?;
        Ok::<_, crate::btf::BtfError>((net, inum))
    })();
    match netns {
        Ok((net, inum)) => match (u16::try_from(net), u16::try_from(inum)) {
            (Ok(net), Ok(inum)) => {
                layout.skc_net = net;
                layout.net_ns_inum = inum;
            }
            _ => warnings.push("`net.ns.inum` is too far in".to_owned()),
        },
        Err(err) => warnings.push(format!("no network namespaces: {err}")),
    }
    let cgroup = (|| {
        let data = offset("sock", "sk_cgrp_data")?;
        // Linux 5.15 made `sock_cgroup_data` a plain `struct cgroup *cgroup`; before, a tagged
        // word `val` (with bit fields beside it in a union).
        let (pointer, tagged) = match offset("sock_cgroup_data", "cgroup") {
            Ok(pointer) => (pointer, false),
            Err(_) => (offset("sock_cgroup_data", "val")?, true),
        };
        let kn = offset("cgroup", "kn")?;
        let id = offset("kernfs_node", "id")?;
        let parent =
            offset("kernfs_node", "__parent").or_else(|_| offset("kernfs_node", "parent"))?;
        Ok::<_, crate::btf::BtfError>((data + pointer, tagged, kn, id, parent))
    })();
    match cgroup {
        Ok((sk_cgroup, tagged, kn, id, parent)) => {
            match (
                u16::try_from(sk_cgroup),
                u16::try_from(kn),
                u16::try_from(id),
                u16::try_from(parent),
            ) {
                (Ok(sk_cgroup), Ok(kn), Ok(id), Ok(parent)) => {
                    layout.sk_cgroup = sk_cgroup;
                    layout.cgroup_kn = kn;
                    layout.kernfs_id = id;
                    layout.kernfs_parent = parent;
                    layout.cgroup_tagged = u8::from(tagged);
                }
                _ => warnings.push("`sock.sk_cgrp_data` is too far in".to_owned()),
            }
        }
        Err(err) => warnings.push(format!("no cgroup of sockets: {err}")),
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::btf::tests::Builder;

    /// A kernel's types as far as the checks look: `sock_common`, `sock`, `inet_sock`, the
    /// timewait socket and its timer, and the tracepoints; `sk_protocol_bits` makes
    /// `sk_protocol` an 8-bit bit field (Linux before 5.6) when not 0.
    fn kernel(transition_args: &[&str], sk_protocol_bits: u32) -> Vec<u8> {
        let mut b = Builder::default();
        let int = b.int("int", 4);
        let u16_ = b.int("short unsigned int", 2);
        let u64_ = b.int("long long unsigned int", 8);
        let ulong = b.int("long unsigned int", 8);
        let u8_ = b.int("unsigned char", 1);
        let common = b.structure(
            "sock_common",
            136,
            &[
                ("skc_daddr", int, 0, 0),
                ("skc_rcv_saddr", int, 32, 0),
                ("skc_dport", u16_, 96, 0),
                ("skc_num", u16_, 112, 0),
                ("skc_family", u16_, 128, 0),
                ("skc_state", u8_, 144, 0),
                ("skc_v6_daddr", u64_, 56 * 8, 0),
                ("skc_v6_rcv_saddr", u64_, 72 * 8, 0),
            ],
        );
        let sock = b.structure(
            "sock",
            768,
            &[
                ("__sk_common", common, 0, 0),
                ("sk_protocol", u16_, 516 * 8, sk_protocol_bits),
            ],
        );
        b.structure(
            "inet_sock",
            968,
            &[("sk", sock, 0, 0), ("inet_sport", u16_, 784 * 8, 0)],
        );
        let timer = b.structure(
            "timer_list",
            40,
            &[("expires", ulong, 128, 0), ("function", u64_, 192, 0)],
        );
        b.structure(
            "inet_timewait_sock",
            200,
            &[
                ("__tw_common", common, 0, 0),
                ("tw_substate", int, 140 * 8, 0),
                ("tw_timer", timer, 160 * 8, 0),
            ],
        );
        let const_sock = b.constant(sock);
        let sock_ptr = b.pointer(const_sock);
        let skb = b.structure("sk_buff", 232, &[]);
        let skb_ptr = b.pointer(skb);
        let timer_ptr = b.pointer(timer);
        let args: Vec<u32> = transition_args
            .iter()
            .map(|arg| match *arg {
                "sock" => sock_ptr,
                "skb" => skb_ptr,
                "int" => int,
                "ulong" => ulong,
                other => panic!("{other}"),
            })
            .collect();
        if !transition_args.is_empty() {
            b.tracepoint("inet_sock_set_state", &args);
        }
        // 6.1's timer_start; 6.8 made it (timer, bucket_expiry).
        b.tracepoint("timer_start", &[timer_ptr, ulong, int]);
        b.tracepoint("timer_expire_entry", &[timer_ptr, ulong]);
        b.tracepoint("timer_cancel", &[timer_ptr]);
        // 6.1's: 6.10 added the reset's reason, 6.14 the retransmission's result.
        b.tracepoint("tcp_send_reset", &[sock_ptr, skb_ptr]);
        b.tracepoint("tcp_receive_reset", &[sock_ptr]);
        b.tracepoint("tcp_retransmit_skb", &[sock_ptr, skb_ptr]);
        b.blob()
    }

    #[test]
    fn finds_the_optional_arguments_of_the_cause_tracepoints() {
        let btf = Btf::parse(&kernel(&["sock", "int", "int"], 0)).unwrap();
        let mut layout = SocketLayout::default();
        let reasons = add_cause_layout(&btf, &mut layout).unwrap();
        assert_eq!((layout.rst_reason, layout.retransmit_err), (0, 0));
        assert_eq!(reasons, ResetReasons::default());

        let mut b = Builder::default();
        let int = b.int("int", 4);
        let sock = b.structure("sock", 8, &[]);
        let sock_ptr = b.pointer(sock);
        let skb = b.structure("sk_buff", 8, &[]);
        let skb_ptr = b.pointer(skb);
        let reason = b.enumeration(
            "sk_rst_reason",
            &[
                ("SK_RST_REASON_NOT_SPECIFIED", 0),
                ("SK_RST_REASON_TCP_ABORT_ON_CLOSE", 11),
            ],
        );
        b.tracepoint("tcp_send_reset", &[sock_ptr, skb_ptr, reason]);
        b.tracepoint("tcp_receive_reset", &[sock_ptr]);
        b.tracepoint("tcp_retransmit_skb", &[sock_ptr, skb_ptr, int]);
        let btf = Btf::parse(&b.blob()).unwrap();
        let reasons = add_cause_layout(&btf, &mut layout).unwrap();
        assert_eq!((layout.rst_reason, layout.retransmit_err), (1, 1));
        assert_eq!(reasons.name(11), Some("tcp_abort_on_close"));

        // A tracepoint that does not pass the socket first is refused, by name.
        let mut b = Builder::default();
        let int = b.int("int", 4);
        b.tracepoint("tcp_send_reset", &[int]);
        let btf = Btf::parse(&b.blob()).unwrap();
        let err = add_cause_layout(&btf, &mut layout).unwrap_err();
        assert!(err.to_string().contains("tcp_send_reset"), "{err}");
    }

    #[test]
    fn accepts_the_tracepoints_and_layout_the_programs_read() {
        let btf = Btf::parse(&kernel(&["sock", "int", "int"], 0)).unwrap();
        check_transition_tracepoint(&btf).unwrap();
        check_timer_tracepoints(&btf).unwrap();
        let mut layout = socket_layout(&btf).unwrap();
        assert_eq!(
            (
                layout.skc_daddr,
                layout.skc_v6_daddr,
                layout.sk_protocol,
                layout.inet_sport
            ),
            (0, 56, 516, 784)
        );
        add_timewait_layout(&btf, &mut layout, 0xffff_ffff_8100_0000).unwrap();
        assert_eq!(
            (
                layout.tw_timer,
                layout.tw_substate,
                layout.timer_expires,
                layout.timer_function
            ),
            (160, 140, 16, 24)
        );
        assert_eq!(layout.tw_timer_handler, 0xffff_ffff_8100_0000);
    }

    #[test]
    fn a_tracepoint_with_other_arguments_is_refused_saying_what_differs() {
        for args in [
            &["skb", "int", "int"][..],
            &["sock", "ulong", "int"],
            &["sock", "int"],
        ] {
            let btf = Btf::parse(&kernel(args, 0)).unwrap();
            let err = check_transition_tracepoint(&btf).unwrap_err().to_string();
            assert!(
                err.contains("inet_sock_set_state tracepoint passes ("),
                "{err}"
            );
            assert!(
                err.contains("tcpclose reads (struct sock *, int, int)"),
                "{err}"
            );
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        let btf = Btf::parse(&kernel(&["skb", "int", "int"], 0)).unwrap();
        let err = check_transition_tracepoint(&btf).unwrap_err().to_string();
        assert!(err.contains("passes (struct sk_buff *, int, int)"), "{err}");
        // Arguments after those read do not matter.
        let btf = Btf::parse(&kernel(&["sock", "int", "int", "ulong"], 0)).unwrap();
        check_transition_tracepoint(&btf).unwrap();
    }

    #[test]
    fn a_missing_tracepoint_is_named() {
        let btf = Btf::parse(&kernel(&[], 0)).unwrap();
        let err = check_transition_tracepoint(&btf).unwrap_err().to_string();
        assert!(
            err.contains("no inet_sock_set_state tracepoint")
                && err.contains("btf_trace_inet_sock_set_state")
                && err.contains("5.8"),
            "{err}"
        );
    }

    #[test]
    fn a_bit_field_protocol_is_refused_naming_the_member() {
        // Before Linux 5.6, `sk_protocol` was `unsigned int sk_protocol : 8`.
        let btf = Btf::parse(&kernel(&["sock", "int", "int"], 8)).unwrap();
        let err = socket_layout(&btf).unwrap_err().to_string();
        assert!(err.contains("`sk_protocol` is a bit field"), "{err}");
        assert!(err.contains("struct sock"), "{err}");
    }

    /// The types the placement reads: `net`, `sock_cgroup_data` with a `cgroup` pointer (5.15
    /// and later) or a tagged `val` (before), `cgroup`, `kernfs_node` with `__parent` (6.15 and
    /// later) or `parent`.
    fn placement_kernel(tagged: bool, old_parent: bool) -> Vec<u8> {
        let mut b = Builder::default();
        let uint = b.int("unsigned int", 4);
        let u64_ = b.int("long long unsigned int", 8);
        let ns = b.structure("ns_common", 24, &[("inum", uint, 16 * 8, 0)]);
        b.structure("net", 256, &[("ns", ns, 120 * 8, 0)]);
        let possible_net = b.structure("possible_net_t", 8, &[("net", u64_, 0, 0)]);
        b.structure("sock_common", 136, &[("skc_net", possible_net, 48 * 8, 0)]);
        let data = if tagged {
            b.structure("sock_cgroup_data", 8, &[("val", u64_, 0, 0)])
        } else {
            b.structure("sock_cgroup_data", 16, &[("cgroup", u64_, 0, 0)])
        };
        b.structure("sock", 768, &[("sk_cgrp_data", data, 664 * 8, 0)]);
        b.structure("cgroup", 2048, &[("kn", u64_, 264 * 8, 0)]);
        let parent = if old_parent { "parent" } else { "__parent" };
        b.structure(
            "kernfs_node",
            128,
            &[(parent, u64_, 8 * 8, 0), ("id", u64_, 88 * 8, 0)],
        );
        b.blob()
    }

    #[test]
    fn the_placement_is_found_in_either_layout_of_the_cgroup_data() {
        for (tagged, old_parent) in [(false, false), (true, true)] {
            let btf = Btf::parse(&placement_kernel(tagged, old_parent)).unwrap();
            let mut layout = SocketLayout::default();
            let warnings = add_placement_layout(&btf, &mut layout);
            assert!(warnings.is_empty(), "{warnings:?}");
            assert_eq!(
                (
                    layout.skc_net,
                    layout.net_ns_inum,
                    layout.sk_cgroup,
                    layout.cgroup_kn,
                    layout.kernfs_id,
                    layout.kernfs_parent,
                    layout.cgroup_tagged
                ),
                (48, 136, 664, 264, 88, 8, u8::from(tagged))
            );
        }
    }

    #[test]
    fn a_kernel_without_cgroup_data_in_sockets_is_warned_about_and_runs() {
        let btf = Btf::parse(&kernel(&["sock", "int", "int"], 0)).unwrap();
        let mut layout = socket_layout(&btf).unwrap();
        let warnings = add_placement_layout(&btf, &mut layout);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[1].contains("sk_cgrp_data"), "{warnings:?}");
        // Zero offsets tell the programs not to read the placement.
        assert_eq!((layout.net_ns_inum, layout.cgroup_kn), (0, 0));
    }

    #[test]
    fn this_kernels_btf_passes_every_check() {
        let bytes = std::fs::read("/sys/kernel/btf/vmlinux")
            .expect("tcpclose runs on kernels with BTF: /sys/kernel/btf/vmlinux");
        let btf = Btf::parse(&bytes).unwrap();
        check_transition_tracepoint(&btf).unwrap();
        check_timer_tracepoints(&btf).unwrap();
        let mut layout = socket_layout(&btf).unwrap();
        add_cause_layout(&btf, &mut layout).unwrap();
        add_timewait_layout(&btf, &mut layout, 1).unwrap();
        let warnings = add_placement_layout(&btf, &mut layout);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert!(layout.net_ns_inum != 0 && layout.cgroup_kn != 0 && layout.kernfs_id != 0);
    }
}
