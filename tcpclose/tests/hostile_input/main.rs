//! Hostile input: property-based fuzzing of the two places where outside data enters tcpclose.
//!
//! - The decoder ([`Record::decode`]) turns whatever bytes the ring buffer holds into records.
//!   Checked against a specification written here from the ABI's field offsets: every buffer is
//!   either decoded into exactly the fields it holds or refused for a defect it really has.
//! - The correlation engine ([`Correlator`]) follows sockets through their teardown. Fed
//!   arbitrary streams (impossible state pairs, addresses reused by unrelated sockets, clocks
//!   going backwards or jumping, timers of any substate and expiry), it must not panic, must stay
//!   under its cap, and what it emits must stay self-consistent. Fed plausible lives on a handful
//!   of reused addresses, it must report each connection exactly as a model of it says.
//!
//! Failures found by proptest are persisted in `tcpclose/proptest-regressions/hostile_input.txt`
//! (to be committed, so that every run replays them first); failures that were engine bugs are
//! also kept below as plain, named regression tests with the minimized sequence.
//!
//! Run longer with e.g. `PROPTEST_CASES=5000 cargo test --release -p tcpclose --test
//! hostile_input`.
//!
//! The modules: [`decoder`]; the engine fed hostile streams, made of [`ops`] (the pools of
//! addresses, the operations and their strategies), checked by an [`audit`] after each call
//! ([`engine`]: the streams and their properties); [`extreme_timestamps`]; [`reused_addresses`],
//! against a model; [`regressions`], the engine bugs the properties found.

use proptest::{prelude::*, test_runner::FileFailurePersistence};

mod audit;
mod decoder;
mod engine;
mod extreme_timestamps;
mod ops;
mod regressions;
mod reused_addresses;

pub(crate) const MS: u64 = 1_000_000;
pub(crate) const S: u64 = 1_000 * MS;

/// Where proptest keeps the seeds of the failures it found, replayed before new cases. The
/// default (`SourceParallel`) looks for a `lib.rs` next to the test file, which an integration
/// test does not have, and would fall back to a file beside this one: named explicitly instead.
const REGRESSIONS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/proptest-regressions/hostile_input.txt"
);

/// `cases` per property unless `PROPTEST_CASES` asks for more (or fewer): the defaults keep the
/// whole target to a few seconds in release on two cores.
pub(crate) fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(REGRESSIONS))),
        // Engine cases run thousands of steps: bound the minimization of a failure rather than
        // let it run for hours (a bounded one is still replayed from its persisted seed).
        max_shrink_iters: 20_000,
        ..ProptestConfig::default()
    }
}
