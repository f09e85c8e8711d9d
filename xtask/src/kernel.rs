//! The kernels `cargo xtask test --kernel` boots: Debian's packaged 6.1, fetched through the
//! package manager and unpacked once into a cache, or any bzImage given by path.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{run, setup};

/// Where the guest finds its modules: the host's own tree, shared with the guest.
const MODULES: &str = "/lib/modules";

/// A kernel image to boot, and its release (`uname -r`, the directory of its modules).
pub struct Kernel {
    pub vmlinuz: PathBuf,
    pub release: String,
}

/// Debian 12's newest generic 6.1 kernel (`linux-image-6.1.0-N-amd64-unsigned`; the `-cloud-`
/// flavour lacks 9p, which the guest's root filesystem needs), downloaded and unpacked under
/// `cache` unless already there, with its modules installed into the host's module tree.
pub fn debian_6_1(cache: &Path) -> Result<Kernel> {
    let package = match newest_debian_6_1()? {
        Some(package) => package,
        None => {
            // A fresh machine's package lists may be empty or predate the current ABI.
            setup::apt_get(&["update", "-q"])?;
            newest_debian_6_1()?.context(
                "apt-cache lists no linux-image-6.1.0-N-amd64-unsigned: is Debian 12 \
                 (bookworm) among the sources in /etc/apt/sources.list*?",
            )?
        }
    };
    let dir = cache.join(&package);
    let tree = dir.join("root");
    if !tree.is_dir() {
        unpack(&package, &dir, &tree)?;
    }
    let boot = tree.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .with_context(|| format!("listing {}", boot.display()))?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| {
            format!(
                "{package} has no boot/vmlinuz-*: remove {} and retry",
                dir.display()
            )
        })?;
    let release = release_of(&vmlinuz)?;
    install_modules(&tree, &release)?;
    Ok(Kernel { vmlinuz, release })
}

/// A kernel image given by path; its modules must already be in the host's module tree.
pub fn from_file(vmlinuz: &Path) -> Result<Kernel> {
    let vmlinuz = vmlinuz
        .canonicalize()
        .with_context(|| format!("{}: no such kernel image", vmlinuz.display()))?;
    let release = release_of(&vmlinuz)?;
    let modules = Path::new(MODULES).join(&release);
    ensure!(
        modules.join("modules.dep").is_file(),
        "no modules for {release} in {}: install them there (e.g. `make modules_install`, or \
         unpack the kernel's package) and run `depmod {release}`",
        modules.display()
    );
    Ok(Kernel { vmlinuz, release })
}

/// The highest-numbered `linux-image-6.1.0-N-amd64-unsigned` in the package lists, if any. The
/// ABI number N is compared as a number: 6.1.0-9 is older than 6.1.0-50.
fn newest_debian_6_1() -> Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args([
            "search",
            "--names-only",
            r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
        ])
        .output()
        .context("starting apt-cache: the Debian kernel comes from Debian's package lists")?;
    ensure!(
        out.status.success(),
        "apt-cache search failed: {}",
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|name| {
            let abi = name
                .strip_prefix("linux-image-6.1.0-")?
                .strip_suffix("-amd64-unsigned")?;
            Some((abi.parse::<u32>().ok()?, name.to_owned()))
        })
        .max()
        .map(|(_, name)| name))
}

/// Downloads `package` into `dir` and unpacks it into `tree`, through a temporary directory so
/// that an interrupted run leaves no half-unpacked tree to be taken for a whole one.
fn unpack(package: &str, dir: &Path, tree: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let deb = match find_deb(dir, package)? {
        Some(deb) => deb,
        None => {
            eprintln!("kernel: downloading {package}");
            run(Command::new("apt-get")
                // As root apt-get would hand the download to the `_apt` user, who cannot
                // write into the cache: download as root and say so, to skip its warning.
                .args(["download", "-q", "-o", "APT::Sandbox::User=root", package])
                .current_dir(dir))
            .with_context(|| {
                format!("downloading {package} failed: are Debian's mirrors reachable?")
            })?;
            find_deb(dir, package)?.with_context(|| {
                format!(
                    "apt-get download left no {package}_*.deb in {}",
                    dir.display()
                )
            })?
        }
    };
    let partial = dir.join("root.partial");
    if partial.exists() {
        fs::remove_dir_all(&partial).with_context(|| format!("removing {}", partial.display()))?;
    }
    eprintln!("kernel: unpacking {}", deb.display());
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    fs::rename(&partial, tree)
        .with_context(|| format!("renaming {} to {}", partial.display(), tree.display()))
}

fn find_deb(dir: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    Ok(fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(&prefix) && n.ends_with(".deb")
            })
        }))
}

/// Copies the unpacked package's modules into the host's module tree, which the guest shares,
/// and indexes them, unless an earlier run did. A copy that stopped half-way has no
/// `modules.dep` and is redone.
fn install_modules(tree: &Path, release: &str) -> Result<()> {
    let target = Path::new(MODULES).join(release);
    if target.join("modules.dep").is_file() {
        return Ok(());
    }
    // bookworm's packages install under /lib; merged-/usr packages may use /usr/lib.
    let source = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|dir| tree.join(dir).join(release))
        .find(|dir| dir.is_dir())
        .with_context(|| {
            format!(
                "the package has no modules for {release} under {}",
                tree.display()
            )
        })?;
    eprintln!(
        "kernel: installing the modules of {release} into {}",
        target.display()
    );
    if target.exists() {
        fs::remove_dir_all(&target).with_context(|| format!("removing {}", target.display()))?;
    }
    fs::create_dir_all(MODULES).with_context(|| format!("creating {MODULES} (as root?)"))?;
    run(Command::new("cp").arg("-a").arg(&source).arg(&target))?;
    run(Command::new("depmod").arg(release)).context(
        "indexing the guest kernel's modules failed: is kmod installed (`cargo xtask setup`)?",
    )
}

/// The release of a bzImage, read from its boot header as the kernel's boot protocol defines it:
/// the magic `HdrS` at 0x202, and at 0x20e the offset (less 0x200) of a NUL-terminated version
/// string whose first word is the release.
pub fn release_of(vmlinuz: &Path) -> Result<String> {
    let image = fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let not_bzimage = || format!("{} is not a bzImage (x86 kernel image)", vmlinuz.display());
    if image.get(0x202..0x206) != Some(b"HdrS".as_slice()) {
        bail!(not_bzimage());
    }
    let offset = image
        .get(0x20e..0x210)
        .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])) + 0x200)
        .with_context(not_bzimage)?;
    let version = image
        .get(offset..)
        .and_then(|rest| rest.split(|&b| b == 0).next())
        .with_context(not_bzimage)?;
    let release = String::from_utf8_lossy(version)
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .with_context(|| format!("{} carries no version string", vmlinuz.display()))?;
    Ok(release)
}
