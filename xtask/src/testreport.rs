//! What a test binary's output (the libtest harness's) says: its result lines, the tests that
//! failed and what each printed, so that a run whose output is in a file can be reported briefly.

/// Lines of one failed test's output shown in a report; the rest stays in the output file.
const FAILURE_LINES: usize = 25;

#[derive(Debug, Default, PartialEq)]
pub struct Report {
    /// The `test result: ...` lines (one per harness run; a binary runs one).
    pub results: Vec<String>,
    /// Failed tests with what each printed (its panic message first), shortened.
    pub failures: Vec<(String, Vec<String>)>,
}

impl Report {
    pub fn parse(output: &str) -> Self {
        let mut report = Report::default();
        let mut current: Option<(String, Vec<String>)> = None;
        for line in output.lines() {
            if line.starts_with("test result: ") {
                report.results.push(line.to_owned());
            }
            if let Some(name) = line
                .strip_prefix("test ")
                .and_then(|rest| rest.strip_suffix(" ... FAILED"))
            {
                report.failures.push((name.to_owned(), Vec::new()));
                continue;
            }
            // A failure's output runs from its `---- NAME stdout ----` header to the next header
            // or to the `failures:` list that follows the last one.
            if let Some(name) = line
                .strip_prefix("---- ")
                .and_then(|rest| rest.strip_suffix(" stdout ----"))
            {
                report.attach(current.take());
                current = Some((name.to_owned(), Vec::new()));
                continue;
            }
            if line == "failures:" || line.starts_with("test result: ") {
                report.attach(current.take());
                continue;
            }
            if let Some((_, lines)) = current.as_mut() {
                lines.push(line.to_owned());
            }
        }
        report.attach(current);
        report
    }

    fn attach(&mut self, block: Option<(String, Vec<String>)>) {
        let Some((name, mut lines)) = block else {
            return;
        };
        while lines.last().is_some_and(|l| l.trim().is_empty()) {
            lines.pop();
        }
        let blank = lines.iter().take_while(|l| l.trim().is_empty()).count();
        lines.drain(..blank);
        if lines.len() > FAILURE_LINES {
            let more = lines.len() - FAILURE_LINES;
            lines.truncate(FAILURE_LINES);
            lines.push(format!("... {more} more lines"));
        }
        match self.failures.iter_mut().find(|(n, _)| *n == name) {
            Some((_, output)) => *output = lines,
            None => self.failures.push((name, lines)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "\
running 3 tests
test a ... ok
test b ... FAILED
test c ... FAILED

failures:

---- b stdout ----

thread 'b' panicked at tests/b.rs:1:1:
boom
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace

---- c stdout ----
thread 'c' panicked at tests/c.rs:2:2:
bang


failures:
    b
    c

test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s

";

    #[test]
    fn finds_results_failures_and_their_panics() {
        let report = Report::parse(OUTPUT);
        assert_eq!(
            report.results,
            [
                "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s"
            ]
        );
        assert_eq!(report.failures.len(), 2);
        assert_eq!(report.failures[0].0, "b");
        assert_eq!(
            report.failures[0].1[0],
            "thread 'b' panicked at tests/b.rs:1:1:"
        );
        assert_eq!(report.failures[1].0, "c");
        assert_eq!(
            report.failures[1].1,
            ["thread 'c' panicked at tests/c.rs:2:2:", "bang"]
        );
    }

    #[test]
    fn a_cut_off_run_has_no_result() {
        let report = Report::parse("running 2 tests\ntest a ... ok\n");
        assert!(report.results.is_empty());
        assert!(report.failures.is_empty());
    }

    #[test]
    fn long_failure_output_is_shortened() {
        let body: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let output = format!(
            "test x ... FAILED\n\nfailures:\n\n---- x stdout ----\n{body}\nfailures:\n    x\n"
        );
        let report = Report::parse(&output);
        assert_eq!(report.failures[0].1.len(), FAILURE_LINES + 1);
        assert_eq!(report.failures[0].1[FAILURE_LINES], "... 75 more lines");
    }
}
