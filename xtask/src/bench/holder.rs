//! The connections the RSS measurement and the hung burst hold open: helper processes (`cargo
//! xtask hold-connections`), each within its own file limit, that open them in a namespace, say
//! so, and hold them until told to let go.

use std::{
    env, io,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    process::{self, Child, Command, Stdio},
    sync::Mutex,
    thread,
};

use anyhow::{Context as _, Result, anyhow, bail};
use tcpclose_tests::{netns::Netns, wait_with_deadline};

use super::STOP_TIMEOUT;

/// The listener ports and the destination addresses the held connections spread over (32
/// destinations: ephemeral ports suffice).
pub(super) const HOLD_PORTS: usize = 4;
pub(super) const HOLD_ADDRS: u8 = 8;
/// Accept queue of the listeners (the kernel caps it at `net.core.somaxconn`).
const HOLD_BACKLOG: i32 = 4096;

/// Connections one helper process can hold: both ends of each, within its file limit.
pub(super) fn connections_per_process() -> Result<usize> {
    let hard = usize::try_from(fd_limit()?.rlim_max).unwrap_or(usize::MAX);
    let per_process = hard.saturating_sub(64).min(1 << 20) / 2;
    if per_process < 1000 {
        bail!("RLIMIT_NOFILE's hard limit ({hard}) is too low to hold connections");
    }
    Ok(per_process)
}

/// A helper process holding connections (`cargo xtask hold-connections`); when dropped, it is
/// told to reset them and waited for.
pub(super) struct Holder {
    child: Child,
    stdout: io::BufReader<process::ChildStdout>,
}

impl Holder {
    pub(super) fn spawn(netns: &Netns, count: usize) -> Result<Self> {
        Self::spawn_with(netns, count, false)
    }

    /// A holder whose connections leak: see [`hold_connections`].
    pub(super) fn spawn_leaking(netns: &Netns, count: usize) -> Result<Self> {
        Self::spawn_with(netns, count, true)
    }

    fn spawn_with(netns: &Netns, count: usize, leak: bool) -> Result<Self> {
        let exe = env::current_exe().context("finding the xtask binary")?;
        let mut child = Command::new(&exe)
            .args(["hold-connections", netns.name(), &count.to_string()])
            .args(leak.then_some("--leak"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} hold-connections", exe.display()))?;
        let stdout = child.stdout.take().context("the holder's stdout")?;
        Ok(Self {
            child,
            stdout: io::BufReader::new(stdout),
        })
    }

    /// Waits until it holds its connections; returns how many.
    pub(super) fn wait_ready(&mut self) -> Result<usize> {
        use io::BufRead as _;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        line.trim()
            .strip_prefix("ready ")
            .and_then(|n| n.parse().ok())
            .context("a connection holder failed (see its error above)")
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // EOF on its stdin: reset the connections and exit (killed if it does not in time).
        drop(self.child.stdin.take());
        wait_with_deadline(&mut self.child, STOP_TIMEOUT);
    }
}

/// `cargo xtask hold-connections NETNS COUNT [--leak]` (the bench's helper): in the namespace
/// `netns`, opens `count` connections to listeners of its own and accepts them, says `ready
/// COUNT` on stdout, holds them until stdin ends, then resets them. With `leak`, the servers
/// never close and the clients leave them in CLOSE_WAIT before it says ready: half close (an
/// orphaned FIN_WAIT2), half shut their sending side down (FIN_WAIT2 held open).
pub fn hold_connections(netns: &str, count: usize, leak: bool) -> Result<()> {
    use io::{BufRead as _, Write as _};
    let hard = fd_limit()?.rlim_max;
    raise_fd_limit(hard)?;
    tcpclose_tests::netns::enter(netns)?;
    let mut sockets = open_connections(count)?;
    if leak {
        // The servers come first, then the clients.
        let clients = sockets.split_off(count);
        for (i, client) in clients.into_iter().enumerate() {
            if i % 2 == 0 {
                drop(client);
            } else {
                client
                    .shutdown(std::net::Shutdown::Write)
                    .context("shutdown(SHUT_WR)")?;
                sockets.push(client);
            }
        }
    }
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "ready {count}")?;
    stdout.flush()?;
    let _ = io::stdin().lock().read_line(&mut String::new());
    for socket in &sockets {
        reset_on_close(socket);
    }
    Ok(())
}

/// Opens `n` connections to listeners on [`HOLD_PORTS`] ports at [`HOLD_ADDRS`] loopback
/// addresses of the calling thread's namespace; returns both ends of each.
fn open_connections(n: usize) -> Result<Vec<TcpStream>> {
    let listeners = (0..HOLD_PORTS)
        .map(|_| -> Result<TcpListener> {
            let listener = TcpListener::bind("0.0.0.0:0").context("binding a listener")?;
            // std listens with a backlog of 128: a deeper accept queue lets the connects run
            // ahead of the accepts. Listening again changes it.
            // SAFETY: listen(2) on a socket we own.
            if unsafe { libc::listen(listener.as_raw_fd(), HOLD_BACKLOG) } != 0 {
                return Err(io::Error::last_os_error()).context("listen");
            }
            Ok(listener)
        })
        .collect::<Result<Vec<_>>>()?;
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<io::Result<_>>()?;
    let per_listener: Vec<usize> = (0..HOLD_PORTS)
        .map(|i| n / HOLD_PORTS + usize::from(i < n % HOLD_PORTS))
        .collect();
    let accepted = Mutex::new(Vec::with_capacity(n));
    let clients = thread::scope(|scope| -> Result<Vec<TcpStream>> {
        let acceptors: Vec<_> = listeners
            .iter()
            .zip(&per_listener)
            .map(|(listener, &count)| {
                let accepted = &accepted;
                scope.spawn(move || -> Result<()> {
                    let mut mine = Vec::with_capacity(count);
                    while mine.len() < count {
                        let (stream, _) = listener.accept().context("accepting")?;
                        mine.push(stream);
                    }
                    accepted
                        .lock()
                        .map_err(|_| anyhow!("poisoned"))?
                        .extend(mine);
                    Ok(())
                })
            })
            .collect();
        let mut clients = Vec::with_capacity(n);
        let mut failure = None;
        for i in 0..n {
            let addr = SocketAddr::from((
                [
                    127,
                    0,
                    0,
                    1 + (i / HOLD_PORTS % usize::from(HOLD_ADDRS)) as u8,
                ],
                ports[i % HOLD_PORTS],
            ));
            match TcpStream::connect(addr) {
                Ok(stream) => clients.push(stream),
                Err(err) => {
                    failure = Some(anyhow::Error::new(err).context(format!(
                        "connection {} of {n} to {addr} (file descriptors, ephemeral ports?)",
                        i + 1
                    )));
                    break;
                }
            }
        }
        if let Some(err) = failure {
            // Unblock the acceptors, which wait for connections that will not come: accept()
            // on a listener shut down fails (EINVAL).
            for listener in &listeners {
                // SAFETY: shutdown(2) on a socket we own.
                unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
            }
            for acceptor in acceptors {
                let _ = acceptor.join();
            }
            return Err(err);
        }
        for acceptor in acceptors {
            acceptor
                .join()
                .map_err(|_| anyhow!("an acceptor panicked"))??;
        }
        Ok(clients)
    })?;
    let mut all = accepted.into_inner().map_err(|_| anyhow!("poisoned"))?;
    all.extend(clients);
    Ok(all)
}

/// SO_LINGER 0: closing sends an RST and leaves no timewait socket.
fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt(2) on a socket we own, with a linger struct of the size given.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

fn fd_limit() -> Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes one rlimit that we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    Ok(limit)
}

/// Raises RLIMIT_NOFILE's soft limit to `n` (at most the hard limit).
fn raise_fd_limit(n: u64) -> Result<()> {
    let mut limit = fd_limit()?;
    if limit.rlim_cur >= n {
        return Ok(());
    }
    limit.rlim_cur = n.min(limit.rlim_max);
    // SAFETY: setrlimit(2) reads one rlimit that we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error()).context("raising RLIMIT_NOFILE");
    }
    Ok(())
}
