//! Hung sockets are checked with the kernel and named with their owners before they are
//! reported: sock_diag for the socket (is it still there, in that state, which inode), `/proc`
//! for the processes holding it. That costs milliseconds per network namespace and per thousand
//! processes, and seconds when thousands of sockets hang at once, which is exactly when tcpclose
//! must keep reading the ring. So it happens on a thread of its own ([`HangChecker`]), in passes:
//! one pass takes every check asked for since the last one, makes at most one dump of each
//! network namespace's sockets and one walk of `/proc`, and answers them all. The thread that
//! drains the ring only queues checks and applies answers ([`PendingAlerts`]), in order.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::SocketAddr,
    sync::mpsc,
    thread,
};

use crate::{
    event::TcpState,
    hung::{Alert, AlertKind, Holder, SocketKey},
    teardown::{ExistingSocket, Phase, TIMEWAIT_LEN_NS},
};
use anyhow::{Context as _, Result};

use crate::sockets::{self, SocketInfo};

/// Checks of at most this many hangs wait at once; hangs found beyond it are reported at a
/// later sweep (counted as deferred), so memory stays bounded however many sockets hang.
pub const MAX_PENDING: usize = 65_536;

/// Up to this many checks in one pass are answered with exact lookups; more with one dump of
/// every network namespace.
const LOOKUPS_PER_PASS: usize = 8;

/// What the kernel says of a hang the engine wants to report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The socket is there, in the hung state (`inode` 0: no file refers to it), waiting on
    /// what `waiting` says (full sockets only).
    Confirmed {
        inode: u64,
        waiting: Option<Waiting>,
    },
    /// No full socket has its 4-tuple any more, in any namespace: its end was missed.
    Gone,
    /// The full socket is gone, but a timewait socket with its 4-tuple is in the hung state:
    /// the handoff to it was missed. Reported, and followed on as that timewait socket.
    HandedOver,
    /// Its 4-tuple is there in another state: the engine is behind the kernel.
    Elsewhere,
    /// A timewait socket the engine has in FIN_WAIT2 is in TIME_WAIT, since about `since_ns`
    /// (from its timer's remaining time): the peer's FIN came without a timer event.
    InTimeWait { since_ns: u64 },
    /// No timewait socket has its 4-tuple any more.
    TimewaitGone,
    /// The kernel could not be asked: reported as the engine has it.
    Unknown,
}

/// What a hung full socket waits on, as sock_diag shows it when its hang is checked: whether the
/// application still reads (CLOSE_WAIT with bytes unread, or none), whether the peer takes what
/// is sent (a send queue that does not drain, retransmissions, a zero window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiting {
    /// Bytes received and not read by the application (`ss`'s Recv-Q): the peer's FIN counts
    /// one until the application reads it.
    pub recv_queue: u32,
    /// Bytes not yet acknowledged by the peer, sent or not (`ss`'s Send-Q).
    pub send_queue: u32,
    /// How many times the segment the retransmission timer waits on was sent again (0 when that
    /// timer is not armed).
    pub retransmits: u8,
    /// The peer advertises a zero window: the zero-window probe timer is armed.
    pub zero_window: bool,
}

impl Waiting {
    fn of(info: &SocketInfo) -> Self {
        use sockets::TimerKind;
        let timer = |kind| info.timer.filter(|t| t.kind == kind);
        Self {
            recv_queue: info.recv_queue,
            send_queue: info.send_queue,
            retransmits: timer(TimerKind::Retransmit).map_or(0, |t| t.retransmits),
            zero_window: timer(TimerKind::ZeroWindowProbe).is_some(),
        }
    }
}

/// Whether `alert` waits for the kernel's word before it is reported: hangs of full sockets
/// (a missed transition would make one seem stuck) and FIN_WAIT2 hangs of timewait sockets (the
/// peer's FIN may have come without an event). Resolutions and evictions need none.
pub fn needs_check(alert: &Alert) -> bool {
    matches!(alert.kind, AlertKind::Hung { .. })
        && match alert.key {
            SocketKey::Full(_) | SocketKey::Existing(..) => true,
            SocketKey::Timewait(_) => alert.phase == Phase::FinWait2,
        }
}

/// Judges `alert` from `found`, the sockets with its 4-tuple in every network namespace; `now_ns`
/// is when they were read.
pub fn judge(alert: &Alert, found: &[&SocketInfo], now_ns: u64) -> Verdict {
    if let SocketKey::Timewait(_) = alert.key {
        let timewait = || found.iter().filter(|i| i.timewait);
        if timewait().any(|i| i.state == alert.phase.state()) {
            return Verdict::Confirmed {
                inode: 0,
                waiting: None,
            };
        }
        return match timewait()
            .filter(|i| i.state == TcpState::TimeWait)
            .find_map(|i| i.timewait_remaining_ms())
        {
            Some(remaining_ms) => {
                let elapsed_ns =
                    TIMEWAIT_LEN_NS.saturating_sub(u64::from(remaining_ms) * 1_000_000);
                Verdict::InTimeWait {
                    since_ns: now_ns.saturating_sub(elapsed_ns),
                }
            }
            None => Verdict::TimewaitGone,
        };
    }
    // A socket found by a snapshot may have become a timewait socket since (an orphan).
    let existing = matches!(alert.key, SocketKey::Existing(..));
    let full = || found.iter().filter(|i| existing || !i.timewait);
    // Containers reuse addresses (127.0.0.1 in each): of the sockets with this 4-tuple in any
    // namespace, the one in the hung state.
    if let Some(info) = full().find(|i| i.state == alert.phase.state()) {
        return Verdict::Confirmed {
            inode: info.inode,
            waiting: Some(Waiting::of(info)),
        };
    }
    if full().next().is_some() {
        Verdict::Elsewhere
    } else if found
        .iter()
        .any(|i| i.timewait && i.state == alert.phase.state())
    {
        Verdict::HandedOver
    } else {
        Verdict::Gone
    }
}

/// One check asked of the [`HangChecker`].
#[derive(Debug)]
pub struct Request {
    pub id: u64,
    pub alert: Alert,
    /// Name the processes holding the socket too (a hang reported for the first time).
    pub wants_holders: bool,
}

/// The answer to a [`Request`].
#[derive(Debug)]
pub struct Answer {
    pub id: u64,
    pub verdict: Verdict,
    /// The processes holding the socket, when asked for and it was confirmed with a file.
    pub holders: Option<Vec<Holder>>,
}

/// What the [`HangChecker`] is asked.
enum Job {
    Checks(Vec<Request>),
    /// List the sockets in these states, in every network namespace.
    Census(Vec<TcpState>),
}

/// What the [`HangChecker`] answers.
#[derive(Debug)]
pub enum Reply {
    Answers(Vec<Answer>),
    /// The sockets in a teardown state, in every network namespace (see
    /// [`HangChecker::census`]).
    Census(Vec<ExistingSocket>),
}

/// The thread that answers hang checks. Dropping it ends the thread once its pass is over.
pub struct HangChecker {
    requests: mpsc::Sender<Job>,
}

impl HangChecker {
    /// Starts the thread. It keeps the capabilities of the calling thread (threads inherit
    /// them): start it once the unneeded ones are dropped.
    pub fn start() -> Result<(Self, tokio::sync::mpsc::UnboundedReceiver<Reply>)> {
        let (requests, inbox) = mpsc::channel::<Job>();
        let (outbox, replies) = tokio::sync::mpsc::unbounded_channel();
        thread::Builder::new()
            .name("tcpclose-hung".into())
            .spawn(move || {
                while let Ok(job) = inbox.recv() {
                    // Everything asked since the last pass, in one pass.
                    let (mut batch, mut census) = (Vec::new(), None);
                    for job in std::iter::once(job).chain(inbox.try_iter()) {
                        match job {
                            Job::Checks(checks) => batch.extend(checks),
                            Job::Census(states) => census = Some(states),
                        }
                    }
                    if let Some(states) = census
                        && outbox.send(Reply::Census(take_census(&states))).is_err()
                    {
                        break;
                    }
                    if !batch.is_empty() && outbox.send(Reply::Answers(answer(batch))).is_err() {
                        break;
                    }
                }
            })
            .context("starting the thread that checks hung sockets")?;
        Ok((Self { requests }, replies))
    }

    /// Queues `batch` for the next pass; never waits.
    pub fn ask(&self, batch: Vec<Request>) {
        if !batch.is_empty() {
            // Fails only once the thread is gone; the pending alerts are then released
            // unchecked at exit.
            let _ = self.requests.send(Job::Checks(batch));
        }
    }

    /// Asks for the sockets in a teardown state in every namespace, for the engine to follow
    /// those whose events it missed ([`Correlator::reconcile`]); never waits.
    ///
    /// [`Correlator::reconcile`]: crate::teardown::Correlator::reconcile
    pub fn census(&self, states: Vec<TcpState>) {
        if !states.is_empty() {
            let _ = self.requests.send(Job::Census(states));
        }
    }
}

/// The sockets in `states`, in every network namespace, as the engine adopts them. The kernel
/// leaves the other states out of its dumps: under churn, these are few unless they hang.
fn take_census(states: &[TcpState]) -> Vec<ExistingSocket> {
    let seen_ns = crate::clock::now_ns();
    match sockets::snapshot_all_namespaces_in(states) {
        Ok(all) => all
            .into_iter()
            .map(|s| ExistingSocket {
                family: s.family,
                local: s.local,
                remote: s.remote,
                state: s.state,
                seen_ns,
                placement: s.placement(),
            })
            .collect(),
        Err(err) => {
            eprintln!("tcpclose: warning: cannot list sockets to find missed hangs: {err:#}");
            Vec::new()
        }
    }
}

/// One pass: the kernel's sockets for every request, then the owners of the new hangs.
fn answer(batch: Vec<Request>) -> Vec<Answer> {
    let now_ns = crate::clock::now_ns();
    let found = SocketsFound::read(&batch);
    let mut answers: Vec<Answer> = batch
        .iter()
        .map(|r| Answer {
            id: r.id,
            verdict: match found.of(r.alert.local, r.alert.remote) {
                Some(sockets) => judge(&r.alert, &sockets, now_ns),
                None => Verdict::Unknown,
            },
            holders: None,
        })
        .collect();
    // One walk of /proc for the sockets whose holders are wanted.
    let wanted: HashSet<u64> = batch
        .iter()
        .zip(&answers)
        .filter_map(|(r, a)| match a.verdict {
            Verdict::Confirmed { inode, .. } if r.wants_holders && inode != 0 => Some(inode),
            _ => None,
        })
        .collect();
    if wanted.is_empty() {
        return answers;
    }
    match sockets::ProcessIndex::scan(&wanted) {
        Ok(index) => {
            for (r, a) in batch.iter().zip(&mut answers) {
                if let (true, Verdict::Confirmed { inode, .. }) = (r.wants_holders, a.verdict)
                    && inode != 0
                {
                    a.holders = Some(index.owners_of(inode).to_vec());
                }
            }
        }
        Err(err) => eprintln!("tcpclose: warning: cannot read /proc to name owners: {err:#}"),
    }
    answers
}

/// The sockets the kernel has with the 4-tuples of a pass's requests.
enum SocketsFound {
    /// One dump of every namespace, by 4-tuple.
    Dump(HashMap<(SocketAddr, SocketAddr), Vec<SocketInfo>>),
    /// Exact lookups, by 4-tuple; `None` where the lookup failed.
    Lookups(HashMap<(SocketAddr, SocketAddr), Option<Vec<SocketInfo>>>),
    /// The dump failed: nothing can be told.
    Nothing,
}

impl SocketsFound {
    fn read(batch: &[Request]) -> Self {
        let tuples: HashSet<(SocketAddr, SocketAddr)> = batch
            .iter()
            .filter(|r| needs_check(&r.alert) || r.wants_holders)
            .map(|r| (r.alert.local, r.alert.remote))
            .collect();
        if tuples.len() <= LOOKUPS_PER_PASS {
            return Self::Lookups(
                tuples
                    .into_iter()
                    .map(|(l, r)| ((l, r), sockets::lookup_all_namespaces(l, r).ok()))
                    .collect(),
            );
        }
        match sockets::snapshot_all_namespaces() {
            Ok(all) => {
                let mut by_tuple: HashMap<_, Vec<_>> = HashMap::new();
                for info in all {
                    if tuples.contains(&(info.local, info.remote)) {
                        by_tuple
                            .entry((info.local, info.remote))
                            .or_default()
                            .push(info);
                    }
                }
                Self::Dump(by_tuple)
            }
            Err(err) => {
                eprintln!("tcpclose: warning: cannot list sockets to check hangs: {err:#}");
                Self::Nothing
            }
        }
    }

    /// The sockets with this 4-tuple; `None` when it could not be told.
    fn of(&self, local: SocketAddr, remote: SocketAddr) -> Option<Vec<&SocketInfo>> {
        match self {
            Self::Dump(by_tuple) => Some(
                by_tuple
                    .get(&(local, remote))
                    .map(|found| found.iter().collect())
                    .unwrap_or_default(),
            ),
            Self::Lookups(by_tuple) => by_tuple
                .get(&(local, remote))?
                .as_ref()
                .map(|found| found.iter().collect()),
            Self::Nothing => None,
        }
    }
}

/// An alert on its way out: waiting for its check, or ready.
#[derive(Debug)]
struct Slot {
    alert: Alert,
    answer: Option<(Verdict, Option<Vec<Holder>>)>,
}

/// The alerts the engine has made, in the order it made them, until each can be reported:
/// at once for those that need no check, at their answer for the others. An alert never
/// overtakes an earlier one, so a socket's resolution never comes before its hang.
#[derive(Debug, Default)]
pub struct PendingAlerts {
    slots: VecDeque<Slot>,
    /// The id of `slots[0]`.
    first_id: u64,
    /// Checks under way.
    checking: usize,
}

impl PendingAlerts {
    /// Whether another check fits (see [`MAX_PENDING`]).
    pub fn has_room(&self) -> bool {
        self.checking < MAX_PENDING
    }

    /// Queues `alert`; returns the request to send when it needs a check.
    pub fn push(&mut self, alert: Alert) -> Option<Request> {
        let id = self.first_id + self.slots.len() as u64;
        let check = needs_check(&alert);
        let request = check.then(|| Request {
            id,
            wants_holders: matches!(alert.kind, AlertKind::Hung { again: false, .. })
                && !matches!(alert.key, SocketKey::Timewait(_)),
            alert: alert.clone(),
        });
        self.checking += usize::from(check);
        self.slots.push_back(Slot {
            alert,
            answer: (!check).then_some((Verdict::Unknown, None)),
        });
        request
    }

    /// Records the answer to check `answer.id`.
    pub fn answered(&mut self, answer: Answer) {
        let Some(at) = answer.id.checked_sub(self.first_id) else {
            return;
        };
        if let Some(slot) = self.slots.get_mut(at as usize)
            && slot.answer.is_none()
        {
            slot.answer = Some((answer.verdict, answer.holders));
            self.checking -= 1;
        }
    }

    /// The alerts ready from the front, in order, with their verdict and the holders found.
    /// With `all`, also those still waiting, as [`Verdict::Unknown`] (at exit).
    pub fn ready(
        &mut self,
        all: bool,
    ) -> impl Iterator<Item = (Alert, Verdict, Option<Vec<Holder>>)> + '_ {
        std::iter::from_fn(move || {
            let front = self.slots.front()?;
            if front.answer.is_none() && !all {
                return None;
            }
            let slot = self.slots.pop_front()?;
            self.first_id += 1;
            let (verdict, holders) = match slot.answer {
                Some(answer) => answer,
                None => {
                    self.checking -= 1;
                    (Verdict::Unknown, None)
                }
            };
            Some((slot.alert, verdict, holders))
        })
    }

    /// Checks under way.
    pub fn checking(&self) -> usize {
        self.checking
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use crate::event::{Family, TcpState};

    use super::*;

    const MS: u64 = 1_000_000;

    fn alert(kind: AlertKind, phase: Phase, key: SocketKey) -> Alert {
        Alert {
            kind,
            phase,
            ts_ns: 100_000 * MS,
            since_ns: 10_000 * MS,
            since_is_lower_bound: false,
            family: Family::Ipv4,
            local: "10.0.0.1:80".parse().unwrap(),
            remote: "10.0.0.2:5000".parse().unwrap(),
            owner: None,
            key,
            placement: crate::event::Placement::default(),
        }
    }

    fn hung(again: bool) -> AlertKind {
        AlertKind::Hung {
            age_ns: 90_000 * MS,
            again,
        }
    }

    fn socket(state: TcpState, timewait: bool, inode: u64, remaining_ms: u32) -> SocketInfo {
        let local: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let remote: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        SocketInfo {
            family: Family::Ipv4,
            local,
            remote,
            state,
            timewait,
            inode,
            uid: 0,
            cookie: 1,
            recv_queue: 0,
            send_queue: 0,
            timer: timewait.then_some(sockets::Timer {
                kind: sockets::TimerKind::TimeWait,
                expires_ms: remaining_ms,
                retransmits: 0,
            }),
            last_data_recv_ms: None,
            last_ack_recv_ms: None,
            netns: 1,
            cgroup: 0,
        }
    }

    #[test]
    fn a_full_sockets_hang_is_confirmed_by_the_socket_in_that_state() {
        let a = alert(hung(false), Phase::CloseWait, SocketKey::Full(1));
        let mut in_state = socket(TcpState::CloseWait, false, 42, 0);
        in_state.recv_queue = 1001;
        in_state.send_queue = 7;
        in_state.timer = Some(sockets::Timer {
            kind: sockets::TimerKind::Retransmit,
            expires_ms: 200,
            retransmits: 3,
        });
        let other = socket(TcpState::LastAck, false, 43, 0);
        // The same 4-tuple in another namespace, in another state, does not matter; what the
        // socket in the hung state waits on comes with it.
        assert_eq!(
            judge(&a, &[&other, &in_state], 0),
            Verdict::Confirmed {
                inode: 42,
                waiting: Some(Waiting {
                    recv_queue: 1001,
                    send_queue: 7,
                    retransmits: 3,
                    zero_window: false,
                }),
            }
        );
        in_state.timer = Some(sockets::Timer {
            kind: sockets::TimerKind::ZeroWindowProbe,
            expires_ms: 200,
            retransmits: 2,
        });
        let Verdict::Confirmed {
            waiting: Some(waiting),
            ..
        } = judge(&a, &[&in_state], 0)
        else {
            panic!("confirmed, with what it waits on");
        };
        assert!(
            waiting.zero_window && waiting.retransmits == 0,
            "{waiting:?}"
        );
        assert_eq!(judge(&a, &[&other], 0), Verdict::Elsewhere);
        assert_eq!(judge(&a, &[], 0), Verdict::Gone);
        // A timewait socket with the same 4-tuple is not the full socket.
        let tw = socket(TcpState::TimeWait, true, 0, 1000);
        assert_eq!(judge(&a, &[&tw], 0), Verdict::Gone);
        // Unless the engine missed the handoff to it: it holds the hang on.
        let fw2 = alert(hung(false), Phase::FinWait2, SocketKey::Full(1));
        let orphan = socket(TcpState::FinWait2, true, 0, 30_000);
        assert_eq!(judge(&fw2, &[&orphan], 0), Verdict::HandedOver);
        assert_eq!(judge(&fw2, &[&tw], 0), Verdict::Gone);
    }

    #[test]
    fn a_timewait_sockets_fin_wait2_hang_is_checked_against_its_substate() {
        let a = alert(hung(false), Phase::FinWait2, SocketKey::Timewait(7));
        let fw2 = socket(TcpState::FinWait2, true, 0, 30_000);
        assert_eq!(
            judge(&a, &[&fw2], 0),
            Verdict::Confirmed {
                inode: 0,
                waiting: None
            }
        );
        // In TIME_WAIT with 59 s left: it entered it a second before the lookup.
        let tw = socket(TcpState::TimeWait, true, 0, 59_000);
        assert_eq!(
            judge(&a, &[&tw], 100_000 * MS),
            Verdict::InTimeWait {
                since_ns: 99_000 * MS
            }
        );
        assert_eq!(judge(&a, &[], 0), Verdict::TimewaitGone);
        assert!(needs_check(&a));
        // TIME_WAIT hangs are not checked: nothing can make one seem longer than it is.
        assert!(!needs_check(&alert(
            hung(false),
            Phase::TimeWait,
            SocketKey::Timewait(7)
        )));
    }

    #[test]
    fn alerts_come_out_in_order_each_once_answered() {
        let mut pending = PendingAlerts::default();
        let first = pending
            .push(alert(hung(false), Phase::CloseWait, SocketKey::Full(1)))
            .expect("a check");
        assert!(first.wants_holders);
        let second = pending
            .push(alert(hung(true), Phase::CloseWait, SocketKey::Full(2)))
            .expect("a check");
        assert!(!second.wants_holders, "holders were found the first time");
        // A resolution needs no check, but waits for the alerts before it.
        let resolved = AlertKind::Resolved { stuck_ns: 5 };
        assert!(
            pending
                .push(alert(resolved, Phase::CloseWait, SocketKey::Full(3)))
                .is_none()
        );
        assert_eq!(pending.checking(), 2);
        assert_eq!(pending.ready(false).count(), 0);
        pending.answered(Answer {
            id: second.id,
            verdict: Verdict::Gone,
            holders: None,
        });
        assert_eq!(
            pending.ready(false).count(),
            0,
            "the first is still checked"
        );
        pending.answered(Answer {
            id: first.id,
            verdict: Verdict::Confirmed {
                inode: 9,
                waiting: None,
            },
            holders: Some(Vec::new()),
        });
        let out: Vec<_> = pending.ready(false).collect();
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].0.key, SocketKey::Full(1));
        assert_eq!(
            out[0].1,
            Verdict::Confirmed {
                inode: 9,
                waiting: None
            }
        );
        assert_eq!(out[1].1, Verdict::Gone);
        assert_eq!(out[2].0.kind, resolved);
        assert!(pending.is_empty());
        assert_eq!(pending.checking(), 0);
        // Ids go on after the queue has emptied; a stale answer changes nothing.
        let third = pending
            .push(alert(hung(false), Phase::LastAck, SocketKey::Full(4)))
            .expect("a check");
        assert_eq!(third.id, 3);
        pending.answered(Answer {
            id: 0,
            verdict: Verdict::Gone,
            holders: None,
        });
        assert_eq!(pending.checking(), 1);
        // At exit, what is still waiting comes out unchecked.
        let out: Vec<_> = pending.ready(true).collect();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1, Verdict::Unknown);
        assert_eq!(pending.checking(), 0);
    }
}
