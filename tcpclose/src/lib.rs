//! tcpclose: how TCP connections end, measured in the kernel.
//!
//! The binary is thin; the pieces that do not touch the kernel live here so that they can be
//! tested and benchmarked without privileges.

pub mod accepted;
pub mod btf;
mod dense;
pub mod event;
pub mod hung;
pub mod kernel_layout;
mod phase;
pub mod render;
pub mod states;
pub mod stats;
pub mod teardown;
