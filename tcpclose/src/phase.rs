//! The teardown phases: the states a connection passes through while it closes. The correlation
//! engine times them and the hung thresholds watch them, so they live apart from both (the
//! engine re-exports them as `teardown::Phase`).

use crate::event::TcpState;

/// A teardown phase: a state a connection passes through while it closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    FinWait1,
    FinWait2,
    Closing,
    TimeWait,
    CloseWait,
    LastAck,
}

impl Phase {
    pub const ALL: [Phase; 6] = [
        Self::FinWait1,
        Self::FinWait2,
        Self::Closing,
        Self::TimeWait,
        Self::CloseWait,
        Self::LastAck,
    ];

    pub const fn state(self) -> TcpState {
        match self {
            Self::FinWait1 => TcpState::FinWait1,
            Self::FinWait2 => TcpState::FinWait2,
            Self::Closing => TcpState::Closing,
            Self::TimeWait => TcpState::TimeWait,
            Self::CloseWait => TcpState::CloseWait,
            Self::LastAck => TcpState::LastAck,
        }
    }

    pub const fn name(self) -> &'static str {
        self.state().name()
    }

    pub fn of(state: TcpState) -> Option<Phase> {
        Self::ALL.into_iter().find(|p| p.state() == state)
    }
}
