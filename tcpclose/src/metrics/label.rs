//! `--metrics-label container|pod`: which container (or pod) a teardown's phases and a hung
//! socket count for, with the number of label values bounded.
//!
//! Every value of a label multiplies the series of the metrics that carry it: a Prometheus server
//! holds each active series in memory (a few KiB each) and every scrape writes a sample of each.
//! A node runs a few dozen containers, but they come and go: labelling each one that ever ran
//! would grow without end. So only the `top` busiest values have series of their own; the rest
//! count under `other`, and sockets outside any container under `none`.

use std::collections::HashMap;

use crate::cgroups::CgroupInfo;

/// What `--metrics-label` adds to the phase histogram and the hung gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LabelBy {
    /// `container_id`: the full id of the socket's container.
    Container,
    /// `pod_uid`: the Kubernetes pod UID of the socket's pod.
    Pod,
}

impl LabelBy {
    /// The label's name, as records name the field (joins with kube-state-metrics' `uid` and
    /// cAdvisor's container ids).
    pub fn key(self) -> &'static str {
        match self {
            Self::Container => "container_id",
            Self::Pod => "pod_uid",
        }
    }

    /// The value for a socket in the cgroup `info` describes (`None`: unknown or gone).
    pub fn value(self, info: Option<&CgroupInfo>) -> &str {
        let value = match self {
            Self::Container => info.and_then(|i| i.container_id.as_deref()),
            Self::Pod => info.and_then(|i| i.pod_uid.as_deref()),
        };
        value.unwrap_or(NONE)
    }
}

/// The value for sockets outside any container (or pod), or whose cgroup is unknown.
pub const NONE: &str = "none";
/// The value for the containers beyond the `top` busiest.
pub const OTHER: &str = "other";
/// The default `--metrics-label-top`.
pub const DEFAULT_TOP: u16 = 20;

/// How many candidates are counted per value admitted: a newcomer must be busier than these
/// to enter.
const CANDIDATES_PER_VALUE: usize = 8;

/// The label values with series of their own: the `top` busiest, by teardowns and hung sockets
/// counted with a decay (halved at every [`LabelValues::rerank`]), so that a container that was
/// busy an hour ago gives way to one busy now.
#[derive(Debug)]
pub struct LabelValues {
    top: usize,
    /// Recent activity per value, for at most `top * CANDIDATES_PER_VALUE` values.
    activity: HashMap<String, u64>,
    /// The values with series of their own: at most `top`.
    admitted: Vec<String>,
}

impl LabelValues {
    pub fn new(top: usize) -> Self {
        let top = top.max(1);
        Self {
            top,
            activity: HashMap::new(),
            admitted: Vec::new(),
        }
    }

    /// Counts activity for `value` and says which label value it counts under now: itself when
    /// admitted (a value is admitted at once while there is room), else [`OTHER`].
    pub fn label<'a>(&mut self, value: &'a str, weight: u64) -> &'a str {
        if value == NONE {
            return NONE;
        }
        match self.activity.get_mut(value) {
            Some(n) => *n = n.saturating_add(weight),
            None => {
                if self.activity.len() >= self.top.saturating_mul(CANDIDATES_PER_VALUE).max(1) {
                    // Make room: forget the quietest candidate that is not admitted.
                    let quietest = self
                        .activity
                        .iter()
                        .filter(|(v, _)| !self.admitted.iter().any(|a| a == *v))
                        .min_by_key(|(_, n)| **n)
                        .map(|(v, _)| v.clone());
                    if let Some(v) = quietest {
                        self.activity.remove(&v);
                    }
                }
                self.activity.insert(value.to_owned(), weight);
            }
        }
        if self.admitted.iter().any(|a| a == value) {
            return value;
        }
        if self.admitted.len() < self.top {
            self.admitted.push(value.to_owned());
            return value;
        }
        OTHER
    }

    /// Whether `value` has series of its own.
    pub fn is_admitted(&self, value: &str) -> bool {
        value == NONE || self.admitted.iter().any(|a| a == value)
    }

    /// The values admitted now.
    pub fn admitted(&self) -> &[String] {
        &self.admitted
    }

    /// Admits the `top` busiest values, halves every count, and returns the values no longer
    /// admitted: their series are to be removed (their future counts go to [`OTHER`]).
    pub fn rerank(&mut self) -> Vec<String> {
        let mut ranked: Vec<(&String, u64)> = self.activity.iter().map(|(v, n)| (v, *n)).collect();
        // Busiest first; an admitted value keeps its place on a tie, then by name for a stable
        // order.
        ranked.sort_by(|a, b| {
            let admitted = |v: &String| self.admitted.contains(v);
            b.1.cmp(&a.1)
                .then_with(|| admitted(b.0).cmp(&admitted(a.0)))
                .then_with(|| a.0.cmp(b.0))
        });
        let next: Vec<String> = ranked
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .take(self.top)
            .map(|(v, _)| v.clone())
            .collect();
        let dropped = self
            .admitted
            .iter()
            .filter(|v| !next.contains(v))
            .cloned()
            .collect();
        self.admitted = next;
        self.activity.retain(|_, n| {
            *n /= 2;
            *n > 0
        });
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busiest_values_keep_their_own_series_and_the_rest_count_as_other() {
        let mut values = LabelValues::new(2);
        assert_eq!(values.label("a", 1), "a");
        assert_eq!(values.label("b", 1), "b");
        assert_eq!(values.label("c", 1), OTHER, "no room left");
        assert_eq!(
            values.label(NONE, 1),
            NONE,
            "outside containers is never other"
        );
        for _ in 0..10 {
            values.label("c", 1);
        }
        values.label("a", 5);
        assert_eq!(values.rerank(), vec!["b".to_owned()]);
        assert_eq!(values.admitted(), ["c".to_owned(), "a".to_owned()]);
        assert_eq!(values.label("c", 1), "c");
        assert_eq!(values.label("b", 1), OTHER);
        assert!(values.is_admitted(NONE) && !values.is_admitted("b"));
    }

    #[test]
    fn candidates_are_bounded_however_many_values_come() {
        let mut values = LabelValues::new(3);
        for i in 0..10_000 {
            values.label(&format!("c{i}"), 1);
        }
        assert!(values.activity.len() <= 3 * CANDIDATES_PER_VALUE);
        assert_eq!(values.admitted().len(), 3);
        values.rerank();
        assert!(values.admitted().len() <= 3);
    }

    #[test]
    fn quiet_values_give_way_over_time() {
        let mut values = LabelValues::new(1);
        values.label("old", 1_000);
        values.rerank();
        assert_eq!(values.admitted(), ["old".to_owned()]);
        for _ in 0..12 {
            values.label("new", 10);
            values.rerank();
        }
        assert_eq!(values.admitted(), ["new".to_owned()]);
    }

    #[test]
    fn values_come_from_the_cgroup() {
        let info = CgroupInfo::of_path(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1a2b3c4d_0000_4000_8000_000000000001.slice/cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope",
        );
        assert_eq!(
            LabelBy::Container.value(Some(&info)),
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
        );
        assert_eq!(
            LabelBy::Pod.value(Some(&info)),
            "1a2b3c4d-0000-4000-8000-000000000001"
        );
        assert_eq!(LabelBy::Pod.value(None), NONE);
        assert_eq!(
            LabelBy::Container.value(Some(&CgroupInfo::of_path("/user.slice"))),
            NONE
        );
    }
}
