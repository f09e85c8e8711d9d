//! Installs what tcpclose's build and tests need, skipping whatever is already there.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::run;

/// The bpf-linker release the build uses.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the integration tests call (`setpriv`, `unshare`, `ip`, `ss`, `nft`,
/// `prometheus` and `promtool`, `systemd-analyze`).
const TEST_PACKAGES: &[&str] = &[
    "util-linux",
    "iproute2",
    "nftables",
    "prometheus",
    "systemd",
];

/// Debian packages that booting another kernel needs: QEMU, kmod's `depmod` to index the guest
/// kernel's modules, and a static busybox, from which virtme-ng builds the initramfs that mounts
/// the shared root filesystem.
const GUEST_PACKAGES: &[&str] = &["qemu-system-x86", "kmod", "busybox-static"];
/// The virtme-ng release that boots a kernel on this machine's root filesystem (`vng`).
const VIRTME_NG_VERSION: &str = "1.42";

pub fn all(with_test_packages: bool) -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    if with_test_packages {
        lint_tools()?;
        debian_packages(TEST_PACKAGES)?;
    }
    Ok(())
}

/// rustfmt and clippy, which the test command runs, in the toolchain that runs xtask.
fn lint_tools() -> Result<()> {
    for (tool, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        let present = Command::new("cargo")
            .args([tool, "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !present {
            eprintln!("setup: adding {component} to the toolchain");
            run(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    Ok(())
}

/// Installs what running the tests in a guest kernel needs (`cargo xtask test --kernel`) and
/// returns the `vng` to run. virtme-ng goes into its own virtual environment at `venv`, so that
/// neither an externally managed system Python (PEP 668) nor whichever Python is first on PATH
/// decides whether it installs, and its version stays the pinned one.
pub fn guest_tools(venv: &Path) -> Result<PathBuf> {
    debian_packages(GUEST_PACKAGES)?;
    let vng = venv.join("bin/vng");
    let version = Command::new(&vng)
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if version.as_deref() == Some(&format!("virtme-ng {VIRTME_NG_VERSION}")) {
        return Ok(vng);
    }
    eprintln!(
        "setup: installing virtme-ng {VIRTME_NG_VERSION} into {}",
        venv.display()
    );
    if !venv.join("bin/pip").is_file() {
        run(Command::new("python3").arg("-m").arg("venv").arg(venv)).context(
            "creating a Python virtual environment for virtme-ng failed: install Python 3 with \
             its venv module (Debian: `apt-get install python3-venv`)",
        )?;
    }
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check"])
        .arg(format!("virtme-ng=={VIRTME_NG_VERSION}")))
    .context("installing virtme-ng from PyPI failed: is PyPI reachable?")?;
    Ok(vng)
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

pub fn path_with_cargo_bin() -> OsString {
    let mut dirs = vec![cargo_home().join("bin")];
    if let Some(path) = env::var_os("PATH") {
        dirs.extend(env::split_paths(&path));
    }
    env::join_paths(dirs).unwrap_or_default()
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    String::from_utf8(out.stdout).with_context(|| format!("{cmd:?} printed non-UTF-8"))
}

fn nightly_sysroot() -> Result<PathBuf> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("the nightly toolchain is needed to build the eBPF program (`rustup toolchain install nightly`)")?;
    Ok(PathBuf::from(sysroot.trim()))
}

/// `-Z build-std=core` for the bpfel target needs the standard library's source.
fn rust_src() -> Result<()> {
    let core = nightly_sysroot()?.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if core.is_file() {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker must link against the same LLVM as the nightly rustc that produces the bitcode.
/// No prebuilt binary can be downloaded, so it is built from crates.io against the LLVM shared
/// library inside the nightly toolchain: `LLVM_PREFIX` points at a directory whose `lib/` holds
/// symlinks to it (the binary keeps an rpath to that directory, so it stays in CARGO_HOME).
fn bpf_linker() -> Result<()> {
    let bin = cargo_home().join("bin/bpf-linker");
    let works = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Ok(());
    }

    let sysroot = nightly_sysroot()?;
    let verbose = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let llvm_major = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("`rustc +nightly -vV` shows no LLVM version")?
        .to_owned();
    let lib_dir = sysroot.join("lib");
    let llvm_lib = fs::read_dir(&lib_dir)
        .with_context(|| format!("listing {}", lib_dir.display()))?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;

    let prefix = cargo_home().join("bpf-linker-llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for link in ["libLLVM.so".to_owned(), llvm_lib.clone()] {
        let path = prefix_lib.join(&link);
        let _ = fs::remove_file(&path);
        std::os::unix::fs::symlink(lib_dir.join(&llvm_lib), &path)
            .with_context(|| format!("linking {}", path.display()))?;
    }

    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {llvm_major} (about a minute)"
    );
    run(Command::new("cargo")
        .args(["+nightly", "install", "bpf-linker", "--locked", "--force"])
        .args(["--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{llvm_major}"))
        .arg("--root")
        .arg(cargo_home())
        .env("LLVM_PREFIX", &prefix))
    .context("building bpf-linker failed; if the nightly's LLVM is newer than this bpf-linker supports, raise BPF_LINKER_VERSION in xtask")
}

fn debian_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !debian_package_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages {}", missing.join(" "));
    apt_get(&["update", "-q"])?;
    apt_get(
        &[
            &["install", "-y", "-q", "--no-install-recommends"],
            &missing[..],
        ]
        .concat(),
    )
}

fn debian_package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// How long set-up waits for another apt-get or dpkg (an unattended upgrade, a second set-up) to
/// finish before giving up.
const APT_LOCK_WAIT: Duration = Duration::from_secs(600);

/// Runs `apt-get ARGS`, waiting for the package manager's locks instead of failing at once.
/// `DPkg::Lock::Timeout` makes apt-get wait for dpkg's lock; apt 2.6 (Debian 12) ignores it for
/// the lock on the package lists that `apt-get update` takes, so a failure that names a lock is
/// retried here until [`APT_LOCK_WAIT`] has passed.
pub fn apt_get(args: &[&str]) -> Result<()> {
    let deadline = Instant::now() + APT_LOCK_WAIT;
    let timeout = format!("DPkg::Lock::Timeout={}", APT_LOCK_WAIT.as_secs());
    let mut waited = false;
    loop {
        let mut cmd = Command::new("apt-get");
        cmd.args(["-o", &timeout])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            // The lock is recognised by apt's message, so keep it untranslated.
            .env("LC_ALL", "C")
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped());
        let out = cmd
            .output()
            .with_context(|| format!("starting {cmd:?}: is this Debian, with apt-get on PATH?"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            eprint!("{stderr}");
            return Ok(());
        }
        let locked = stderr.contains("Could not get lock") || stderr.contains("Unable to lock");
        if !locked || Instant::now() >= deadline {
            eprint!("{stderr}");
            if locked {
                bail!(
                    "{cmd:?} failed: {}: another apt-get or dpkg held the package manager's lock \
                     for {} s; let it finish, then retry",
                    out.status,
                    APT_LOCK_WAIT.as_secs()
                );
            }
            bail!("{cmd:?} failed: {}", out.status);
        }
        if !waited {
            eprintln!("setup: another apt-get or dpkg holds the package manager's lock; waiting");
            waited = true;
        }
        thread::sleep(Duration::from_secs(5));
    }
}
