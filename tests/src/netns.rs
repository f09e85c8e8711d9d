//! Network namespaces of the test's own: their own TCP settings (sysctls) and firewall rules
//! (nftables), without touching the host's.
//!
//! A [`Netns`] is made with `ip netns add`, has its loopback up, and is deleted when dropped
//! (which also kills its timewait sockets). Sockets are made inside it by [`Netns::run`], on a
//! thread that first joins it (`setns`); a socket stays in its namespace wherever it is used from
//! afterwards, so the test's own thread can then read, shut down and close it.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use crate::run_ok;

/// A network namespace, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Makes a fresh namespace (named after `tag`, this process and a counter) with `lo` up.
    pub fn new(tag: &str) -> Self {
        crate::require_root();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tcpclose-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS`; panics unless it succeeds; returns its standard output.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = run_ok(Command::new("ip").args(["-n", &self.name]).args(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `argv` inside the namespace (`ip netns exec`); panics unless it succeeds; returns its
    /// standard output.
    pub fn exec(&self, argv: &[&str]) -> String {
        let out = run_ok(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .args(argv),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One nftables command in the namespace, e.g. `add table inet t`.
    pub fn nft(&self, command: &str) -> String {
        self.exec(&["nft", command])
    }

    /// Sets `key` (dotted, e.g. `net.ipv4.tcp_fin_timeout`) in the namespace and checks it took.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        // Network sysctls are those of the namespace of the thread that opens them.
        let now = self.run(|| {
            std::fs::write(&path, value).unwrap_or_else(|e| panic!("writing {path}: {e}"));
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
        });
        assert_eq!(now.trim(), value, "{key} in {}", self.name);
    }

    /// Runs `f` on a thread inside the namespace: sockets it makes belong to the namespace, and
    /// `/proc/thread-self/net/*` (see [`crate::tcp_state`]) shows the namespace's sockets.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    let ns = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
                    // SAFETY: setns(2) on a namespace fd; affects only this thread.
                    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let result = crate::spawn(
            Command::new("ip")
                .args(["netns", "del", &self.name])
                .stdin(std::process::Stdio::null()),
        )
        .and_then(|mut child| child.wait());
        match result {
            Ok(status) if status.success() => {}
            other => eprintln!("ip netns del {}: {other:?}", self.name),
        }
    }
}
