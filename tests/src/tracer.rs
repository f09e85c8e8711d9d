//! Running a tracer (`tcpclose`, or another) as a child process: start it, wait until it says it
//! has attached, stop it as Ctrl-C would, every step under a deadline, and kill it if it is
//! dropped while still running (a test that panics, or a bench measurement that fails half-way,
//! must not leave a tracer attached behind it).
//!
//! [`Process`] is that core. Two ways to run it build on it:
//! - [`Tracer`] (the integration tests): output piped to this process, `--json` records kept and
//!   parsed, what it printed returned as a [`Run`].
//! - [`ToFiles`] (the bench and the soak): output to files, which may grow to gigabytes; the
//!   caller reads them.
//!
//! The readiness check is tcpclose's: a line starting with `Tracing` on its standard error, once
//! its programs are attached.

use std::{
    fmt,
    fs::{self, File},
    io::{self, BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio},
    sync::{Arc, Condvar, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{binary, require_root, spawn, wait_with_deadline};

/// How often readiness is looked at while nothing says it changed.
const POLL: Duration = Duration::from_millis(20);
/// After a tracer exited before it was seen ready: how long what it printed last may take to be
/// read.
const LAST_WORDS: Duration = Duration::from_secs(1);
/// How long [`Tracer`] gives tcpclose to attach, and to exit after a signal. A start takes a
/// fraction of a second on the host, 5-8 s alone in the emulated 6.1 guest (each parse of the
/// kernel's BTF takes 2 s there) and over 20 s with three others starting beside it: these
/// catch a tracer that hangs, not a slow one.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(180);
/// A tracer not ready after this long has its threads' kernel stacks printed to the test's
/// standard error, once, and is given the rest of its timeout: a slow start is then explained
/// whether or not it ends in time.
const SLOW_START: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// Whether a line of tcpclose's standard error says it has attached.
pub fn says_tracing(line: &str) -> bool {
    line.starts_with("Tracing")
}

/// A tracer's process: killed and reaped when dropped, unless it has been reaped already.
pub struct Process {
    child: Child,
}

/// Each thread of `pid`, with its state and kernel stack: where a process that does not get
/// ready waits.
fn threads_of(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(no /proc/{pid}/task)\n");
    };
    let mut said = String::new();
    for task in tasks.flatten() {
        let read = |name: &str| std::fs::read_to_string(task.path().join(name)).unwrap_or_default();
        let state = read("status")
            .lines()
            .find_map(|l| l.strip_prefix("State:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        said.push_str(&format!(
            "{} {} ({state}), in {}\n{}",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan").trim(),
            read("stack")
        ));
    }
    said
}

/// Why a tracer was not seen ready. Either way it no longer runs.
#[derive(Debug)]
pub enum NotReady {
    /// It exited first, with this status.
    Exited(ExitStatus),
    /// Not within this long: it was killed. `stuck`: where its threads were then.
    TimedOut { timeout: Duration, stuck: String },
}

impl NotReady {
    /// The exit status it ended with by itself; `None` when it was killed.
    pub fn status(&self) -> Option<ExitStatus> {
        match self {
            NotReady::Exited(status) => Some(*status),
            NotReady::TimedOut { .. } => None,
        }
    }
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotReady::Exited(status) => write!(f, "ended before it was ready ({status})"),
            NotReady::TimedOut { timeout, stuck } => {
                write!(
                    f,
                    "not ready after {timeout:?} (killed); its threads then:\n{stuck}"
                )
            }
        }
    }
}

impl std::error::Error for NotReady {}

impl Process {
    /// Starts `cmd` (with [`spawn`]), its standard input from `/dev/null`, its output wherever
    /// `cmd` sends it.
    pub fn spawn(cmd: &mut Command) -> io::Result<Self> {
        let child = spawn(cmd.stdin(Stdio::null()))
            .map_err(|e| io::Error::new(e.kind(), format!("starting {cmd:?}: {e}")))?;
        Ok(Self { child })
    }

    /// Starts `cmd` with its standard output and error piped to this process: the output to
    /// read as the caller likes (read it, or the tracer blocks once the pipe is full), and the
    /// error read line by line on a thread of its own.
    pub fn spawn_piped(cmd: &mut Command) -> io::Result<(Self, ChildStdout, Stderr)> {
        let mut process = Self::spawn(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()))?;
        let stdout = process.child.stdout.take().expect("piped stdout");
        let stderr = Stderr::read(process.child.stderr.take().expect("piped stderr"));
        Ok((process, stdout, stderr))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` until `ready` holds. `ready(wait)` says whether the tracer is ready,
    /// and may wait up to `wait` for it (it must, when it cannot block on anything).
    pub fn wait_ready(
        &mut self,
        timeout: Duration,
        mut ready: impl FnMut(Duration) -> bool,
    ) -> Result<(), NotReady> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut said_slow = timeout <= SLOW_START;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if ready(left.min(POLL)) {
                return Ok(());
            }
            if !said_slow && start.elapsed() >= SLOW_START {
                said_slow = true;
                eprintln!(
                    "tcpclose (pid {}) not ready after {SLOW_START:?}; its threads:\n{}",
                    self.child.id(),
                    threads_of(self.child.id())
                );
            }
            match self.child.try_wait() {
                // What it said just before it ended may still be on its way: it counts.
                Ok(Some(status)) => {
                    return if ready(LAST_WORDS) {
                        Ok(())
                    } else {
                        Err(NotReady::Exited(status))
                    };
                }
                Ok(None) if !left.is_zero() => {}
                _ => {
                    let stuck = threads_of(self.child.id());
                    self.kill();
                    return Err(NotReady::TimedOut { timeout, stuck });
                }
            }
        }
    }

    /// Sends `signal`, unless it has exited already.
    pub fn signal(&mut self, signal: i32) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child, which has not been reaped (a zombie keeps its
            // pid until then).
            unsafe { libc::kill(self.pid() as i32, signal) };
        }
    }

    /// Waits up to `timeout` for it to exit; kills it and returns `None` if it does not (see
    /// [`wait_with_deadline`]).
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_with_deadline(&mut self.child, timeout)
    }

    /// Sends `signal`, then waits up to `timeout` for the exit ([`Process::wait`]).
    pub fn stop(&mut self, signal: i32, timeout: Duration) -> Option<ExitStatus> {
        self.signal(signal);
        self.wait(timeout)
    }

    fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A child's standard error, read line by line on a thread of its own (so that the child never
/// blocks on it), the lines kept as they are taken.
pub struct Stderr {
    lines: mpsc::Receiver<String>,
    seen: String,
}

impl Stderr {
    fn read(pipe: ChildStderr) -> Self {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            lines: rx,
            seen: String::new(),
        }
    }

    /// Waits up to `timeout` for tcpclose to say it has attached ([`says_tracing`]).
    pub fn wait_attached(
        &mut self,
        process: &mut Process,
        timeout: Duration,
    ) -> Result<(), NotReady> {
        process.wait_ready(timeout, |wait| self.tracing_within(wait))
    }

    /// Takes the lines that come within `wait`, up to one that [`says_tracing`].
    fn tracing_within(&mut self, wait: Duration) -> bool {
        let until = Instant::now() + wait;
        loop {
            match self
                .lines
                .recv_timeout(until.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                    if says_tracing(&line) {
                        return true;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => return false,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // All read: nothing more will come.
                    thread::sleep(until.saturating_duration_since(Instant::now()));
                    return false;
                }
            }
        }
    }

    /// The lines taken so far.
    pub fn seen(&self) -> &str {
        &self.seen
    }

    /// Everything it printed: the lines taken so far, then the rest until it ends, each line
    /// within 2 s of the one before.
    pub fn into_string(mut self) -> String {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.seen.push_str(&line);
            self.seen.push('\n');
        }
        self.seen
    }
}

/// A tracer whose standard output and error go to files: a bench's tracer prints far more than
/// this process should keep. Both files are removed when it is dropped.
pub struct ToFiles {
    pub process: Process,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl ToFiles {
    /// Starts `cmd` with its output to `DIR/stdout` and `DIR/stderr`, and waits up to `timeout`
    /// until it says it has attached ([`says_tracing`], in its error file).
    pub fn start(cmd: &mut Command, dir: &Path, timeout: Duration) -> io::Result<Self> {
        let mut tracer = Self::spawn(cmd, dir)?;
        let stderr = tracer.stderr.clone();
        let attached = || fs::read_to_string(&stderr).is_ok_and(|s| s.lines().any(says_tracing));
        tracer.wait_ready(cmd, timeout, attached)?;
        Ok(tracer)
    }

    /// [`ToFiles::start`] for a tracer that says nothing: ready when `ready(pid)` holds.
    pub fn start_when(
        cmd: &mut Command,
        dir: &Path,
        timeout: Duration,
        mut ready: impl FnMut(u32) -> bool,
    ) -> io::Result<Self> {
        let mut tracer = Self::spawn(cmd, dir)?;
        let pid = tracer.pid();
        tracer.wait_ready(cmd, timeout, || ready(pid))?;
        Ok(tracer)
    }

    fn spawn(cmd: &mut Command, dir: &Path) -> io::Result<Self> {
        let stdout = dir.join("stdout");
        let stderr = dir.join("stderr");
        let create = |path: &Path| {
            File::create(path)
                .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", path.display())))
        };
        cmd.stdout(create(&stdout)?).stderr(create(&stderr)?);
        Ok(Self {
            process: Process::spawn(cmd)?,
            stdout,
            stderr,
        })
    }

    /// Polls `ready` (it cannot block on a file) until it holds, for up to `timeout`.
    fn wait_ready(
        &mut self,
        cmd: &Command,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> io::Result<()> {
        let result = self.process.wait_ready(timeout, |wait| {
            ready() || {
                thread::sleep(wait);
                false
            }
        });
        result.map_err(|not_ready| {
            io::Error::other(format!(
                "{:?} {not_ready}: {}",
                cmd.get_program(),
                self.errors()
            ))
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Interrupts it as Ctrl-C would and waits up to `timeout` for it to exit; an error unless it
    /// exits successfully.
    pub fn stop(&mut self, timeout: Duration) -> io::Result<ExitStatus> {
        match self.process.stop(libc::SIGINT, timeout) {
            Some(status) if status.success() => Ok(status),
            Some(status) => Err(io::Error::other(format!(
                "ended with {status}: {}",
                self.errors()
            ))),
            None => Err(io::Error::other(format!(
                "still running {timeout:?} after SIGINT (killed): {}",
                self.errors()
            ))),
        }
    }

    /// What it printed on its standard error so far, trimmed.
    pub fn errors(&self) -> String {
        fs::read_to_string(&self.stderr)
            .unwrap_or_default()
            .trim()
            .to_owned()
    }
}

impl Drop for ToFiles {
    fn drop(&mut self) {
        // Only when a measurement failed half-way is it still running.
        self.process.kill();
        let _ = fs::remove_file(&self.stdout);
        let _ = fs::remove_file(&self.stderr);
    }
}

/// A running `tcpclose --json`, its output piped to this process and its records kept. Killed
/// if dropped before it is stopped (a test that panics must not leave a tracer attached behind
/// it, for the tests that follow).
pub struct Tracer {
    process: Process,
    stdout: thread::JoinHandle<()>,
    printed: Arc<Printed>,
    stderr: Stderr,
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
        let mut cmd = Command::new(binary());
        cmd.arg("--json").args(args);
        Self::start_command(cmd)
    }

    /// Starts `cmd`, which runs `tcpclose --json ...` (through wrappers that exec it, such as
    /// `unshare` or `setpriv`, so that the child is tcpclose), and waits until it has attached.
    pub fn start_command(mut cmd: Command) -> Self {
        require_root();
        let (process, out, stderr) = Process::spawn_piped(&mut cmd).expect("spawning tcpclose");
        let printed = Arc::new(Printed::default());
        let shared = printed.clone();
        let stdout = thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let line = line.expect("reading tcpclose's stdout");
                shared
                    .lines
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(line);
                shared.more.notify_all();
            }
        });
        let mut tracer = Self {
            process,
            stdout,
            printed,
            stderr,
        };
        if let Err(not_ready) = tracer
            .stderr
            .wait_attached(&mut tracer.process, ATTACH_TIMEOUT)
        {
            panic!(
                "tcpclose did not attach: {not_ready}; stderr:\n{}",
                tracer.stderr.seen()
            );
        }
        tracer
    }

    pub fn pid(&self) -> i32 {
        self.process.pid() as i32
    }

    /// Waits, while tcpclose runs on, until `done` holds for the records it has printed so far
    /// (a record is a line; a line only counts once complete), for up to `timeout`. Returns those
    /// records; on timeout, `Err` with them.
    pub fn wait_for_records(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[Value]) -> bool,
    ) -> Result<Vec<Value>, Vec<Value>> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.printed.lines.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let records: Vec<Value> = lines.iter().map(|line| parse_record(line)).collect();
            if done(&records) {
                return Ok(records);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(records);
            }
            lines = self
                .printed
                .more
                .wait_timeout(lines, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Sends `signal`, waits for the exit, returns everything it printed.
    pub fn stop_with(mut self, signal: i32) -> Run {
        self.process.signal(signal);
        self.wait(EXIT_TIMEOUT)
    }

    pub fn stop(self) -> Run {
        self.stop_with(libc::SIGINT)
    }

    /// Waits for the process to exit by itself (e.g. `--duration`).
    pub fn wait(mut self, timeout: Duration) -> Run {
        let Some(status) = self.process.wait(timeout) else {
            panic!("tcpclose did not exit within {timeout:?} (killed)");
        };
        self.stdout.join().expect("stdout reader");
        let lines =
            std::mem::take(&mut *self.printed.lines.lock().unwrap_or_else(|e| e.into_inner()));
        let records = lines.iter().map(|line| parse_record(line)).collect();
        Run {
            status,
            records,
            stderr: self.stderr.into_string(),
        }
    }
}

/// A running [`Tracer`], killed if the test fails before stopping it (it would run on otherwise).
pub struct Tracing(Option<Tracer>);

impl Tracing {
    /// [`Tracer::start`].
    pub fn start(args: &[&str]) -> Self {
        Self(Some(Tracer::start(args)))
    }

    /// Waits up to `timeout` for what tcpclose has printed so far to satisfy `done` (see
    /// [`Tracer::wait_for_records`]); panics, naming `what`, if it does not.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl FnMut(&[Value]) -> bool,
    ) -> Vec<Value> {
        let tracer = self.0.as_ref().expect("running");
        tracer
            .wait_for_records(timeout, done)
            .unwrap_or_else(|records| {
                panic!("{what}: not within {timeout:?}; printed: {records:#?}")
            })
    }

    /// [`Tracer::stop`].
    pub fn stop(mut self) -> Run {
        self.0.take().expect("running").stop()
    }
}

/// What tcpclose has printed on its standard output so far, line by line.
#[derive(Default)]
struct Printed {
    lines: Mutex<Vec<String>>,
    /// Notified at each new line.
    more: Condvar,
}

fn parse_record(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
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

    /// The run ended cleanly, with its summary last and nothing lost.
    pub fn check_clean(&self) {
        assert!(self.status.success(), "{self:?}");
        let summary = self.summary();
        assert_eq!(summary["lost"], 0, "{summary}");
    }

    /// Transitions grouped by socket (kernel address), in order.
    pub fn by_socket(&self) -> std::collections::BTreeMap<String, Vec<&Value>> {
        let mut map = std::collections::BTreeMap::<String, Vec<&Value>>::new();
        for t in self.transitions() {
            map.entry(t["skaddr"].as_str().expect("skaddr").to_owned())
                .or_default()
                .push(t);
        }
        map
    }
}
