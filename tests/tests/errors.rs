//! Errors a user can act on: one line, non-zero exit, no panic.

use std::process::Command;

use tcpclose_tests::{binary, require_root, run_binary};

fn assert_one_line_error(stderr: &str, needle: &str) {
    assert!(stderr.contains(needle), "expected {needle:?} in:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("backtrace"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line:\n{stderr}");
}

#[test]
fn bad_input_exits_2_with_a_message() {
    for (args, needle) in [
        (&["--duration", "soon"][..], "--duration"),
        (&["--duration", "5"][..], "unit"),
        (&["--port", "70000"][..], "--port"),
        (&["--lport", "http"][..], "--lport"),
        (&["--no-such-flag"][..], "--no-such-flag"),
        (&["-4", "-6"][..], "cannot be used with"),
        (&["--ring-bytes", "1000"][..], "power of two"),
        (&["--port", "0"][..], "port 0"),
        (&["--lport", "0"][..], "port 0"),
        (&["--max-sockets", "0"][..], "at least 1"),
        (&["--events", "--max-sockets", "0"][..], "at least 1"),
    ] {
        let (status, _, stderr) = run_binary(Command::new(binary()).args(args));
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    let (status, stdout, _) = run_binary(Command::new(binary()).arg("--help"));
    assert_eq!(status.code(), Some(0));
    for taught in [
        "--events",
        "--json",
        "--duration",
        "--port",
        "Examples",
        "CAP_BPF",
    ] {
        assert!(stdout.contains(taught), "--help lacks {taught}");
    }
}

#[test]
fn without_privileges_says_how_to_get_them() {
    require_root();
    // Root without any capability: what `sudo` forgotten looks like to the kernel.
    let (status, _, stderr) = run_binary(
        Command::new("setpriv")
            .args([
                "--inh-caps=-all",
                "--ambient-caps=-all",
                "--bounding-set=-all",
                "--",
            ])
            .arg(binary())
            .args(["--duration", "1s"]),
    );
    assert!(!status.success());
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_one_line_error(&stderr, "needs privileges");
    assert!(
        stderr.contains("CAP_BPF") && stderr.contains("root"),
        "{stderr}"
    );
}
