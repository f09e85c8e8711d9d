//! The kernel's clock: CLOCK_MONOTONIC, in which `bpf_ktime_get_ns()` stamps every record.

/// CLOCK_MONOTONIC now, in ns: comparable with the records' `ts_ns`.
pub fn now_ns() -> u64 {
    u64::try_from(crate::render::clock_ns(libc::CLOCK_MONOTONIC)).unwrap_or(0)
}
