//! Runs the integration test binaries, built on this host, inside a QEMU guest booted on another
//! kernel. virtme-ng boots the kernel on this machine's own root filesystem (9p), so the guest
//! has the host's binaries, tools and paths without an image or initramfs of ours to maintain.

use std::{
    collections::HashMap,
    ffi::OsString,
    fs::{self, File, OpenOptions},
    io::{BufRead as _, BufReader, Read, Write as _},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{kernel::Kernel, testreport::Report};

/// How long one test binary may run in the guest. The slowest took about 70 s under TCG on 6.1.
const BINARY_DEADLINE: Duration = Duration::from_secs(420);
/// How long the guest may take to boot up to the test script (6.1 takes about 10 s under TCG).
const BOOT_DEADLINE: Duration = Duration::from_secs(180);
/// The whole guest run, boot included; the guest is killed after it, so a hang fails the run
/// instead of holding up CI.
const RUN_DEADLINE: Duration = Duration::from_secs(25 * 60);
/// What the guest script puts before each line meant for the host, in the console's stream.
const MARK: &str = "xtask-guest:";

/// Test binaries that run on the host only, and why. The README lists them too.
pub const HOST_ONLY: &[(&str, &str)] = &[(
    "hung_burst",
    "it bounds the ring reader's delay while 12,000 hangs come due under full churn, a \
     timing figure that a guest emulated by TCG, ten times slower than the host, cannot give",
)];

/// One run of a test binary in the guest, with `TCPCLOSE_PROGRAMS` set to `programs` (the set of
/// kernel programs every tcpclose it starts uses) or, with none, unset (`auto`).
struct GuestRun<'a> {
    binary: &'a TestBinary,
    programs: Option<&'a str>,
}

impl GuestRun<'_> {
    /// Its name in the guest's marks and result files: the binary's, and the program set.
    fn key(&self) -> String {
        match self.programs {
            Some(programs) => format!("{}.{programs}", self.binary.name),
            None => self.binary.name.clone(),
        }
    }
}

/// A test binary of the integration-test package, as cargo built it.
struct TestBinary {
    /// The cargo target's name (`teardown` for tests/teardown.rs).
    name: String,
    executable: PathBuf,
    /// The package's directory, where `cargo test` runs its test binaries.
    manifest_dir: PathBuf,
}

/// Builds the integration tests and runs them in a guest booted on `kernel` with `vng`;
/// `tcpclose` is the loader they test. `args` are those of `cargo test`: a test-name filter and
/// `--test NAME` (to pick test binaries), then after `--` the test binaries' own options.
/// Prints what ran and fails unless every binary passed.
///
/// `programs`: the suite runs once per program set listed (`TCPCLOSE_PROGRAMS`), or once with
/// tcpclose's own choice when none is; `auto_picks`: what tcpclose's `auto` must pick on this
/// kernel, for the test that checks it (`TCPCLOSE_EXPECT_AUTO`).
pub fn run(
    vng: &Path,
    kernel: &Kernel,
    tcpclose: &Path,
    args: &[OsString],
    programs: &[&str],
    auto_picks: Option<&str>,
) -> Result<()> {
    let (cargo_args, binary_args) = split_args(args)?;
    let mut binaries = build(&cargo_args)?;
    // Asked for by name, a host-only binary runs in the guest too.
    if !cargo_args
        .iter()
        .any(|a| a.to_string_lossy().starts_with("--test"))
    {
        binaries.retain(
            |b| match HOST_ONLY.iter().find(|(name, _)| *name == b.name) {
                Some((name, why)) => {
                    eprintln!("guest: not running {name} here: {why}");
                    false
                }
                None => true,
            },
        );
    }
    ensure!(
        !binaries.is_empty(),
        "cargo built no test binary for tcpclose-tests"
    );
    let dir = fresh_dir(&Path::new("target/guest").join(&kernel.release))?;
    let runs: Vec<GuestRun> = if programs.is_empty() {
        binaries
            .iter()
            .map(|binary| GuestRun {
                binary,
                programs: None,
            })
            .collect()
    } else {
        programs
            .iter()
            .flat_map(|&set| {
                binaries.iter().map(move |binary| GuestRun {
                    binary,
                    programs: Some(set),
                })
            })
            .collect()
    };
    let script = dir.join("run.sh");
    fs::write(
        &script,
        script_text(&dir, tcpclose, &runs, &binary_args, auto_picks)?,
    )
    .with_context(|| format!("writing {}", script.display()))?;

    eprintln!(
        "guest: booting {} ({} test binaries{}; console in {})",
        kernel.vmlinuz.display(),
        binaries.len(),
        if programs.is_empty() {
            String::new()
        } else {
            format!(", with --programs {}", programs.join(", then "))
        },
        dir.join("console.log").display()
    );
    let started = Instant::now();
    let outcome = boot(vng, kernel, &dir, &script, &[])?;
    let elapsed = started.elapsed();
    report(&dir, &runs, &outcome, elapsed)
}

/// Splits `cargo test` arguments into those for building (`--test NAME`) and the test binaries'
/// own arguments (the test-name filters first, then whatever followed `--`).
fn split_args(args: &[OsString]) -> Result<(Vec<OsString>, Vec<String>)> {
    let mut cargo_args = Vec::new();
    let mut binary_args = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let arg = arg
            .to_str()
            .with_context(|| format!("{arg:?} is not UTF-8"))?;
        if arg == "--" {
            for arg in rest.by_ref() {
                let arg = arg
                    .to_str()
                    .with_context(|| format!("{arg:?} is not UTF-8"))?;
                binary_args.push(arg.to_owned());
            }
        } else if arg == "--test" {
            let name = rest
                .next()
                .context("--test needs the name of a test binary (e.g. --test teardown)")?;
            cargo_args.extend(["--test".into(), name.clone()]);
        } else if arg.starts_with("--test=") {
            cargo_args.push(arg.into());
        } else if arg.starts_with('-') {
            bail!(
                "{arg}: in a guest only a test-name filter, `--test NAME` and, after `--`, the test \
                 binaries' options (e.g. `-- --test-threads 1`) are passed on"
            );
        } else {
            binary_args.push(arg.to_owned());
        }
    }
    // cargo test puts its filter before the binaries' options; so does the guest.
    Ok((cargo_args, binary_args))
}

/// Builds the integration-test package's test binaries and learns their paths from cargo's JSON
/// messages (the test targets' `compiler-artifact`s).
fn build(cargo_args: &[OsString]) -> Result<Vec<TestBinary>> {
    let mut cmd = crate::cargo();
    cmd.args([
        "test",
        "--release",
        "--package",
        "tcpclose-tests",
        "--no-run",
    ])
    // Diagnostics stay human-readable on stderr; only the artifact messages are JSON.
    .arg("--message-format=json-render-diagnostics")
    .args(cargo_args)
    .stderr(Stdio::inherit());
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    ensure!(out.status.success(), "{cmd:?} failed: {}", out.status);
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" || message["profile"]["test"] != true {
            continue;
        }
        let (Some(executable), Some(name), Some(manifest)) = (
            message["executable"].as_str(),
            message["target"]["name"].as_str(),
            message["manifest_path"].as_str(),
        ) else {
            continue;
        };
        let manifest_dir = Path::new(manifest)
            .parent()
            .with_context(|| format!("cargo named the manifest {manifest:?}"))?;
        binaries.push(TestBinary {
            name: name.to_owned(),
            executable: executable.into(),
            manifest_dir: manifest_dir.to_path_buf(),
        });
    }
    binaries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(binaries)
}

/// The shell script the guest runs: loopback up, the release recorded, then each test binary
/// under a deadline with its output and exit status written to `dir`, which the guest shares
/// read-write with the host. Every step has a deadline: a hung step must not hang the guest.
fn script_text(
    dir: &Path,
    tcpclose: &Path,
    runs: &[GuestRun],
    binary_args: &[String],
    auto_picks: Option<&str>,
) -> Result<String> {
    let dir = quote(dir)?;
    let mut s = format!(
        "#!/bin/sh\n\
         # Written by `cargo xtask test --kernel`; runs inside the guest.\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         export TCPCLOSE_BIN={tcpclose}\n\
         out={dir}\n\
         timeout 30 ip link set lo up || echo '{MARK} could not bring lo up'\n\
         timeout 10 uname -r > \"$out/uname\"\n\
         echo \"{MARK} booted $(cat \"$out/uname\")\"\n\
         # A task blocked in the kernel for a minute is reported on the console, with its stack.\n\
         echo 60 > /proc/sys/kernel/hung_task_timeout_secs 2>/dev/null\n\
         echo 1 > /proc/sys/kernel/sysrq 2>/dev/null\n",
        tcpclose = quote(tcpclose)?,
    );
    // Nothing of the caller's environment is passed on: the tests are strict by themselves (a
    // missing tool or privilege fails them, whoever runs them).
    if let Some(expected) = auto_picks {
        s += &format!(
            "export TCPCLOSE_EXPECT_AUTO={}\n",
            quote(Path::new(expected))?
        );
    }
    let args: Vec<String> = binary_args
        .iter()
        .map(|a| quote(Path::new(a)))
        .collect::<Result<_>>()?;
    let args = args.join(" ");
    let seconds = BINARY_DEADLINE.as_secs();
    for run in runs {
        let b = run.binary;
        let name = run.key();
        s += &match run.programs {
            Some(programs) => format!("export TCPCLOSE_PROGRAMS={}\n", quote(Path::new(programs))?),
            None => "unset TCPCLOSE_PROGRAMS\n".to_owned(),
        };
        // A binary still running after `timeout` killed it is stuck in the kernel (or the
        // guest is): the watchdog has the kernel list its blocked tasks, with their stacks, on
        // the console.
        s += &format!(
            "echo '{MARK} start {name}'\n\
             (sleep {stuck}; echo '{MARK} stuck {name}: still running {stuck} s after its start; \
             blocked tasks follow'; echo w > /proc/sysrq-trigger) &\n\
             watchdog=$!\n\
             (cd {cwd} && exec timeout -k 10 {seconds} {exe} {args}) > \"$out/{name}.out\" 2>&1\n\
             status=$?\n\
             kill $watchdog 2>/dev/null\n\
             echo $status > \"$out/{name}.status\"\n\
             echo \"{MARK} end {name} $status\"\n",
            stuck = seconds + 30,
            cwd = quote(&b.manifest_dir)?,
            exe = quote(&b.executable)?,
        );
    }
    s += &format!("echo done > \"$out/done\"\necho '{MARK} done'\n");
    Ok(s)
}

/// Runs `cargo xtask bench` (this very binary, `bench_args`) in a guest booted on `kernel`, with
/// the tracer built on the host: the typed programs (`TCPCLOSE_PROGRAMS=btf`) as the tracer
/// under test and the raw ones as the baseline, side by side in one run. Prints the bench's
/// report; fails unless it ran to the end.
pub fn bench(vng: &Path, kernel: &Kernel, tcpclose: &Path, bench_args: &[String]) -> Result<()> {
    let dir = fresh_dir(&Path::new("target/guest-bench").join(&kernel.release))?;
    let raw = dir.join("tcpclose-raw");
    fs::write(
        &raw,
        format!(
            "#!/bin/sh
exec {} --programs raw \"$@\"\n",
            quote(tcpclose)?
        ),
    )
    .with_context(|| format!("writing {}", raw.display()))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&raw, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} executable", raw.display()))?;
    }
    let xtask = std::env::current_exe().context("finding xtask's own executable")?;
    let args: Vec<String> = bench_args
        .iter()
        .map(|a| quote(Path::new(a)))
        .collect::<Result<_>>()?;
    let out = quote(&dir)?;
    let script = dir.join("run.sh");
    fs::write(
        &script,
        format!(
            "#!/bin/sh
\
             # Written by `cargo xtask bench --kernel`; runs inside the guest.\n\
             export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
             export TCPCLOSE_PROGRAMS=btf\n\
             out={out}\n\
             timeout 30 ip link set lo up || echo '{MARK} could not bring lo up'\n\
             timeout 10 uname -r > \"$out/uname\"\n\
             echo \"{MARK} booted $(cat \"$out/uname\")\"\n\
             echo '{MARK} start bench'\n\
             cd {cwd} && timeout -k 10 {seconds} {xtask} bench --prebuilt --baseline {raw} {args} \
             > \"$out/bench.out\" 2>&1\n\
             echo $? > \"$out/bench.status\"\n\
             echo '{MARK} end bench'\n\
             echo done > \"$out/done\"\n",
            cwd = quote(&std::env::current_dir().context("the current directory")?)?,
            seconds = BINARY_DEADLINE.as_secs() * 3,
            xtask = quote(&xtask)?,
            raw = quote(&raw)?,
            args = args.join(" "),
        ),
    )
    .with_context(|| format!("writing {}", script.display()))?;
    eprintln!(
        "guest: booting {} for the bench (console in {})",
        kernel.vmlinuz.display(),
        dir.join("console.log").display()
    );
    let outcome = boot(vng, kernel, &dir, &script, BENCH_KERNEL_ARGS)?;
    let uname = fs::read_to_string(dir.join("uname")).unwrap_or_default();
    let report = fs::read_to_string(dir.join("bench.out")).unwrap_or_default();
    println!("guest kernel: {}\n{report}", uname.trim());
    let status = fs::read_to_string(dir.join("bench.status")).unwrap_or_default();
    if let Some(why) = outcome.killed {
        bail!("the guest was stopped: {why}");
    }
    ensure!(
        status.trim() == "0",
        "the bench did not finish in the guest (status {:?}): see {}",
        status.trim(),
        dir.join("console.log").display()
    );
    Ok(())
}

/// `dir`, emptied (made if missing), as an absolute path: the guest shares it read-write.
fn fresh_dir(dir: &Path) -> Result<PathBuf> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    dir.canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))
}

/// Single-quotes a path for the shell.
fn quote(path: &Path) -> Result<String> {
    let s = path
        .to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    Ok(format!("'{}'", s.replace('\'', r"'\''")))
}

/// How the guest run ended, as seen from the host.
struct Outcome {
    /// Since the start, when the script first spoke (the guest had booted).
    booted: Option<Duration>,
    /// Why the host killed the guest, if it did.
    killed: Option<String>,
    /// How long each binary ran, from the script's start and end marks.
    durations: HashMap<String, Duration>,
    /// vng's exit status. Not the script's: without udev on this machine nothing names the
    /// guest's virtio-serial ports, virtme-ng falls back to the console for the script's output
    /// and vng exits 255 whatever the script did; the results come through `dir` instead.
    vng: Option<ExitStatus>,
}

/// Boots the guest running `script`, echoes the script's progress marks, keeps the whole
/// console in `dir/console.log`, and kills the guest at the deadlines.
/// Kernel options of the bench's guest: the clock. The TCG guest finds its TSCs
/// "unsynchronized" and falls back to the HPET, an emulated device each read of which (every
/// bpf_ktime_get_ns(), every packet's timestamp) costs microseconds: it made the clock read
/// most of a transition program's run time and hid what the two program sets differ in. TCG's
/// TSC is QEMU's one virtual clock, the same on every vCPU.
const BENCH_KERNEL_ARGS: &[&str] = &["clocksource=tsc", "tsc=reliable"];

fn boot(
    vng: &Path,
    kernel: &Kernel,
    dir: &Path,
    script: &Path,
    kernel_args: &[&str],
) -> Result<Outcome> {
    let console_path = dir.join("console.log");
    let console = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&console_path)
        .with_context(|| format!("creating {}", console_path.display()))?;
    let mut cmd = Command::new(vng);
    // vng starts virtme-run, installed beside it, through PATH.
    if let Some(bin) = vng.parent() {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let dirs = std::iter::once(bin.to_path_buf()).chain(std::env::split_paths(&path));
        cmd.env(
            "PATH",
            std::env::join_paths(dirs).context("PATH holds a directory with a colon")?,
        );
    }
    cmd.arg("--run")
        .arg(&kernel.vmlinuz)
        // The guest's root is the host's over 9p (virtiofs needs a daemon this set-up lacks).
        .arg("--force-9p")
        // Nested KVM does not work on this machine kind: emulate (TCG).
        .arg("--disable-kvm")
        .args(["--memory", "3G", "--cpus", "2"])
        // Without it the script's output never reaches the host's stdout.
        .arg("--verbose");
    for arg in kernel_args {
        cmd.args(["--append", arg]);
    }
    cmd.arg("--rwdir")
        .arg(dir)
        .arg("--exec")
        .arg(format!("sh {}", quote(script)?))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {cmd:?} (`cargo xtask setup` installs vng)"))?;
    // The guest's console (the kernel's log and the script's output) comes on vng's stderr;
    // both streams go to the log, and the marks may come on either.
    let (marks, marks_rx) = mpsc::channel::<(Instant, String)>();
    let mut readers = Vec::new();
    let stdout = child
        .stdout
        .take()
        .map(|s| Box::new(s) as Box<dyn Read + Send>);
    let stderr = child
        .stderr
        .take()
        .map(|s| Box::new(s) as Box<dyn Read + Send>);
    for stream in [stdout, stderr].into_iter().flatten() {
        let console = console
            .try_clone()
            .with_context(|| format!("opening {}", console_path.display()))?;
        let marks = marks.clone();
        readers.push(thread::spawn(move || copy_console(stream, console, &marks)));
    }
    drop(marks);

    let mut outcome = Outcome {
        booted: None,
        killed: None,
        durations: HashMap::new(),
        vng: None,
    };
    let mut starts: HashMap<String, Instant> = HashMap::new();
    loop {
        for (at, mark) in marks_rx.try_iter() {
            let since = at.duration_since(started);
            outcome.booted.get_or_insert(since);
            eprintln!("guest [{:>6.1}s] {mark}", since.as_secs_f64());
            let mut words = mark.split_whitespace();
            match (words.next(), words.next()) {
                (Some("start"), Some(name)) => {
                    starts.insert(name.to_owned(), at);
                }
                (Some("end"), Some(name)) => {
                    if let Some(start) = starts.get(name) {
                        outcome.durations.insert(name.to_owned(), at - *start);
                    }
                }
                _ => {}
            }
        }
        if let Some(status) = child.try_wait().context("waiting for vng")? {
            outcome.vng = Some(status);
            break;
        }
        let elapsed = started.elapsed();
        let why = if outcome.booted.is_none() && elapsed > BOOT_DEADLINE {
            Some(format!(
                "the guest did not boot within {} s",
                BOOT_DEADLINE.as_secs()
            ))
        } else if elapsed > RUN_DEADLINE {
            Some(format!(
                "the guest run passed its deadline of {} s",
                RUN_DEADLINE.as_secs()
            ))
        } else {
            None
        };
        if let Some(why) = why {
            eprintln!("guest: {why}: killing it");
            kill_tree(child.id());
            // Reaps vng; its descendants were killed with it.
            let _ = child.wait();
            outcome.killed = Some(why);
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    // The console pipe ends when QEMU has gone; do not wait forever for one that outlived vng.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !readers.iter().all(|r| r.is_finished()) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    for (at, mark) in marks_rx.try_iter() {
        eprintln!(
            "guest [{:>6.1}s] {mark}",
            at.duration_since(started).as_secs_f64()
        );
    }
    Ok(outcome)
}

/// Copies vng's output into the console log and passes the script's marks on, timestamped.
fn copy_console(
    stdout: impl std::io::Read,
    mut console: File,
    marks: &mpsc::Sender<(Instant, String)>,
) {
    for line in BufReader::new(stdout).split(b'\n') {
        let Ok(line) = line else { break };
        let _ = console.write_all(&line);
        let _ = console.write_all(b"\n");
        let text = String::from_utf8_lossy(&line);
        // The console may glue kernel messages before the mark: look for it anywhere.
        if let Some(at) = text.find(MARK) {
            let mark = text[at + MARK.len()..].trim().to_owned();
            let _ = marks.send((Instant::now(), mark));
        }
    }
}

/// Kills process `pid` (vng, which this program started) and all its descendants (QEMU), found
/// through /proc: QEMU may be a grandchild, and killing only vng would leave it running.
fn kill_tree(pid: u32) {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.filter_map(|e| e.ok()) {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // The command name is in parentheses and may hold spaces: the parent's pid is the
            // second field after the last ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                children.entry(ppid).or_default().push(p);
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while let Some(&p) = tree.get(i) {
        tree.extend(children.get(&p).into_iter().flatten());
        i += 1;
    }
    for p in tree.into_iter().rev() {
        let Ok(p) = i32::try_from(p) else { continue };
        // SAFETY: kill(2) on processes this program started (or their descendants).
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
}

/// Prints the guest's kernel, each binary's results and failures, and fails unless the guest
/// booted and every binary ran and passed.
fn report(dir: &Path, runs: &[GuestRun], outcome: &Outcome, elapsed: Duration) -> Result<()> {
    let uname = fs::read_to_string(dir.join("uname")).unwrap_or_default();
    let uname = uname.trim();
    let console = dir.join("console.log");
    if uname.is_empty() {
        print_tail(&console, 30);
        let vng = outcome
            .vng
            .map_or_else(|| "?".to_owned(), |s| s.to_string());
        bail!(
            "the guest did not boot or did not run the tests ({}): see {}",
            outcome
                .killed
                .clone()
                .unwrap_or_else(|| format!("vng exited before the script ran: {vng}")),
            console.display()
        );
    }
    println!("guest kernel: {uname}");
    let booted = outcome
        .booted
        .map_or_else(|| "?".to_owned(), |b| format!("{:.1}", b.as_secs_f64()));
    println!(
        "guest run: booted in {booted} s, {:.1} s in all (boot, tests, shutdown)",
        elapsed.as_secs_f64()
    );
    let mut failed = Vec::new();
    let mut timed_out = false;
    for run in runs {
        let name = &run.key();
        let status = fs::read_to_string(dir.join(format!("{name}.status")))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        let out_path = dir.join(format!("{name}.out"));
        let output = fs::read_to_string(&out_path).unwrap_or_default();
        let parsed = Report::parse(&output);
        let took = outcome
            .durations
            .get(name)
            .map_or_else(String::new, |d| format!(" in {:.1} s", d.as_secs_f64()));
        let verdict = match status {
            None if !out_path.exists() => "NOT RUN (the guest stopped before it)".to_owned(),
            None => "NO RESULT (the guest stopped before this binary finished)".to_owned(),
            Some(124 | 137) => {
                timed_out = true;
                format!(
                    "TIMED OUT after {} s in the guest",
                    BINARY_DEADLINE.as_secs()
                )
            }
            Some(0) if parsed.results.is_empty() => {
                "NO RESULT (exit 0 without a `test result:` line)".to_owned()
            }
            Some(0) => "ok".to_owned(),
            Some(code) => format!("FAILED (exit {code})"),
        };
        println!("{name}: {verdict}{took}");
        for line in &parsed.results {
            println!("    {line}");
        }
        for (test, lines) in &parsed.failures {
            println!("    failed: {test}");
            for line in lines {
                println!("        {line}");
            }
        }
        if verdict != "ok" {
            if parsed.failures.is_empty() {
                // Not a test failure libtest reported: show how the output ends instead.
                for line in tail(&output, 10) {
                    println!("        {line}");
                }
            }
            println!("    output: {}", out_path.display());
            failed.push(name.clone());
        }
    }
    if let Some(why) = &outcome.killed {
        failed.push("(the whole run)".to_owned());
        println!("guest: {why}");
    } else if !dir.join("done").is_file() {
        failed.push("(the whole run)".to_owned());
        let vng = outcome
            .vng
            .map_or_else(|| "?".to_owned(), |s| s.to_string());
        println!(
            "guest: the script did not finish (vng: {vng}): see {}",
            console.display()
        );
    }
    if timed_out || outcome.killed.is_some() || !dir.join("done").is_file() {
        print_kernel_log(&console, KERNEL_LOG_LINES);
    }
    if !failed.is_empty() {
        bail!(
            "in the guest ({uname}): {} failed: {}",
            if failed.len() == 1 {
                "one part"
            } else {
                "parts"
            },
            failed.join(", ")
        );
    }
    Ok(())
}

fn tail(text: &str, lines: usize) -> Vec<&str> {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].to_vec()
}

/// The guest's console log, whatever bytes the kernel wrote in it.
fn console_text(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// How much of the guest kernel's log a failed run shows.
const KERNEL_LOG_LINES: usize = 150;

/// The last `lines` lines the guest's kernel logged after the script started (a hung task's or
/// a stall's report, a warning), as CI keeps only what is printed.
/// The script's marks stay in: they say which binary ran when the kernel spoke.
fn print_kernel_log(path: &Path, lines: usize) {
    let text = console_text(path);
    let booted = format!("{MARK} booted");
    let after_boot = text
        .lines()
        .skip_while(|line| !line.contains(&booted))
        .collect::<Vec<_>>()
        .join("\n");
    let shown = tail(&after_boot, lines);
    if shown.is_empty() {
        println!("guest kernel log: nothing after the boot");
    } else {
        println!(
            "guest kernel log, its last {} lines after the boot:",
            shown.len()
        );
        for line in shown {
            println!("    {line}");
        }
    }
}

fn print_tail(path: &Path, lines: usize) {
    let text = console_text(path);
    for line in tail(&text, lines) {
        eprintln!("console: {line}");
    }
}
