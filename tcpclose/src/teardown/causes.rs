//! What explains a teardown that did not go by the book: who reset the connection (and the
//! kernel's reason), and how many times a FIN went unacknowledged and was sent again. The kernel
//! reports both against the full socket, matched here to its life by address.
//!
//! A reset the kernel sends on close comes after the socket's `-> CLOSE`: __tcp_close() (unread
//! data) and tcp_disconnect() (`SO_LINGER` 0) set the state first, then call
//! tcp_send_active_reset(). A connection that ends in a reset with no reset seen yet is held for
//! [`RESET_GRACE_NS`] of kernel time, for the reset to come. A reset received comes first:
//! tcp_reset() reports it before tcp_done() closes the socket.

use std::collections::VecDeque;

use super::{CloseKind, Correlator, Phase, Teardown};
use crate::event::{Cause, CauseKind, TcpState};

/// How long (kernel time, judged by the events that follow) a reset connection's record waits
/// for the reset the kernel sends after closing it. The reset follows on the same CPU within
/// microseconds; the wait covers records of other CPUs reserved in between.
pub const RESET_GRACE_NS: u64 = 10_000_000;

/// How long (by the clock, when no events come) a record waits at most.
pub const RESET_WAIT_NS: u64 = 1_000_000_000;

/// Which end reset the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResetBy {
    /// This host sent the RST.
    Local,
    /// The peer's RST was accepted.
    Peer,
}

impl ResetBy {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Peer => "peer",
        }
    }
}

/// A connection's reset: who, and the kernel's reason when it gives one (`enum sk_rst_reason`,
/// a reset sent on Linux 6.10+).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reset {
    pub by: ResetBy,
    pub reason: Option<u16>,
}

/// Segments retransmitted after the FIN, per phase where the FIN waits for its ACK: FIN_WAIT1,
/// CLOSING, LAST_ACK. Three bytes (every followed socket holds them), saturating at 255.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FinRetransmits([u8; 3]);

impl FinRetransmits {
    /// The phases a FIN can be retransmitted in.
    pub const PHASES: [Phase; 3] = [Phase::FinWait1, Phase::Closing, Phase::LastAck];

    fn slot(phase: Phase) -> Option<usize> {
        Self::PHASES.iter().position(|p| *p == phase)
    }

    /// Counts one retransmission in the state the socket was in.
    pub fn count(&mut self, state: TcpState) {
        if let Some(slot) = Phase::of(state).and_then(Self::slot) {
            self.0[slot] = self.0[slot].saturating_add(1);
        }
    }

    /// The retransmissions in `phase`.
    pub fn get(&self, phase: Phase) -> u32 {
        Self::slot(phase).map_or(0, |slot| u32::from(self.0[slot]))
    }

    /// The phases with retransmissions, and how many, in the order of [`Self::PHASES`].
    pub fn iter(&self) -> impl Iterator<Item = (Phase, u32)> + '_ {
        Self::PHASES
            .into_iter()
            .map(|p| (p, self.get(p)))
            .filter(|&(_, n)| n > 0)
    }
}

/// Records of reset connections waiting for the reset the kernel sends after `-> CLOSE`, in the
/// order they ended.
#[derive(Debug, Default)]
pub(super) struct UnexplainedResets {
    held: VecDeque<(u64, Teardown)>,
}

impl UnexplainedResets {
    pub(super) fn len(&self) -> usize {
        self.held.len()
    }

    fn hold(&mut self, skaddr: u64, teardown: Teardown) {
        self.held.push_back((skaddr, teardown));
    }

    /// The record of the socket at `skaddr`, if held. The newest are looked at first: the reset
    /// follows its close closely.
    fn take(&mut self, skaddr: u64) -> Option<Teardown> {
        let at = self.held.iter().rposition(|(held, _)| *held == skaddr)?;
        self.held.remove(at).map(|(_, teardown)| teardown)
    }

    /// Releases the records whose wait is over: ended [`RESET_GRACE_NS`] before `latest_ns`
    /// (the latest event seen) or [`RESET_WAIT_NS`] before `now_ns`; all with `now_ns` of
    /// `u64::MAX`.
    fn release(&mut self, latest_ns: u64, now_ns: u64, out: &mut Vec<Teardown>) {
        while let Some((_, front)) = self.held.front() {
            let end = front.end_ns;
            let due = end.saturating_add(RESET_GRACE_NS) <= latest_ns
                || end.saturating_add(RESET_WAIT_NS) <= now_ns;
            if !due {
                break;
            }
            if let Some((_, teardown)) = self.held.pop_front() {
                out.push(teardown);
            }
        }
    }
}

impl Correlator {
    /// Declares that resets are fed ([`Correlator::on_cause`]): a connection that ends in a reset
    /// with none seen yet is held a moment for the reset sent after its close.
    pub fn explaining_resets(mut self) -> Self {
        self.explains_resets = true;
        self
    }

    /// Feeds one reset or FIN retransmission; pushes the teardown it completes onto `out` (a
    /// held reset connection's).
    pub fn on_cause(&mut self, c: &Cause, out: &mut Vec<Teardown>) {
        self.latest_ns = self.latest_ns.max(c.ts_ns);
        let reset = match c.kind {
            CauseKind::FinRetransmit => {
                if let Some(life) = self.lives.get_mut(&c.skaddr) {
                    life.fin_retransmits.count(c.state);
                }
                return;
            }
            CauseKind::ResetReceived => Reset {
                by: ResetBy::Peer,
                reason: None,
            },
            CauseKind::ResetSent { reason } => Reset {
                by: ResetBy::Local,
                reason,
            },
        };
        if let Some(life) = self.lives.get_mut(&c.skaddr) {
            // The first reset is the one that ended it (an RST received, then the kernel's
            // answer to a segment that came after).
            life.reset.get_or_insert(reset);
        } else if let Some(mut teardown) = self.unexplained.take(c.skaddr) {
            teardown.reset = Some(reset);
            out.push(teardown);
        }
    }

    /// Where a finished life's record goes: held for its reset when it ended in one not seen
    /// yet, onto `out` otherwise.
    pub(super) fn emit_finished(
        &mut self,
        skaddr: u64,
        teardown: Teardown,
        out: &mut Vec<Teardown>,
    ) {
        if self.explains_resets && teardown.close == CloseKind::Reset && teardown.reset.is_none() {
            if self.unexplained.len() >= self.max_sockets {
                self.unexplained.release(u64::MAX, u64::MAX, out);
            }
            self.unexplained.hold(skaddr, teardown);
        } else {
            out.push(teardown);
        }
    }

    /// Releases held reset connections whose reset did not come in time (see
    /// [`UnexplainedResets::release`]).
    pub(super) fn release_unexplained(&mut self, now_ns: u64, out: &mut Vec<Teardown>) {
        self.unexplained.release(self.latest_ns, now_ns, out);
    }

    /// At exit: every record still held.
    pub fn release_held(&mut self, out: &mut Vec<Teardown>) {
        self.unexplained.release(u64::MAX, u64::MAX, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::{Cause, TcpState::*},
        teardown::testutil::*,
    };

    fn cause(skaddr: u64, ms: u64, state: TcpState, kind: CauseKind) -> Cause {
        Cause {
            ts_ns: ms * MS,
            skaddr,
            state,
            kind,
        }
    }

    #[test]
    fn a_reset_received_is_the_peers() {
        let mut c = Correlator::new(64).explaining_resets();
        feed(&mut c, 1, &OPEN);
        let mut out = Vec::new();
        c.on_cause(
            &cause(1, 50, Established, CauseKind::ResetReceived),
            &mut out,
        );
        assert!(out.is_empty());
        let t = one(feed(&mut c, 1, &[(50, Established, Close)]));
        assert_eq!(t.close, CloseKind::Reset);
        assert_eq!(
            t.reset,
            Some(Reset {
                by: ResetBy::Peer,
                reason: None
            })
        );
    }

    #[test]
    fn a_reset_sent_after_the_close_completes_the_held_record() {
        let mut c = Correlator::new(64).explaining_resets();
        feed(&mut c, 1, &OPEN);
        // Closed with unread data: `-> CLOSE`, then the reset.
        assert!(feed(&mut c, 1, &[(50, Established, Close)]).is_empty());
        assert_eq!(c.len(), 0, "a held record is no followed socket");
        let mut out = Vec::new();
        let sent = CauseKind::ResetSent { reason: Some(11) };
        c.on_cause(&cause(1, 50, Close, sent), &mut out);
        let t = one(out);
        assert_eq!(
            t.reset,
            Some(Reset {
                by: ResetBy::Local,
                reason: Some(11)
            })
        );
        assert_eq!(t.end_ns, 50 * MS);
    }

    #[test]
    fn a_reset_that_never_comes_releases_the_record_after_the_grace() {
        let mut c = Correlator::new(64).explaining_resets();
        feed(&mut c, 1, &OPEN);
        feed(&mut c, 2, &OPEN);
        assert!(feed(&mut c, 1, &[(50, Established, Close)]).is_empty());
        let mut out = Vec::new();
        // Events within the grace keep it; the clock alone within the wait too.
        feed(&mut c, 2, &[(55, Established, FinWait1)]);
        c.expire(50 * MS + RESET_WAIT_NS - 1, &mut out);
        assert!(out.is_empty());
        // An event past the grace releases it, without a reset.
        feed(&mut c, 2, &[(61, FinWait1, FinWait2)]);
        c.expire(61 * MS, &mut out);
        let t = one(out);
        assert_eq!((t.close, t.reset), (CloseKind::Reset, None));
        // The clock alone, past the wait.
        feed(&mut c, 3, &OPEN);
        assert!(feed(&mut c, 3, &[(70, Established, Close)]).is_empty());
        let mut out = Vec::new();
        c.expire(70 * MS + RESET_WAIT_NS, &mut out);
        assert_eq!(one(out).reset, None);
        // At exit, whatever is held.
        feed(&mut c, 4, &OPEN);
        assert!(feed(&mut c, 4, &[(80, Established, Close)]).is_empty());
        let mut out = Vec::new();
        c.release_held(&mut out);
        assert_eq!(out.len(), 1);
        // A correlator not fed resets holds nothing.
        let mut c = Correlator::new(64);
        feed(&mut c, 1, &OPEN);
        assert_eq!(
            one(feed(&mut c, 1, &[(50, Established, Close)])).reset,
            None
        );
    }

    #[test]
    fn fin_retransmits_count_in_the_phase_the_fin_waits_in() {
        let mut c = Correlator::new(64).explaining_resets();
        feed(&mut c, 1, &OPEN);
        feed(&mut c, 1, &[(10, Established, FinWait1)]);
        let mut out = Vec::new();
        for ms in [210, 610, 1410] {
            c.on_cause(&cause(1, ms, FinWait1, CauseKind::FinRetransmit), &mut out);
        }
        // Unknown sockets and states without a FIN in flight count nothing.
        c.on_cause(&cause(9, 20, FinWait1, CauseKind::FinRetransmit), &mut out);
        c.on_cause(
            &cause(1, 20, Established, CauseKind::FinRetransmit),
            &mut out,
        );
        assert!(out.is_empty());
        feed(&mut c, 1, &[(1500, FinWait1, FinWait2)]);
        c.on_cause(
            &cause(1, 1600, FinWait2, CauseKind::FinRetransmit),
            &mut out,
        );
        let t = c
            .lives
            .get(&1)
            .map(|life| life.fin_retransmits)
            .expect("followed");
        assert_eq!(t.iter().collect::<Vec<_>>(), vec![(Phase::FinWait1, 3)]);
        assert_eq!(t.get(Phase::LastAck), 0);
        let mut saturated = FinRetransmits::default();
        for _ in 0..300 {
            saturated.count(LastAck);
        }
        assert_eq!(saturated.get(Phase::LastAck), 255);
    }
}
