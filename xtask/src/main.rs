//! `cargo xtask`: everything a fresh machine needs to build, run and test tcpclose.

mod bench;
mod guest;
mod kernel;
mod setup;
mod soak;
mod testreport;

use std::{
    env,
    ffi::OsString,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "tcpclose development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building needs (nightly rust-src, bpf-linker) and, with --tests, the
    /// Debian packages the tests use; with --guest, what `test --kernel` needs to boot a guest
    /// (QEMU, kmod, busybox-static, virtme-ng). Idempotent; seconds when all is present.
    Setup {
        #[arg(long)]
        tests: bool,
        #[arg(long)]
        guest: bool,
    },
    /// Set up, then build the release binary at target/release/tcpclose.
    Build,
    /// Build, then run tcpclose with ARGS (through sudo when not root).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Build, then measure what tracing costs a host churning loopback connections in a network
    /// namespace: untraced, `tcpclose`, `tcpclose --events` and libbpf-tools' `tcpstates` (when
    /// installed) interleaved, with kernel.bpf_stats_enabled off, and again with it on for the
    /// kernel programs' time; then tcpclose under stress (a burst from idle, the backlog after
    /// a 500 ms SIGSTOP, the memory it takes to follow 100k open sockets). Medians in markdown
    /// tables (as root; about 4 minutes with the defaults).
    Bench {
        /// Rounds of all the measurements, interleaved.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds per churn measurement (the stress parts have lengths of their own).
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// Client/server pairs churning at once, a thread each side.
        #[arg(long, default_value_t = 2)]
        pairs: usize,
        /// Only these parts (repeatable or comma-separated); all by default.
        #[arg(long, value_enum, value_delimiter = ',')]
        only: Vec<bench::Part>,
        /// Another tcpclose binary (e.g. a build of an earlier commit) measured as one more tracer
        /// (`--json`) in the churn and stats parts, interleaved with the others: what a change
        /// costs, side by side in one run.
        #[arg(long, value_name = "PATH")]
        baseline: Option<PathBuf>,
        /// Measure in a QEMU guest booted on this kernel instead of the host (`debian-6.1` or a
        /// bzImage, as for `test --kernel`): the typed programs against the raw ones (as the
        /// baseline), side by side. TCG emulates the guest: compare ratios only.
        #[arg(long, value_name = "debian-6.1|PATH")]
        kernel: Option<KernelChoice>,
        /// Use the tracer already built (inside a guest, which cannot build).
        #[arg(long, hide = true)]
        prebuilt: bool,
    },
    /// Build, then run `tcpclose --json` under full churn for minutes, sampling its RSS every
    /// 10 s; fails unless it stops cleanly, its summary reconciles and its RSS stays flat after
    /// warm-up (as root; not part of CI).
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Client/server pairs churning at once, a thread each side.
        #[arg(long, default_value_t = 2)]
        pairs: usize,
    },
    /// The bench's helper: holds COUNT loopback connections in the network namespace NETNS
    /// until its stdin ends.
    #[command(hide = true)]
    HoldConnections {
        netns: String,
        count: usize,
        /// Leave the servers in CLOSE_WAIT, their clients in FIN_WAIT2.
        #[arg(long)]
        leak: bool,
    },
    /// Set up (with test packages), build, and run every test: unit tests and the integration
    /// tests against the real kernel (as root); with --kernel, the integration tests on other
    /// kernels too, each booted in a QEMU guest.
    Test {
        /// Where the tests run, in order (repeatable or comma-separated; `host` if not given):
        /// `host`: every test of the workspace on this machine's kernel. `debian-6.1`: the
        /// integration tests in a QEMU guest (TCG) booted on Debian 12's newest 6.1 kernel,
        /// fetched with apt and cached under target/kernels/. A path: the same with that
        /// bzImage, whose modules must already be in /lib/modules/<release>. Each kernel is
        /// reported; the run fails if any failed. CI: `--kernel host,debian-6.1`.
        #[arg(long, value_delimiter = ',', value_name = "host|debian-6.1|PATH")]
        kernel: Vec<KernelChoice>,
        /// Extra arguments for `cargo test` (e.g. a test name filter). In a guest: a test-name
        /// filter, `--test NAME`, and after `--` the test binaries' options.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    env::set_current_dir(&root).with_context(|| format!("entering {}", root.display()))?;
    match cli.task {
        Task::Setup { tests, guest } => {
            setup::all(tests)?;
            if guest {
                setup::guest_tools(&root.join(GUEST_TOOLS))?;
            }
            Ok(())
        }
        Task::Build => build(),
        Task::Run { args } => {
            build()?;
            let binary = root.join("target/release/tcpclose");
            let mut cmd = if is_root() {
                Command::new(&binary)
            } else {
                let mut sudo = Command::new("sudo");
                sudo.arg(&binary);
                sudo
            };
            let err = cmd.args(args).exec();
            Err(err).with_context(|| format!("running {}", binary.display()))
        }
        Task::Bench {
            rounds,
            seconds,
            pairs,
            only,
            baseline,
            kernel,
            prebuilt,
        } => {
            if let Some(choice) = kernel.filter(|k| !matches!(k, KernelChoice::Host)) {
                if baseline.is_some() {
                    bail!("--baseline with --kernel: in a guest the baseline is the raw programs");
                }
                build()?;
                let vng = setup::guest_tools(&root.join(GUEST_TOOLS))?;
                let guest_kernel = match &choice {
                    KernelChoice::File(path) => kernel::from_file(path)?,
                    _ => kernel::debian_6_1(&root.join("target/kernels"))?,
                };
                let mut args = vec![
                    "--rounds".to_owned(),
                    rounds.to_string(),
                    "--seconds".to_owned(),
                    seconds.to_string(),
                    "--pairs".to_owned(),
                    pairs.to_string(),
                ];
                // Churn and the programs' time only, unless asked: the stress parts measure
                // the host's reader, not the programs.
                let parts: Vec<String> = if only.is_empty() {
                    vec!["churn".to_owned(), "stats".to_owned()]
                } else {
                    use clap::ValueEnum as _;
                    only.iter()
                        .filter_map(|p| p.to_possible_value())
                        .map(|v| v.get_name().to_owned())
                        .collect()
                };
                args.extend(["--only".to_owned(), parts.join(",")]);
                return guest::bench(
                    &vng,
                    &guest_kernel,
                    &root.join("target/release/tcpclose"),
                    &args,
                );
            }
            if !prebuilt {
                build()?;
            }
            if !is_root() {
                bail!("the benchmark loads eBPF programs: run `cargo xtask bench` as root");
            }
            if let Some(path) = &baseline
                && !path.is_file()
            {
                bail!(
                    "--baseline {}: no such file (give a tcpclose binary)",
                    path.display()
                );
            }
            let options = bench::Options {
                rounds,
                seconds,
                pairs,
                only,
                baseline,
            };
            bench::bench(&root.join("target/release/tcpclose"), &options)
        }
        Task::Soak { minutes, pairs } => {
            build()?;
            if !is_root() {
                bail!("the soak loads eBPF programs: run `cargo xtask soak` as root");
            }
            let options = soak::Options { minutes, pairs };
            soak::soak(&root.join("target/release/tcpclose"), &options)
        }
        Task::HoldConnections { netns, count, leak } => {
            bench::hold_connections(&netns, count, leak)
        }
        Task::Test { kernel, args } => test(&root, kernel, &args),
    }
}

/// The virtual environment that holds virtme-ng, which boots the guests.
const GUEST_TOOLS: &str = "target/guest-tools/venv";

/// Where `cargo xtask test` runs the tests.
#[derive(Clone, Debug)]
enum KernelChoice {
    Host,
    Debian61,
    File(PathBuf),
}

impl std::str::FromStr for KernelChoice {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "host" => Self::Host,
            "debian-6.1" => Self::Debian61,
            path => Self::File(path.into()),
        })
    }
}

impl std::fmt::Display for KernelChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Host => f.write_str("host"),
            Self::Debian61 => f.write_str("debian-6.1"),
            Self::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Runs the test suite on each kernel in turn, every one even when an earlier one failed, and
/// fails if any did.
fn test(root: &Path, kernels: Vec<KernelChoice>, args: &[OsString]) -> Result<()> {
    let kernels = if kernels.is_empty() {
        vec![KernelChoice::Host]
    } else {
        kernels
    };
    setup::all(true)?;
    let guests = kernels.iter().any(|k| !matches!(k, KernelChoice::Host));
    if !is_root() {
        bail!("the integration tests load eBPF programs: run `cargo xtask test` as root");
    }
    let vng = if guests {
        Some(setup::guest_tools(&root.join(GUEST_TOOLS))?)
    } else {
        None
    };
    build()?;
    let binary = root.join("target/release/tcpclose");
    let mut failed = Vec::new();
    for choice in &kernels {
        let result = match (choice, &vng) {
            (KernelChoice::Host, _) => host_suite(&binary, args),
            // Debian's 6.1 runs typed programs: the suite runs with each set, and `auto` must
            // pick the typed one.
            (KernelChoice::Debian61, Some(vng)) => kernel::debian_6_1(&root.join("target/kernels"))
                .and_then(|k| guest::run(vng, &k, &binary, args, &["btf", "raw"], Some("btf"))),
            (KernelChoice::File(path), Some(vng)) => {
                kernel::from_file(path).and_then(|k| guest::run(vng, &k, &binary, args, &[], None))
            }
            // Not reached: vng is set up above whenever a guest kernel is listed.
            (_, None) => Err(anyhow::anyhow!("no vng to boot a guest with")),
        };
        if let Err(err) = result {
            eprintln!("test on {choice}: {err:#}");
            failed.push(choice.to_string());
        }
    }
    if !failed.is_empty() {
        bail!("the tests failed on: {}", failed.join(", "));
    }
    if kernels.len() > 1 {
        println!(
            "the tests passed on: {}",
            kernels
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// The host suite: the code's habits (formatting, clippy with warnings denied), then every test
/// of the workspace, each step run even when an earlier one failed.
fn host_suite(binary: &Path, args: &[OsString]) -> Result<()> {
    let mut failed = Vec::new();
    if args.is_empty() {
        let mut fmt = cargo();
        fmt.args(["fmt", "--all", "--check"]);
        if let Err(err) = run(&mut fmt) {
            eprintln!("{err:#}: run `cargo fmt --all`");
            failed.push("cargo fmt --check");
        }
        let mut clippy = cargo();
        // The eBPF crate builds for the BPF target only (the loader's build script builds it).
        clippy.args([
            "clippy",
            "--release",
            "--workspace",
            "--exclude",
            "tcpclose-ebpf",
        ]);
        clippy.args(["--all-targets", "--", "-D", "warnings"]);
        if let Err(err) = run(&mut clippy) {
            eprintln!("{err:#}");
            failed.push("cargo clippy");
        }
    }
    let mut test = cargo();
    // Every test binary runs even when an earlier one failed.
    test.args(["test", "--release", "--workspace", "--no-fail-fast"])
        .env("TCPCLOSE_BIN", binary)
        .args(args);
    if let Err(err) = run(&mut test) {
        eprintln!("{err:#}");
        failed.push("cargo test");
    }
    if !failed.is_empty() {
        bail!("{} failed", failed.join(", "));
    }
    Ok(())
}

fn build() -> Result<()> {
    setup::all(false)?;
    run(cargo().args(["build", "--release", "--package", "tcpclose"]))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { geteuid() == 0 }
}

unsafe extern "C" {
    fn geteuid() -> u32;
}

/// `cargo` with `$CARGO_HOME/bin` (where setup installs bpf-linker) at the front of PATH, since
/// the eBPF build that the loader's build script starts looks for `bpf-linker` there.
fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.env("PATH", setup::path_with_cargo_bin());
    cmd
}

pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
