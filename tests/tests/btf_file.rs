//! The kernel's type information (BTF) read from a file (`--btf PATH`), for kernels without
//! `/sys/kernel/btf/vmlinux`, and the checks made against it before anything is loaded: each
//! on the real kernel, with the sysfs file hidden in a mount namespace of the test's own or the
//! file altered the way another kernel would differ.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use tcpclose_tests::{
    BoundSocket, TempDir, Tracer, binary, require_root, run_binary, set_linger_zero,
};

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// A shell script that hides the kernel's BTF (an empty tmpfs over /sys/kernel/btf) in the
/// private mount namespace it runs in, then execs its arguments.
const HIDE_SYSFS_BTF: &str = "mount -t tmpfs none /sys/kernel/btf || exit 97; \
                              [ ! -e /sys/kernel/btf/vmlinux ] || exit 98; exec \"$@\"";

/// `cmd` for running tcpclose with `args` where /sys/kernel/btf/vmlinux does not exist.
fn without_sysfs_btf(args: &[&str]) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args([
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        HIDE_SYSFS_BTF,
        "sh",
    ])
    .arg(binary())
    .args(args);
    cmd
}

/// A copy of the running kernel's BTF in `dir`, altered by `change`.
fn kernel_btf_copy(dir: &TempDir, change: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(VMLINUX).expect("reading the kernel's BTF");
    change(&mut bytes);
    let path = dir.path().join("vmlinux.btf");
    std::fs::write(&path, bytes).expect("writing the BTF copy");
    path
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

#[test]
fn runs_from_a_btf_file_where_the_kernel_has_none() {
    require_root();
    let dir = TempDir::new("btf");
    let btf = kernel_btf_copy(&dir, |_| {});
    let bound = BoundSocket::new(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let port = bound.port.to_string();
    let mut cmd = without_sysfs_btf(&["--json", "--btf", path_arg(&btf), "--port", &port]);
    cmd.env_remove("RUST_LOG");
    let tracer = Tracer::start_command(cmd);
    let listener = bound.listen();
    let client = TcpStream::connect(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        listener.local_addr().expect("address").port(),
    ))
    .expect("connect");
    let (_server, _) = listener.accept().expect("accept");
    let client_port = client.local_addr().expect("address").port();
    set_linger_zero(&client);
    drop(client);
    let records = tracer
        .wait_for_records(Duration::from_secs(10), |records| {
            records.iter().any(|r| {
                r["type"] == "teardown" && r["close"] == "reset" && r["lport"] == client_port
            })
        })
        .unwrap_or_else(|printed| panic!("no reset teardown record: {printed:#?}"));
    assert!(!records.is_empty());
    let run = tracer.stop();
    run.check_clean();
    // Timewait sockets are followed too: their layout came from the file.
    assert!(!run.stderr.contains("warning"), "{}", run.stderr);
}

#[test]
fn a_kernel_without_btf_is_told_about_btf_files() {
    require_root();
    let (status, _, stderr) = run_binary(&mut without_sysfs_btf(&["--duration", "1s"]));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line:\n{stderr}");
    for needed in [VMLINUX, "CONFIG_DEBUG_INFO_BTF", "--btf PATH", "BTFHub"] {
        assert!(stderr.contains(needed), "{needed} in {stderr}");
    }
}

#[test]
fn a_missing_or_garbled_btf_file_is_explained() {
    require_root();
    let dir = TempDir::new("btf-bad");
    let missing = dir.path().join("missing.btf");
    let (status, _, stderr) =
        run_binary(Command::new(binary()).args(["--btf", path_arg(&missing), "--duration", "1s"]));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("reading the BTF file") && stderr.contains("No such file"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line:\n{stderr}");

    let garbled = dir.path().join("garbled.btf");
    std::fs::write(&garbled, b"this is not BTF at all").expect("writing");
    let truncated = kernel_btf_copy(&dir, |bytes| bytes.truncate(bytes.len() / 2));
    for file in [&garbled, &truncated] {
        let (status, _, stderr) =
            run_binary(Command::new(binary()).args(["--btf", path_arg(file), "--duration", "1s"]));
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("is not BTF this tcpclose can read"),
            "{stderr}"
        );
        assert!(stderr.contains(path_arg(file)), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// Where `needle` (NUL-terminated in the BTF string section) is in `bytes`.
fn string_at(bytes: &[u8], needle: &str) -> Option<usize> {
    let mut wanted = needle.as_bytes().to_vec();
    wanted.push(0);
    bytes
        .windows(wanted.len())
        .enumerate()
        .find(|(at, w)| *w == wanted.as_slice() && (*at == 0 || bytes[at - 1] == 0))
        .map(|(at, _)| at)
}

const TRACEPOINT_TYPE: &str = "btf_trace_inet_sock_set_state";

#[test]
fn a_kernel_without_the_tracepoint_is_told_so() {
    require_root();
    let dir = TempDir::new("btf-no-tp");
    // As on a kernel without the tracepoint: its `btf_trace_` typedef goes by another name.
    let btf = kernel_btf_copy(&dir, |bytes| {
        let at = string_at(bytes, TRACEPOINT_TYPE).expect("the tracepoint's typedef");
        bytes[at] = b'x';
    });
    let (status, _, stderr) =
        run_binary(Command::new(binary()).args(["--btf", path_arg(&btf), "--duration", "1s"]));
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line:\n{stderr}");
    assert!(
        stderr.contains("no inet_sock_set_state tracepoint") && stderr.contains("5.8"),
        "{stderr}"
    );
}

#[test]
fn a_tracepoint_with_other_arguments_is_refused_naming_them() {
    require_root();
    let dir = TempDir::new("btf-other-tp");
    // As on a kernel whose tracepoint passes other arguments: the typedef of another tracepoint
    // with a name as long takes the name of this one, which loses its own.
    let mut other = String::new();
    let btf = kernel_btf_copy(&dir, |bytes| {
        let at = string_at(bytes, TRACEPOINT_TYPE).expect("the tracepoint's typedef");
        let len = TRACEPOINT_TYPE.len();
        let impostor = (0..bytes.len() - len)
            .find(|&i| {
                (i == 0 || bytes[i - 1] == 0)
                    && bytes[i..].starts_with(b"btf_trace_")
                    && bytes[i + len] == 0
                    && i != at
                    && bytes[i..i + len]
                        .iter()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
            })
            .expect("another tracepoint with a name as long");
        other = String::from_utf8_lossy(&bytes[impostor..impostor + len]).into_owned();
        bytes[at] = b'x';
        bytes[impostor..impostor + len].copy_from_slice(TRACEPOINT_TYPE.as_bytes());
    });
    let (status, _, stderr) =
        run_binary(Command::new(binary()).args(["--btf", path_arg(&btf), "--duration", "1s"]));
    assert_eq!(status.code(), Some(1), "{other}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line:\n{stderr}");
    assert!(
        stderr.contains("inet_sock_set_state tracepoint passes (")
            && stderr.contains("tcpclose reads (struct sock *, int, int)"),
        "{other}: {stderr}"
    );
}
