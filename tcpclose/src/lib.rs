//! tcpclose: how TCP connections end, measured in the kernel.
//!
//! Where to start reading:
//! - [`run`]: one run, from attaching the kernel programs ([`tracer`]) to the summary; it
//!   drains the ring buffer into the output mode's [`pipeline`].
//! - [`event`]: the kernel's records decoded (the ABI itself is `tcpclose-common`).
//! - [`teardown`]: the pure correlation engine: transitions and timer events in, teardown
//!   records and hung alerts ([`hung`]) out; no I/O, so it is tested with synthetic sequences
//!   and fuzzed.
//! - [`hang_check`] and [`sockets`]: hangs confirmed with sock_diag and named with their owners
//!   from `/proc`, on a thread of their own.
//! - [`render`], [`output`], [`metrics`]: what the user reads.
//!
//! The binary only parses the command line ([`cli`]) into [`settings`] and calls [`run::run`].

pub mod accepted;
pub mod btf;
pub mod cgroups;
pub mod cli;
pub mod clock;
mod dense;
pub mod event;
pub mod hang_check;
pub mod hung;
pub mod kernel_layout;
pub mod metrics;
pub mod output;
mod phase;
pub mod pipeline;
pub mod render;
pub mod reset_reasons;
pub mod run;
pub mod settings;
pub mod sockets;
pub mod states;
pub mod stats;
pub mod system;
pub mod teardown;
pub mod tracer;
