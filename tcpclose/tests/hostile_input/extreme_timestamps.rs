//! Extreme timestamps: times the clock never reaches, at its ends (`u64::MAX` is the engine's
//! "unknown"), fed to the engine in any order.

use proptest::{collection::vec, prelude::*};

use crate::{
    S,
    audit::Mode,
    config,
    engine::Stream,
    ops::{Op, op, thresholds},
};

/// Timestamps the clock never reaches, at its ends (`u64::MAX` is the engine's "unknown"):
/// tolerated without a panic, the cap still holding.
fn extreme_timestamps() -> impl Strategy<Value = Vec<(u64, Op)>> {
    let ts = prop_oneof![
        Just(0),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX - 1),
        (u64::MAX - 200 * S..=u64::MAX),
        any::<u64>(),
    ];
    vec((ts, op()), 1..500)
}

proptest! {
    #![proptest_config(config(200))]

    #[test]
    fn extreme_timestamps_never_panic(
        steps in extreme_timestamps(),
        thresholds in thresholds(),
        as_run in any::<bool>(),
    ) {
        let mut stream = Stream::new(8, thresholds, true, as_run);
        stream.audit.mode = Mode::Extreme;
        for (ts, op) in steps {
            let mut clock = ts;
            stream.feed(op, &mut clock)?;
        }
        stream.drain()?;
    }
}
