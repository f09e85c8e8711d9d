//! What tcpclose leaves behind and what it keeps: no program or map after it ends, however it
//! ends, and no more privilege than it needs once attached.

use std::{
    collections::BTreeSet,
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use tcpclose_tests::{Tracer, require_root};

/// tcpclose's programs, raw and typed, as the kernel names them (15 characters at most,
/// BPF_OBJ_NAME_LEN): a run loads seven of one set or the other (`--programs`): transitions,
/// timewait sockets, causes.
fn programs() -> Vec<String> {
    use tcpclose_common::{
        CAUSE_PROGRAMS, TIMER_PROGRAMS, TRANSITION_PROGRAM, TYPED_CAUSE_PROGRAMS,
        TYPED_TIMEWAIT_PROGRAMS, TYPED_TRANSITION_PROGRAM,
    };
    [TRANSITION_PROGRAM, TYPED_TRANSITION_PROGRAM]
        .into_iter()
        .chain(TIMER_PROGRAMS.map(|(name, _)| name))
        .chain(TYPED_TIMEWAIT_PROGRAMS.map(|(name, _)| name))
        .chain(CAUSE_PROGRAMS.map(|(name, _, _)| name))
        .chain(TYPED_CAUSE_PROGRAMS.map(|(name, _, _)| name))
        .map(|name| name.chars().take(15).collect())
        .collect()
}
const MAPS: [&str; 3] = ["EVENTS", "COUNTERS", "PORT_FILTER"];

/// The tests count what is loaded: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Ids of the loaded programs and maps named like tcpclose's.
fn ours() -> BTreeSet<(char, u32)> {
    let programs = programs();
    let mut ids = BTreeSet::new();
    // Another tracer of the test may unload between the kernel listing an id and opening it
    // (ENOENT): that one is gone, not an error.
    for info in aya::programs::loaded_programs() {
        let info = match info {
            Ok(info) => info,
            Err(aya::programs::ProgramError::SyscallError(e)) if vanished(&e) => continue,
            Err(e) => panic!("listing BPF programs: {e}"),
        };
        if info
            .name_as_str()
            .is_some_and(|n| programs.iter().any(|p| p == n))
        {
            ids.insert(('p', info.id()));
        }
    }
    for info in aya::maps::loaded_maps() {
        let info = match info {
            Ok(info) => info,
            Err(aya::maps::MapError::SyscallError(e)) if vanished(&e) => continue,
            Err(e) => panic!("listing BPF maps: {e}"),
        };
        if info.name_as_str().is_some_and(|n| MAPS.contains(&n)) {
            ids.insert(('m', info.id()));
        }
    }
    ids
}

fn vanished(e: &aya::sys::SyscallError) -> bool {
    e.io_error.raw_os_error() == Some(libc::ENOENT)
}

/// Waits until none of `ids` is loaded (the kernel frees them once the last reference goes,
/// after an RCU grace period).
fn gone(ids: &BTreeSet<(char, u32)>) -> Result<(), BTreeSet<(char, u32)>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: BTreeSet<_> = ours().intersection(ids).copied().collect();
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(left);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Starts tcpclose and returns it with the ids of what it loaded.
fn start() -> (Tracer, BTreeSet<(char, u32)>) {
    let before = ours();
    let tracer = Tracer::start(&["--port", "9"]);
    let loaded: BTreeSet<_> = ours().difference(&before).copied().collect();
    (tracer, loaded)
}

#[test]
fn nothing_stays_loaded_after_sigterm_or_sigkill() {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let (tracer, loaded) = start();
        let programs = loaded.iter().filter(|(k, _)| *k == 'p').count();
        let maps = loaded.iter().filter(|(k, _)| *k == 'm').count();
        assert_eq!(
            (programs, maps),
            (7, 3),
            "tcpclose's programs and maps while it runs: {loaded:?}"
        );
        let run = tracer.stop_with(signal);
        if signal == libc::SIGTERM {
            assert!(run.status.success(), "{run:?}");
        }
        if let Err(left) = gone(&loaded) {
            panic!("still loaded after signal {signal}: {left:?}");
        }
    }
}

#[test]
fn a_hundred_starts_and_stops_leave_the_kernel_as_it_was() {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_root();
    let before = ours();
    // Four at a time: about half a second each.
    let workers: Vec<_> = (0..4)
        .map(|_| {
            thread::spawn(|| {
                let mut all = BTreeSet::new();
                for _ in 0..25 {
                    let (tracer, loaded) = start();
                    let run = tracer.stop();
                    assert!(run.status.success(), "{run:?}");
                    all.extend(loaded);
                }
                all
            })
        })
        .collect();
    let mut loaded = BTreeSet::new();
    for w in workers {
        loaded.extend(w.join().expect("a start/stop worker"));
    }
    if let Err(left) = gone(&loaded) {
        panic!("after 100 runs, still loaded: {left:?}");
    }
    let after = ours();
    assert!(
        after.is_subset(&before),
        "programs or maps added by 100 runs: {:?}",
        after.difference(&before).collect::<Vec<_>>()
    );
}

/// Effective capability bits of `pid`.
fn effective_caps(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff line")
        .trim();
    u64::from_str_radix(hex, 16).expect("hex capabilities")
}

#[test]
fn capabilities_not_needed_after_attaching_are_dropped() {
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const CAP_DAC_READ_SEARCH: u64 = 2;
    const CAP_NET_ADMIN: u64 = 12;
    const CAP_SYS_PTRACE: u64 = 19;
    const CAP_SYS_ADMIN: u64 = 21;
    const CAP_SYSLOG: u64 = 34;
    const CAP_PERFMON: u64 = 38;
    const CAP_BPF: u64 = 39;
    let (tracer, _) = start();
    let caps = effective_caps(tracer.pid());
    for (cap, name) in [
        (CAP_BPF, "CAP_BPF"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_SYSLOG, "CAP_SYSLOG"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    ] {
        assert_eq!(caps & (1 << cap), 0, "{name} kept: {caps:#x}");
    }
    // Kept for naming the owners of hung sockets.
    for cap in [CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE, CAP_SYS_ADMIN] {
        assert_ne!(caps & (1 << cap), 0, "capability {cap} dropped: {caps:#x}");
    }
    // And it still works: the summary comes, read from the kernel's counters.
    let run = tracer.stop();
    assert!(run.status.success(), "{run:?}");
    assert_eq!(run.summary()["lost"], 0);
}
