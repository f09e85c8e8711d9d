//! Regressions: engine bugs the properties found, minimized, as plain named tests.

use std::net::SocketAddr;

use tcpclose::{
    event::{Family, Task, TcpState, TimerAction, TimewaitTimer, Transition},
    teardown::{Correlator, ExistingSocket, Phase, Teardown, TimewaitEnd},
};

use crate::{MS, S, ops::tuple};

/// A transition of socket `sk` on 4-tuple `n` at `ms` (+ `ns`).
fn transition_at(sk: u64, ns: u64, n: usize, old: TcpState, new: TcpState) -> Transition {
    let port0 = (old, new) == (TcpState::Close, TcpState::SynSent);
    let (family, local, remote) = tuple(n, port0);
    Transition {
        ts_ns: ns,
        skaddr: sk,
        family,
        local,
        remote,
        old,
        new,
        task: Task::new(7, 7, "app"),
        placement: tcpclose::event::Placement::default(),
    }
}

/// Feeds socket `sk` (on 4-tuple 0) the transitions `steps`, their times in `unit`s.
fn live(
    c: &mut Correlator,
    sk: u64,
    unit: u64,
    steps: &[(u64, TcpState, TcpState)],
    out: &mut Vec<Teardown>,
) {
    for &(t, old, new) in steps {
        c.on_transition(&transition_at(sk, t * unit, 0, old, new), out);
    }
}

/// A timer event of timewait socket `tw` on 4-tuple `n`.
fn timer_at(
    tw: u64,
    ns: u64,
    n: usize,
    substate: TcpState,
    action: TimerAction,
    expires_ns: u64,
) -> TimewaitTimer {
    let (family, local, remote) = tuple(n, false);
    TimewaitTimer {
        ts_ns: ns,
        twaddr: tw,
        family,
        local,
        remote,
        substate,
        action,
        expires_ns,
        jiffy_ns: 4 * MS,
        netns: 0,
    }
}

/// What a teardown seen whole must satisfy: it was seen born (a lifetime), and its teardown and
/// each of its phases fit in that life.
fn assert_whole_fits_its_life(t: &Teardown) {
    if !t.complete {
        return;
    }
    let lifetime = t
        .lifetime_ns
        .unwrap_or_else(|| panic!("complete, but no lifetime: {t:?}"));
    assert!(
        t.teardown_ns.is_none_or(|ns| ns <= lifetime),
        "teardown longer than the life: {t:?}"
    );
    for (phase, ns) in t.phases.iter() {
        assert!(
            ns <= lifetime,
            "{} longer than the life: {t:?}",
            phase.name()
        );
    }
}

/// Found by `clock_going_backwards_never_makes_up_durations` and
/// `hostile_streams_keep_the_engine_sound`. Records of one connection out of timestamp order (a
/// CPU's record submitted after a later one of another CPU; hostile input): SYN_SENT entered at
/// 100 ms, left at 50 ms. SYN_SENT is no teardown phase, so `Life::advance` does not see the
/// negative time in it as a gap: the connection stays "complete", with a teardown (and a
/// FIN_WAIT1) of 150 ms in a life of 100 ms.
#[test]
fn regression_clock_going_backwards_within_a_life() {
    use TcpState::*;
    let mut c = Correlator::new(64);
    let mut out = Vec::new();
    live(
        &mut c,
        1,
        MS,
        &[
            (100, Close, SynSent),
            (50, SynSent, Established),
            (50, Established, FinWait1),
            (200, FinWait1, Close),
        ],
        &mut out,
    );
    assert_eq!(out.len(), 1, "{out:?}");
    assert_whole_fits_its_life(&out[0]);
}

/// Found by `hostile_streams_keep_the_engine_sound`. A timewait socket whose TIME_WAIT start is
/// derived from its timer's expiry (its arming was not seen), killed before that start: a kill
/// within a jiffy of the handoff, the expiry being rounded up to the jiffy (or, with hostile
/// `jiffies`/`expires`, any expiry). `Handoff::into_teardown` adds `from - at` to FIN_WAIT2
/// with `from` past the end (and a TIME_WAIT of 0): a loopback connection of 0.5 ms shows a
/// FIN_WAIT2 of 4.1 ms.
#[test]
fn regression_time_wait_derived_from_an_expiry_after_the_end() {
    use TcpState::*;
    const US: u64 = 1_000;
    let mut c = Correlator::new(64);
    let mut out = Vec::new();
    live(
        &mut c,
        1,
        US,
        &[
            (0, Close, SynSent),
            (100, SynSent, Established),
            (200, Established, FinWait1),
            (300, FinWait1, FinWait2),
            (400, FinWait2, Close),
        ],
        &mut out,
    );
    // Killed 100 us after the handoff; armed for 60 s at the handoff, rounded up a jiffy.
    let expires = 400 * US + 60 * S + 4 * MS;
    let killed = timer_at(
        0xbeef,
        500 * US,
        0,
        TimeWait,
        TimerAction::Cancelled,
        expires,
    );
    c.on_timewait(&killed, &mut out);
    c.expire(S, &mut out);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].timewait_end, Some(TimewaitEnd::Killed));
    assert_whole_fits_its_life(&out[0]);
}

/// Found by `hostile_streams_keep_the_engine_sound` (without the clock going back). A timewait
/// socket nobody handed over to (its full socket's `-> CLOSE` was lost) is killed by a
/// connect() reusing its 4-tuple; that new connection closes within the 2 s `unclaimed` events
/// are kept, and the slab gives its timewait socket the same address. At its handoff the dead
/// socket's arming and kill, kept in `unclaimed`, are replayed onto it: it "ends" at the old
/// kill, before it was born, and its own TIME_WAIT is lost.
#[test]
fn regression_events_of_an_earlier_timewait_socket_replayed_onto_a_handoff() {
    use TcpState::*;
    const TW: u64 = 0xffff_8881_0000_1000;
    let mut c = Correlator::new(64);
    let mut out = Vec::new();
    let armed = |ms: u64| {
        timer_at(
            TW,
            ms * MS,
            0,
            TimeWait,
            TimerAction::Armed,
            ms * MS + 60 * S,
        )
    };
    // The unfollowed timewait socket: armed at 0, killed at 1 s by the new connection.
    c.on_timewait(&armed(0), &mut out);
    c.on_transition(&transition_at(1, S, 0, Close, SynSent), &mut out);
    let kill = timer_at(TW, S, 0, TimeWait, TimerAction::Cancelled, 60 * S);
    c.on_timewait(&kill, &mut out);
    live(
        &mut c,
        1,
        MS,
        &[
            (1_100, SynSent, Established),
            (1_500, Established, FinWait1),
            (1_600, FinWait1, FinWait2),
        ],
        &mut out,
    );
    c.on_timewait(&armed(1_700), &mut out);
    c.on_transition(&transition_at(1, 1_700 * MS, 0, FinWait2, Close), &mut out);
    let fired = timer_at(
        TW,
        61_700 * MS,
        0,
        TimeWait,
        TimerAction::Fired,
        61_700 * MS,
    );
    c.on_timewait(&fired, &mut out);
    c.expire(70 * S, &mut out);
    assert_eq!(out.len(), 1, "one connection was followed: {out:#?}");
    let t = &out[0];
    assert_whole_fits_its_life(t);
    assert_eq!(t.end_ns, 61_700 * MS, "{t:?}");
    assert_eq!(t.timewait_end, Some(TimewaitEnd::Expired), "{t:?}");
    assert_eq!(t.phases.get(Phase::TimeWait), Some(60 * S), "{t:?}");
    assert_eq!(t.lifetime_ns, Some(60_700 * MS), "{t:?}");
}

/// Found by `hostile_streams_keep_the_engine_sound`. `make_room` evicts only full and timewait
/// sockets: when start-up sockets (`existing`, never evicted) fill the cap, a new connection
/// goes over it, and each further one evicts the previous (only one live connection is
/// followed at a time, each ending unseen: incomplete, without a lifetime).
#[test]
fn regression_start_up_sockets_fill_the_cap() {
    use TcpState::*;
    let mut c = Correlator::new(8);
    for port in 0..8 {
        c.adopt_existing(&ExistingSocket {
            family: Family::Ipv4,
            local: SocketAddr::from(([10, 0, 0, 1], 50_000 + port)),
            remote: SocketAddr::from(([10, 0, 0, 2], 80)),
            state: CloseWait,
            seen_ns: 0,
            placement: tcpclose::event::Placement::default(),
        });
    }
    assert_eq!(c.len(), 8);
    let mut out = Vec::new();
    for sk in 1..=3 {
        c.on_transition(&transition_at(sk, MS, 0, Close, SynSent), &mut out);
        assert!(c.len() <= 8, "{} followed, over the cap of 8", c.len());
    }
}

/// Found by `hostile_streams_keep_the_engine_sound`. Timewait sockets armed with no handoff to
/// claim them (their full sockets' events lost, or not followed) are kept in `unclaimed` for
/// 2 s; `make_room` does not evict them, and with no full or timewait socket to evict, nothing
/// bounds them but that wait.
#[test]
fn regression_unclaimed_timewait_sockets_go_over_the_cap() {
    let mut c = Correlator::new(8);
    let mut out = Vec::new();
    for port in 0..20 {
        let ev = TimewaitTimer {
            ts_ns: MS,
            twaddr: 0x1000 * (port + 1),
            family: Family::Ipv4,
            local: SocketAddr::from(([10, 0, 0, 1], 50_000 + port as u16)),
            remote: SocketAddr::from(([10, 0, 0, 2], 80)),
            substate: TcpState::TimeWait,
            action: TimerAction::Armed,
            expires_ns: MS + 60 * S,
            jiffy_ns: 4 * MS,
            netns: 0,
        };
        c.on_timewait(&ev, &mut out);
        assert!(c.len() <= 8, "{} followed, over the cap of 8", c.len());
    }
}

/// Found by `clock_going_backwards_never_makes_up_durations` and
/// `hostile_streams_keep_the_engine_sound` once the four above were fixed. An orphan's timer
/// re-armed in TIME_WAIT (the peer's FIN) by a record dated before the handoff, even before the
/// connection's birth: `Handoff::observe_timer` took that time as TIME_WAIT's start, and the
/// connection, still "complete", spent longer in TIME_WAIT than it lived.
#[test]
fn regression_fin_of_an_orphan_dated_before_the_handoff() {
    use TcpState::*;
    const TW: u64 = 0xffff_8881_0000_1000;
    let mut c = Correlator::new(64);
    let mut out = Vec::new();
    let orphaned = timer_at(TW, 1_004 * MS, 0, FinWait2, TimerAction::Armed, 61_004 * MS);
    live(
        &mut c,
        1,
        MS,
        &[
            (1_000, Close, SynSent),
            (1_001, SynSent, Established),
            (1_002, Established, FinWait1),
            (1_003, FinWait1, FinWait2),
        ],
        &mut out,
    );
    c.on_timewait(&orphaned, &mut out);
    c.on_transition(&transition_at(1, 1_004 * MS, 0, FinWait2, Close), &mut out);
    // The peer's FIN, dated half a second before the connection was born.
    let fin = timer_at(TW, 500 * MS, 0, TimeWait, TimerAction::Armed, 60_500 * MS);
    c.on_timewait(&fin, &mut out);
    let fired = timer_at(TW, 1_005 * MS, 0, TimeWait, TimerAction::Fired, 1_005 * MS);
    c.on_timewait(&fired, &mut out);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].timewait_end, Some(TimewaitEnd::Expired));
    assert_whole_fits_its_life(&out[0]);
}
