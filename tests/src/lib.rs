//! Helpers for the integration tests: run the real `tcpclose` binary, make real sockets, read what
//! it printed.
//!
//! These tests need root and a kernel that can load the program. They never skip: a machine that
//! cannot run them fails them, with the reason.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// The binary under test: `$TCPCLOSE_BIN` (set by `cargo xtask test`), else the release build.
pub fn binary() -> PathBuf {
    let path = std::env::var_os("TCPCLOSE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/tcpclose")
        });
    assert!(
        path.is_file(),
        "{} does not exist: run the tests with `cargo xtask test`, which builds it",
        path.display()
    );
    path
}

pub fn require_root() {
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests load eBPF programs and must run as root"
    );
}

/// A running `tcpclose --json`.
pub struct Tracer {
    child: Child,
    stdout: thread::JoinHandle<String>,
    stderr: mpsc::Receiver<String>,
    stderr_seen: String,
}

/// What a finished run printed.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub records: Vec<Value>,
    pub stderr: String,
}

impl Tracer {
    /// Starts `tcpclose --json ARGS` and waits until it has attached.
    pub fn start(args: &[&str]) -> Self {
        require_root();
        let mut child = Command::new(binary())
            .arg("--json")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning tcpclose");
        let mut out = child.stdout.take().expect("stdout");
        let stdout = thread::spawn(move || {
            let mut s = String::new();
            out.read_to_string(&mut s)
                .expect("reading tcpclose's stdout");
            s
        });
        let err = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut tracer = Self {
            child,
            stdout,
            stderr: rx,
            stderr_seen: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tracer.stderr.recv_timeout(left) {
                Ok(line) => {
                    tracer.stderr_seen.push_str(&line);
                    tracer.stderr_seen.push('\n');
                    if line.starts_with("Tracing") {
                        return tracer;
                    }
                }
                Err(_) => {
                    let _ = tracer.child.kill();
                    let status = tracer.child.wait().expect("waiting for tcpclose");
                    panic!(
                        "tcpclose did not attach ({status}); stderr:\n{}",
                        tracer.stderr_seen
                    );
                }
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `signal`, waits for the exit, returns everything it printed.
    pub fn stop_with(self, signal: i32) -> Run {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.pid(), signal) };
        self.wait(Duration::from_secs(20))
    }

    pub fn stop(self) -> Run {
        self.stop_with(libc::SIGINT)
    }

    /// Waits for the process to exit by itself (e.g. `--duration`).
    pub fn wait(mut self, timeout: Duration) -> Run {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for tcpclose") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("tcpclose did not exit within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(20));
        };
        let stdout = self.stdout.join().expect("stdout reader");
        let mut stderr = self.stderr_seen;
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_secs(2)) {
            stderr.push_str(&line);
            stderr.push('\n');
        }
        let records = stdout
            .lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
            })
            .collect();
        Run {
            status,
            records,
            stderr,
        }
    }
}

impl Run {
    pub fn of_type<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.records.iter().filter(move |r| r["type"] == kind)
    }

    pub fn transitions(&self) -> Vec<&Value> {
        self.of_type("transition").collect()
    }

    pub fn summary(&self) -> &Value {
        let summaries: Vec<_> = self.of_type("summary").collect();
        assert_eq!(
            summaries.len(),
            1,
            "exactly one summary record: {:?}",
            self.stderr
        );
        assert_eq!(
            self.records.last().map(|r| &r["type"]),
            Some(&Value::from("summary")),
            "the summary comes last"
        );
        summaries[0]
    }

    /// Transitions grouped by socket (kernel address), in order.
    pub fn by_socket(&self) -> BTreeMap<String, Vec<&Value>> {
        let mut map = BTreeMap::<String, Vec<&Value>>::new();
        for t in self.transitions() {
            map.entry(t["skaddr"].as_str().expect("skaddr").to_owned())
                .or_default()
                .push(t);
        }
        map
    }
}

/// Makes `n` connections to `listener` and closes them, accepting on a thread.
pub fn churn(listener: &std::net::TcpListener, n: usize) {
    let addr = listener.local_addr().unwrap();
    let l = listener.try_clone().unwrap();
    let acceptor = thread::spawn(move || {
        for _ in 0..n {
            let (s, _) = l.accept().expect("accept");
            drop(s);
        }
    });
    for _ in 0..n {
        drop(std::net::TcpStream::connect(addr).expect("connect"));
    }
    acceptor.join().unwrap();
}

/// `OLD->NEW` of a transition record.
pub fn arrow(t: &Value) -> String {
    format!(
        "{}->{}",
        t["old"].as_str().unwrap_or("?"),
        t["new"].as_str().unwrap_or("?")
    )
}

/// The calling thread's `comm`, as the kernel reports it.
pub fn thread_comm() -> String {
    std::fs::read_to_string("/proc/thread-self/comm")
        .expect("reading /proc/thread-self/comm")
        .trim_end()
        .to_owned()
}

/// Runs the binary to completion with `args` (no --json added).
pub fn run_binary(cmd: &mut Command) -> (ExitStatus, String, String) {
    let out = cmd.stdin(Stdio::null()).output().expect("running tcpclose");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A TCP socket bound to `ip` on a free port, not yet listening: lets a test learn its port,
/// start a tracer filtering on it, and only then `listen()` (so the tracer sees CLOSE -> LISTEN).
pub struct BoundSocket {
    fd: std::os::fd::OwnedFd,
    pub port: u16,
}

impl BoundSocket {
    pub fn new(ip: std::net::IpAddr) -> Self {
        use std::os::fd::FromRawFd;
        let family = if ip.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: plain socket(2); the fd is owned right away.
        let raw = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: `raw` is a fresh, valid fd that nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let (storage, len) = sockaddr(std::net::SocketAddr::new(ip, 0));
        // SAFETY: `storage` holds a sockaddr of `len` bytes.
        let rc = unsafe { libc::bind(raw, (&raw const storage).cast(), len) };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        // SAFETY: a zeroed sockaddr_storage is valid to fill.
        let mut bound: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut bound_len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: out-parameters sized as declared.
        let rc = unsafe { libc::getsockname(raw, (&raw mut bound).cast(), &mut bound_len) };
        assert_eq!(rc, 0, "getsockname: {}", std::io::Error::last_os_error());
        // Both sockaddr_in and sockaddr_in6 keep the port, big-endian, right after the family.
        // SAFETY: the storage is at least 4 bytes long and was filled by the kernel.
        let port = u16::from_be(unsafe { *(&raw const bound).cast::<u16>().add(1) });
        Self { fd, port }
    }

    pub fn listen(self) -> std::net::TcpListener {
        use std::os::fd::AsRawFd;
        // SAFETY: valid socket fd.
        let rc = unsafe { libc::listen(self.fd.as_raw_fd(), 128) };
        assert_eq!(rc, 0, "listen: {}", std::io::Error::last_os_error());
        std::net::TcpListener::from(self.fd)
    }
}

fn sockaddr(addr: std::net::SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: a zeroed sockaddr_storage is valid; it is large enough for either family.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        std::net::SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        std::net::SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6 and suitably aligned.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}
