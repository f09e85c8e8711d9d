//! Compiles the eBPF program (`tcpclose-ebpf`) for the BPF target with the nightly toolchain and
//! bpf-linker, and leaves it in `OUT_DIR` for `include_bytes!`.

use std::{env, path::Path};

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PATH");
    let found = env::var_os("PATH")
        .map(|path| env::split_paths(&path).any(|dir| dir.join("bpf-linker").is_file()))
        .unwrap_or(false);
    if !found {
        bail!(
            "bpf-linker is not on PATH; it links the eBPF program. \
             Run `cargo xtask setup` (or build with `cargo xtask build`), which installs it."
        );
    }
    let root_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tcpclose-ebpf");
    let root_dir = root_dir.to_str().context("workspace path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "tcpclose-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF program failed; `cargo xtask setup` installs what it needs")
}
