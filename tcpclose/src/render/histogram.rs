//! Teardown latency distributions: a log2 histogram per phase as bcc and bpftrace print them, and
//! a percentile table per phase and close kind; or `histogram` JSON records.

use std::io::{self, Write};

use jiff::Timestamp;
use serde::Serialize;

use super::{Format, WallClock, human};
use crate::stats::{Dist, Group};

/// Quantiles shown: p50, p90, p99, p99.9.
const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];
/// Width of the bars.
const BAR: usize = 40;

#[derive(Serialize)]
struct Bucket {
    low_us: u64,
    high_us: u64,
    count: u64,
}

#[derive(Serialize)]
struct HistogramRecord<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    time: Timestamp,
    ts_ns: u64,
    group_by: Option<&'a str>,
    group: Option<&'a str>,
    phase: &'static str,
    close: &'static str,
    count: u64,
    p50_ns: u64,
    p90_ns: u64,
    p99_ns: u64,
    p999_ns: u64,
    max_ns: u64,
    log2_us: Vec<Bucket>,
}

/// Prints the distributions of `groups` (name `None` when not grouped) at `now_ns`.
pub fn print_distributions(
    out: &mut impl Write,
    format: Format,
    clock: &WallClock,
    now_ns: u64,
    group_by: Option<&str>,
    groups: &[(Option<String>, Group)],
) -> io::Result<()> {
    for (name, group) in groups {
        match format {
            Format::Json => {
                for (phase, close, d) in group.rows() {
                    let q = QUANTILES.map(|q| d.quantile(q));
                    let record = HistogramRecord {
                        kind: "histogram",
                        time: clock.timestamp(now_ns),
                        ts_ns: now_ns,
                        group_by,
                        group: name.as_deref(),
                        phase: phase.name(),
                        close: close.name(),
                        count: d.count(),
                        p50_ns: q[0],
                        p90_ns: q[1],
                        p99_ns: q[2],
                        p999_ns: q[3],
                        max_ns: d.max_ns(),
                        log2_us: d
                            .log2_buckets()
                            .into_iter()
                            .map(|(low_us, high_us, count)| Bucket {
                                low_us,
                                high_us,
                                count,
                            })
                            .collect(),
                    };
                    serde_json::to_writer(&mut *out, &record)?;
                    out.write_all(b"\n")?;
                }
            }
            Format::Text => {
                match (group_by, name) {
                    (Some(by), Some(name)) => writeln!(
                        out,
                        "\n-- teardown phases since start, {by} {name}: {} teardowns --",
                        group.teardowns()
                    )?,
                    _ => writeln!(
                        out,
                        "\n-- teardown phases since start: {} teardowns --",
                        group.teardowns()
                    )?,
                }
                for (phase, d) in group.phases() {
                    writeln!(out, "\n{}", phase.name())?;
                    write_log2(out, &d)?;
                }
                let rows = group.rows();
                if rows.is_empty() {
                    writeln!(out, "(no teardown phases: only resets and failures)")?;
                    continue;
                }
                writeln!(
                    out,
                    "\n{:<11} {:<12} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
                    "PHASE", "CLOSE", "COUNT", "P50", "P90", "P99", "P99.9", "MAX"
                )?;
                for (phase, close, d) in rows {
                    let q = QUANTILES.map(|q| human(d.quantile(q)));
                    writeln!(
                        out,
                        "{:<11} {:<12} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
                        phase.name(),
                        close.name(),
                        d.count(),
                        q[0],
                        q[1],
                        q[2],
                        q[3],
                        human(d.max_ns())
                    )?;
                }
            }
        }
    }
    Ok(())
}

/// bcc's `print_log2_hist`: `low -> high : count |****|`, in microseconds.
fn write_log2(out: &mut impl Write, d: &Dist) -> io::Result<()> {
    let buckets = d.log2_buckets();
    let peak = buckets.iter().map(|b| b.2).max().unwrap_or(0).max(1);
    writeln!(out, "{:>20} : {:<8} distribution", "usecs", "count")?;
    for (low, high, count) in buckets {
        let stars = ((count as u128 * BAR as u128).div_ceil(peak as u128)) as usize;
        let stars = if count == 0 { 0 } else { stars.min(BAR) };
        writeln!(
            out,
            "{:>10} -> {:<9}: {:<8} |{:<BAR$}|",
            low,
            high,
            count,
            "*".repeat(stars)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        stats::Distributions,
        teardown::{CloseKind, Phase, Teardown},
    };

    const MS: u64 = 1_000_000;

    fn fixed() -> Vec<(Option<String>, Group)> {
        let mut all = Distributions::new(None, 4);
        for (ms, n) in [(1, 2), (3, 4), (300, 1)] {
            for _ in 0..n {
                all.record(&Teardown::sample(
                    CloseKind::Passive,
                    &[(Phase::CloseWait, ms * MS)],
                ));
            }
        }
        all.report(10)
    }

    #[test]
    fn log2_histogram_as_bcc_prints_it() {
        let mut out = Vec::new();
        print_distributions(
            &mut out,
            Format::Text,
            &WallClock::with_offset(0),
            0,
            None,
            &fixed(),
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        let expected = "
-- teardown phases since start: 7 teardowns --

CLOSE_WAIT
               usecs : count    distribution
       512 -> 1023     : 2        |********************                    |
      1024 -> 2047     : 0        |                                        |
      2048 -> 4095     : 4        |****************************************|
      4096 -> 8191     : 0        |                                        |
      8192 -> 16383    : 0        |                                        |
     16384 -> 32767    : 0        |                                        |
     32768 -> 65535    : 0        |                                        |
     65536 -> 131071   : 0        |                                        |
    131072 -> 262143   : 0        |                                        |
    262144 -> 524287   : 1        |**********                              |

PHASE       CLOSE           COUNT      P50      P90      P99    P99.9      MAX
CLOSE_WAIT  passive             7   3.01ms    300ms    300ms    300ms    300ms
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn json_records_per_phase_and_close() {
        let mut out = Vec::new();
        print_distributions(
            &mut out,
            Format::Json,
            &WallClock::with_offset(0),
            5,
            Some("lport"),
            &fixed(),
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["type"], "histogram");
        assert_eq!(v["phase"], "CLOSE_WAIT");
        assert_eq!(v["close"], "passive");
        assert_eq!(v["count"], 7);
        assert_eq!(v["group_by"], "lport");
        assert!(v["group"].is_null());
        assert_eq!(v["max_ns"], 300 * MS);
        assert_eq!(v["log2_us"][0]["low_us"], 512);
        assert_eq!(v["log2_us"][0]["count"], 2);
    }
}
