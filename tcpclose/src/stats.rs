//! Teardown latency distributions: per phase and close kind, optionally split by a group (local
//! port, remote port or command), with percentiles and a log2 view. Pure: teardown records in,
//! reports out.

// Looked up once per phase of every teardown record: foldhash, not SipHash. Flooding it with
// keys gains nothing: the groups are capped (`max_groups`).
use foldhash::{HashMap, HashMapExt as _};
use hdrhistogram::Histogram;

use crate::teardown::{CloseKind, Phase, Teardown};

/// What `--group-by` splits the distributions by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBy {
    Lport,
    Rport,
    Comm,
    /// The socket's container (short id); `-` outside containers.
    Container,
    /// The socket's Kubernetes pod (UID); `-` outside pods.
    Pod,
    /// The socket's cgroup2 path.
    Cgroup,
    /// The socket's network namespace (inode).
    Netns,
}

impl GroupBy {
    /// As `--group-by` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lport => "lport",
            Self::Rport => "rport",
            Self::Comm => "comm",
            Self::Container => "container",
            Self::Pod => "pod",
            Self::Cgroup => "cgroup",
            Self::Netns => "netns",
        }
    }

    /// Whether the group is where the socket lives (its cgroup or namespace), which only the
    /// caller can name: see [`Distributions::record_in`].
    pub fn by_placement(self) -> bool {
        matches!(
            self,
            Self::Container | Self::Pod | Self::Cgroup | Self::Netns
        )
    }
}

/// Longest duration tracked with full precision (longer ones count at this value; `max` stays
/// exact): an hour.
const HIGHEST_NS: u64 = 3_600_000_000_000;

/// One distribution of durations.
#[derive(Clone, Debug)]
pub struct Dist {
    /// Two significant digits: percentiles within 1%.
    hdr: Histogram<u64>,
    /// Counts per power of two of microseconds, as bcc's log2 histograms show them: index 0 is
    /// 0-1 us, index k is [2^k, 2^(k+1)) us.
    log2_us: [u64; 64],
    max_ns: u64,
}

impl Default for Dist {
    fn default() -> Self {
        Self {
            // The bounds are constants that `new_with_bounds` accepts.
            hdr: Histogram::new_with_bounds(1, HIGHEST_NS, 2)
                .unwrap_or_else(|_| Histogram::new(2).unwrap_or_else(|_| unreachable!())),
            log2_us: [0; 64],
            max_ns: 0,
        }
    }
}

impl Dist {
    pub fn record(&mut self, ns: u64) {
        self.hdr.saturating_record(ns.max(1));
        let us = ns / 1_000;
        let bucket = if us < 2 {
            0
        } else {
            63 - us.leading_zeros() as usize
        };
        self.log2_us[bucket] += 1;
        self.max_ns = self.max_ns.max(ns);
    }

    pub fn merge(&mut self, other: &Dist) {
        // Same bounds on both sides: cannot fail.
        let _ = self.hdr.add(&other.hdr);
        for (a, b) in self.log2_us.iter_mut().zip(other.log2_us) {
            *a += b;
        }
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    pub fn count(&self) -> u64 {
        self.hdr.len()
    }

    /// The value at `q` (0..=1), within 1%.
    pub fn quantile(&self, q: f64) -> u64 {
        self.hdr.value_at_quantile(q).min(self.max_ns)
    }

    pub fn max_ns(&self) -> u64 {
        self.max_ns
    }

    /// `(low_us, high_us, count)` of the log2 buckets from the first to the last non-empty one.
    pub fn log2_buckets(&self) -> Vec<(u64, u64, u64)> {
        let used: Vec<usize> = (0..64).filter(|&i| self.log2_us[i] > 0).collect();
        let (Some(&first), Some(&last)) = (used.first(), used.last()) else {
            return Vec::new();
        };
        (first..=last)
            .map(|i| {
                let (lo, hi) = if i == 0 {
                    (0, 1)
                } else {
                    (1u64 << i, (1u64 << (i + 1)) - 1)
                };
                (lo, hi, self.log2_us[i])
            })
            .collect()
    }
}

/// The distributions of one group.
#[derive(Clone, Debug, Default)]
pub struct Group {
    dists: HashMap<(Phase, CloseKind), Dist>,
    teardowns: u64,
}

impl Group {
    fn record(&mut self, t: &Teardown) {
        self.teardowns += 1;
        for (phase, ns) in t.phases.iter() {
            self.dists.entry((phase, t.close)).or_default().record(ns);
        }
    }

    fn merge(&mut self, other: &Group) {
        self.teardowns += other.teardowns;
        for (key, d) in &other.dists {
            self.dists.entry(*key).or_default().merge(d);
        }
    }

    /// Per phase and close kind, in the order of [`Phase::ALL`].
    pub fn rows(&self) -> Vec<(Phase, CloseKind, &Dist)> {
        let mut rows: Vec<_> = self.dists.iter().map(|((p, c), d)| (*p, *c, d)).collect();
        rows.sort_by_key(|(p, c, _)| (*p as usize, c.name()));
        rows
    }

    /// Per phase, all close kinds together.
    pub fn phases(&self) -> Vec<(Phase, Dist)> {
        Phase::ALL
            .into_iter()
            .filter_map(|phase| {
                let mut merged: Option<Dist> = None;
                for ((p, _), d) in &self.dists {
                    if *p == phase {
                        merged.get_or_insert_with(Dist::default).merge(d);
                    }
                }
                merged.map(|d| (phase, d))
            })
            .collect()
    }

    pub fn teardowns(&self) -> u64 {
        self.teardowns
    }
}

/// All distributions of a run.
#[derive(Debug)]
pub struct Distributions {
    group_by: Option<GroupBy>,
    /// Everything, when not grouped.
    all: Group,
    groups: HashMap<String, Group>,
    /// Groups beyond the cap, together.
    other: Group,
    max_groups: usize,
}

/// Name of the group of everything beyond the groups shown.
pub const OTHER: &str = "other";

impl Distributions {
    /// `max_groups` bounds the groups kept apart (the rest go to "other").
    pub fn new(group_by: Option<GroupBy>, max_groups: usize) -> Self {
        Self {
            group_by,
            all: Group::default(),
            groups: HashMap::new(),
            other: Group::default(),
            max_groups: max_groups.max(1),
        }
    }

    pub fn group_by(&self) -> Option<GroupBy> {
        self.group_by
    }

    /// Counts `t` in its group. Grouped by where sockets live ([`GroupBy::by_placement`]), the
    /// group is the socket's raw id: the caller names it with [`Distributions::record_in`].
    pub fn record(&mut self, t: &Teardown) {
        // Per teardown: no key to build when not grouped.
        let key = match self.group_by {
            None => return self.all.record(t),
            Some(GroupBy::Lport) => t.local.port().to_string(),
            Some(GroupBy::Rport) => t.remote.port().to_string(),
            Some(GroupBy::Comm) => t
                .owner
                .as_ref()
                .map_or_else(|| "?".to_owned(), |o| o.comm().into_owned()),
            Some(GroupBy::Netns) => t
                .placement
                .netns()
                .map_or_else(|| "?".to_owned(), |n| n.to_string()),
            Some(GroupBy::Container | GroupBy::Pod | GroupBy::Cgroup) => t
                .placement
                .cgroup()
                .map_or_else(|| "?".to_owned(), |id| format!("cgroup id {id}")),
        };
        self.record_in(key, t);
    }

    /// Counts `t` in the group `key` (or in "other", beyond the groups kept apart).
    pub fn record_in(&mut self, key: String, t: &Teardown) {
        if self.group_by.is_none() {
            return self.all.record(t);
        }
        if let Some(group) = self.groups.get_mut(&key) {
            group.record(t);
        } else if self.groups.len() < self.max_groups {
            self.groups.entry(key).or_default().record(t);
        } else {
            self.other.record(t);
        }
    }

    /// The `top` groups with the most teardowns, then the rest merged as "other"; `None` as the
    /// name when not grouped.
    pub fn report(&self, top: usize) -> Vec<(Option<String>, Group)> {
        if self.group_by.is_none() {
            return if self.all.teardowns == 0 {
                Vec::new()
            } else {
                vec![(None, self.all.clone())]
            };
        }
        let mut groups: Vec<(&String, &Group)> = self.groups.iter().collect();
        groups.sort_by(|a, b| b.1.teardowns.cmp(&a.1.teardowns).then(a.0.cmp(b.0)));
        let mut other = self.other.clone();
        let mut out = Vec::new();
        for (i, (name, group)) in groups.into_iter().enumerate() {
            if i < top {
                out.push((Some(name.clone()), group.clone()));
            } else {
                other.merge(group);
            }
        }
        if other.teardowns > 0 {
            out.push((Some(OTHER.to_owned()), other));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn teardown(port: u16, close: CloseKind, phases: &[(Phase, u64)]) -> Teardown {
        Teardown {
            local: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            remote: "127.0.0.1:80".parse().unwrap(),
            ..Teardown::sample(close, phases)
        }
    }

    #[test]
    fn percentiles_and_log2_buckets() {
        let mut d = Dist::default();
        for ms in 1..=1_000 {
            d.record(ms * MS);
        }
        assert_eq!(d.count(), 1_000);
        let within = |v: u64, want: u64| v.abs_diff(want) <= want / 100;
        assert!(within(d.quantile(0.5), 500 * MS), "{}", d.quantile(0.5));
        assert!(within(d.quantile(0.99), 990 * MS), "{}", d.quantile(0.99));
        assert!(within(d.quantile(0.999), 999 * MS), "{}", d.quantile(0.999));
        assert_eq!(d.max_ns(), 1_000 * MS);
        let buckets = d.log2_buckets();
        // 1 ms = 1000 us lies in [512, 1023]; 1 s = 1e6 us in [524288, 1048575].
        assert_eq!(buckets.first(), Some(&(512, 1023, 1)));
        assert_eq!(
            buckets.last().map(|b| (b.0, b.1)),
            Some((524_288, 1_048_575))
        );
        assert_eq!(buckets.iter().map(|b| b.2).sum::<u64>(), 1_000);
        // Sub-microsecond values land in the first bucket.
        let mut tiny = Dist::default();
        tiny.record(300);
        assert_eq!(tiny.log2_buckets(), vec![(0, 1, 1)]);
    }

    #[test]
    fn grouped_top_n_and_the_rest_as_other() {
        let mut all = Distributions::new(Some(GroupBy::Lport), 3);
        for (port, n) in [(1000, 5), (2000, 3), (3000, 1), (4000, 7), (5000, 2)] {
            for _ in 0..n {
                all.record(&teardown(
                    port,
                    CloseKind::Passive,
                    &[(Phase::CloseWait, 300 * MS), (Phase::LastAck, MS)],
                ));
            }
        }
        // Groups 4000 and 5000 came after the cap of 3: counted in "other" all along.
        let report = all.report(2);
        let names: Vec<_> = report
            .iter()
            .map(|(n, g)| (n.clone(), g.teardowns()))
            .collect();
        assert_eq!(
            names,
            vec![
                (Some("1000".into()), 5),
                (Some("2000".into()), 3),
                (Some(OTHER.into()), 1 + 7 + 2)
            ]
        );
        let (_, first) = &report[0];
        let rows = first.rows();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].0, rows[0].1),
            (Phase::CloseWait, CloseKind::Passive)
        );
        assert_eq!(rows[0].2.count(), 5);
        assert_eq!(first.phases().len(), 2);
    }

    #[test]
    fn ungrouped_merges_close_kinds_per_phase() {
        let mut all = Distributions::new(None, 16);
        assert!(all.report(10).is_empty());
        all.record(&teardown(
            1,
            CloseKind::Active,
            &[(Phase::FinWait2, 10 * MS)],
        ));
        all.record(&teardown(
            2,
            CloseKind::FinTimeout,
            &[(Phase::FinWait2, 2_000 * MS)],
        ));
        let report = all.report(10);
        assert_eq!(report.len(), 1);
        assert_eq!(report[0].0, None);
        let phases = report[0].1.phases();
        assert_eq!(phases.len(), 1);
        assert_eq!(phases[0].1.count(), 2);
        assert_eq!(report[0].1.rows().len(), 2);
    }
}
