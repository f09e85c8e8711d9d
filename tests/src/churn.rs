//! Connection churn: loopback connections made and closed, for tracers to follow.
//!
//! - [`churn`]: a given number of connections to a given listener, the client closing first;
//!   every connect and accept under a deadline (a test's workload).
//! - [`timed`]: client/server pairs in a network namespace, as fast as they go for a while, the
//!   server closing first (the bench's and the soak's load, and a test's background traffic).

use std::{
    io::{self, Read as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::{netns::Netns, set_receive_timeout};

/// Makes `n` connections to `listener` and closes them, accepting on a thread. Each connect and
/// accept has a deadline of 30 s (a dropped SYN is retried after a second): a connection that
/// never comes fails the test instead of hanging it. Returns once every connection has closed
/// (see [`settle`]): the transitions they make have all happened.
pub fn churn(listener: &TcpListener, n: usize) {
    const DEADLINE: Duration = Duration::from_secs(30);
    let addr = listener.local_addr().unwrap();
    let l = listener.try_clone().unwrap();
    set_receive_timeout(&l, DEADLINE);
    let acceptor = thread::spawn(move || {
        for i in 0..n {
            let (s, _) = l
                .accept()
                .unwrap_or_else(|e| panic!("accepting connection {i} of {n}: {e}"));
            drop(s);
        }
    });
    for i in 0..n {
        drop(
            TcpStream::connect_timeout(&addr, DEADLINE)
                .unwrap_or_else(|e| panic!("connection {i} of {n}: {e}")),
        );
    }
    acceptor.join().unwrap();
    settle(addr, DEADLINE);
}

/// Waits (at most `timeout`) until every connection to `server` is closed on both sides: gone, or
/// a timewait socket in TIME_WAIT, which changes no more until it expires, or in FIN_WAIT2 with
/// no peer left to send the FIN it waits for (the 6.1 guest's CI run, overloaded, once left one
/// so for 30 s: only tcp_fin_timeout ends it). On a fast machine the closes are done when the
/// `close()` calls return; an emulated guest may leave loopback's softirq work to ksoftirqd, for
/// milliseconds.
pub fn settle(server: SocketAddr, timeout: Duration) {
    use crate::tcp_state::{FIN_WAIT2, LISTEN, TIME_WAIT};
    let deadline = Instant::now() + timeout;
    loop {
        let sockets = crate::tcp_sockets(server.is_ipv4());
        let open: Vec<_> = sockets
            .iter()
            .copied()
            .filter(|&(l, r, state)| {
                let peer_gone = || !sockets.iter().any(|&(pl, pr, _)| (pl, pr) == (r, l));
                let settled =
                    state == LISTEN || state == TIME_WAIT || (state == FIN_WAIT2 && peer_gone());
                (l == server || r == server) && !settled
            })
            .collect();
        if open.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "connections to {server} still closing after {timeout:?}: {open:?}"
        );
        thread::sleep(Duration::from_millis(2));
    }
}

/// Loopback addresses the timed churn's clients connect to in turn, so that 4-tuples are not
/// reused too soon.
const CLIENT_ADDRS: u8 = 64;

/// What a [`timed`] churn did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Churned {
    pub connections: u64,
    /// CPU time of its threads (clients and servers, the kernel's work in their context
    /// included), in ns.
    pub cpu_ns: u64,
}

impl std::ops::Add for Churned {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            connections: self.connections + other.connections,
            cpu_ns: self.cpu_ns + other.cpu_ns,
        }
    }
}

/// Runs `pairs` client/server pairs in `netns` for `period`.
pub fn timed(netns: &Netns, pairs: usize, period: Duration) -> io::Result<Churned> {
    let deadline = Instant::now() + period;
    thread::scope(|scope| {
        let handles: Vec<_> = (0..pairs)
            .map(|_| scope.spawn(|| pair(netns, deadline)))
            .collect();
        let mut total = Churned::default();
        for handle in handles {
            total = total
                + handle
                    .join()
                    .map_err(|_| io::Error::other("a churn thread panicked"))??;
        }
        Ok(total)
    })
}

/// One client/server pair, each on its own thread inside `netns`: the client connects as fast as
/// it can until `deadline` while the server accepts and closes at once. The server closes first,
/// so its side goes through FIN_WAIT and TIME_WAIT on a timewait socket (the timer programs'
/// work) and the client, which closes on EOF, through CLOSE_WAIT and LAST_ACK. Had the clients
/// closed first, their ephemeral ports, held 60 s in TIME_WAIT, would slow every connect() down
/// as they run out.
fn pair(netns: &Netns, deadline: Instant) -> io::Result<Churned> {
    netns.enter()?;
    let listener = TcpListener::bind("0.0.0.0:0")
        .map_err(|e| io::Error::new(e.kind(), format!("binding a churn listener: {e}")))?;
    let port = listener.local_addr()?.port();
    let done = AtomicBool::new(false);
    thread::scope(|scope| {
        let server = scope.spawn(|| serve(netns, &listener, &done));
        let cpu_before = thread_cpu_ns()?;
        let connections = connect_until(port, deadline);
        let client_cpu_ns = thread_cpu_ns()?.saturating_sub(cpu_before);
        done.store(true, Ordering::Relaxed);
        // Unblock the server's accept().
        let _ = TcpStream::connect(("127.0.0.1", port));
        let server_cpu_ns = server
            .join()
            .map_err(|_| io::Error::other("a churn server panicked"))??;
        Ok(Churned {
            connections,
            cpu_ns: client_cpu_ns + server_cpu_ns,
        })
    })
}

/// Accepts and closes at once until `done`; returns the CPU time it took.
fn serve(netns: &Netns, listener: &TcpListener, done: &AtomicBool) -> io::Result<u64> {
    netns.enter()?;
    let cpu_before = thread_cpu_ns()?;
    while !done.load(Ordering::Relaxed) {
        let _ = listener.accept();
    }
    Ok(thread_cpu_ns()?.saturating_sub(cpu_before))
}

/// Connects to the listener on `port` until `deadline`, each time waiting for the server's FIN
/// before closing; returns how many connections it made.
fn connect_until(port: u16, deadline: Instant) -> u64 {
    let addrs: Vec<SocketAddr> = (1..=CLIENT_ADDRS)
        .map(|i| SocketAddr::from(([127, 0, 0, i], port)))
        .collect();
    let mut made = 0;
    while Instant::now() < deadline {
        if let Ok(mut stream) = TcpStream::connect(addrs[made as usize % addrs.len()]) {
            // Wait for the server's FIN before closing.
            let _ = stream.read(&mut [0; 1]);
            made += 1;
        }
    }
    made
}

/// CPU time of the calling thread so far (CLOCK_THREAD_CPUTIME_ID), in ns.
pub fn thread_cpu_ns() -> io::Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes one timespec that we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("clock_gettime(CLOCK_THREAD_CPUTIME_ID): {e}"),
        ));
    }
    let negative = |_| io::Error::other("negative thread CPU time");
    let secs = u64::try_from(ts.tv_sec).map_err(negative)?;
    let nanos = u64::try_from(ts.tv_nsec).map_err(negative)?;
    Ok(secs * 1_000_000_000 + nanos)
}
