//! cgroup2 cgroups: where the hierarchy is mounted, a cgroup's id from its directory and its
//! directory from its id, and what its path says of the container and the Kubernetes pod.
//!
//! The kernel programs report a socket's cgroup by id (`kernfs_node.id`, which is also its
//! directory's inode number on the cgroup2 mount). Ids are 64-bit and never reused, so an id
//! resolved once stays right; a cgroup created after start is resolved when first seen.

use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};
use std::{
    ffi::CString,
    fs,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Weak, mpsc},
};

use anyhow::{Context as _, Result, bail};

/// `CGROUP2_SUPER_MAGIC` (include/uapi/linux/magic.h).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// `FILEID_KERNFS` (include/linux/exportfs.h): a kernfs file handle is the node's 64-bit id.
const FILEID_KERNFS: i32 = 0xfe;
/// Resolved cgroups kept at most; the cache starts over when full.
const MAX_CACHED: usize = 16_384;

/// A cgroup2 mount as `/proc/self/mountinfo` shows it.
#[derive(Debug, PartialEq, Eq)]
pub struct Cgroup2Mount {
    pub path: PathBuf,
    /// The cgroup the mount shows as its root, relative to this process's cgroup namespace
    /// (cgroup_show_path()): `/` for the namespace's own root, `/../..` for a cgroup two levels
    /// above it.
    pub root: String,
}

impl Cgroup2Mount {
    /// How high the mount's root is: the `..` components of its root, less its other components.
    fn height(&self) -> isize {
        self.root
            .split('/')
            .filter(|c| !c.is_empty())
            .map(|c| if c == ".." { 1 } else { -1 })
            .sum()
    }
}

/// The cgroup2 mount in `mountinfo` (the text of `/proc/self/mountinfo`) that shows the most of
/// the hierarchy: `/sys/fs/cgroup` on a pure cgroup2 host, `/sys/fs/cgroup/unified` on a hybrid
/// one. In a cgroup namespace of its own (a Kubernetes pod's), the cgroup2 file system mounted in
/// the container shows only the namespace's subtree, while a bind of the host's mount (a hostPath
/// volume) shows the whole hierarchy, its root above the namespace's: that one is chosen.
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<Cgroup2Mount> {
    let mut best: Option<Cgroup2Mount> = None;
    for line in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
        let Some((mount, fs)) = line.split_once(" - ") else {
            continue;
        };
        if fs.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let mut fields = mount.split_whitespace().skip(3);
        let (Some(root), Some(path)) = (fields.next(), fields.next()) else {
            continue;
        };
        let found = Cgroup2Mount {
            path: PathBuf::from(unescape(path)),
            root: unescape(root),
        };
        if best.as_ref().is_none_or(|b| found.height() > b.height()) {
            best = Some(found);
        }
    }
    best
}

/// A mountinfo path: the kernel writes space, tab, newline and backslash as octal escapes
/// (`\040`, mangle_path()).
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 4);
        match code.and_then(|c| u8::from_str_radix(c, 8).ok()) {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// This host's cgroup2 mount that shows the most of the hierarchy (see [`cgroup2_mount_in`]).
pub fn cgroup2_mount() -> Result<PathBuf> {
    Ok(widest_cgroup2_mount()?.path)
}

fn widest_cgroup2_mount() -> Result<Cgroup2Mount> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    cgroup2_mount_in(&mountinfo).context(
        "no cgroup2 file system is mounted (see /proc/self/mountinfo): mount one with \
         `mount -t cgroup2 none /sys/fs/cgroup`",
    )
}

/// Whether this process's cgroup namespace is not the host's (that of pid 1, when visible, as
/// in a pod with `hostPID`): then a cgroup2 mount whose root is `/` shows only its part of the
/// hierarchy.
fn in_own_cgroup_namespace() -> bool {
    let ns = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/cgroup")).ok();
    matches!((ns("self"), ns("1")), (Some(own), Some(init)) if own != init)
}

/// The id of the cgroup2 cgroup `arg`: a directory on the cgroup2 mount, given as a path, or
/// relative to the mount's root (`/kubepods.slice` and `kubepods.slice` alike).
pub fn cgroup_id(arg: &str) -> Result<u64> {
    let mount = cgroup2_mount()?;
    let given = Path::new(arg);
    let path = if given.starts_with(&mount) {
        given.to_path_buf()
    } else {
        mount.join(arg.trim_start_matches('/'))
    };
    let meta = fs::metadata(&path).with_context(|| {
        format!(
            "no cgroup {arg}: {} is not there (give a directory of the cgroup2 hierarchy, \
             absolute or relative to {})",
            path.display(),
            mount.display()
        )
    })?;
    if !meta.is_dir() {
        bail!("{} is not a cgroup: not a directory", path.display());
    }
    if filesystem_type(&path)? != CGROUP2_SUPER_MAGIC {
        bail!("{} is not on the cgroup2 file system", path.display());
    }
    Ok(meta.ino())
}

fn filesystem_type(path: &Path) -> Result<i64> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .with_context(|| format!("{} has a NUL byte", path.display()))?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c_path` is NUL-terminated and `stat` is a valid place for one statfs.
    if unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    // SAFETY: statfs() succeeded and filled it.
    #[allow(clippy::unnecessary_cast, reason = "f_type is not i64 on every target")]
    Ok(unsafe { stat.assume_init() }.f_type as i64)
}

/// What a cgroup's path tells about where a socket's process runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupInfo {
    /// Relative to the cgroup2 root, starting with `/`.
    pub path: String,
    /// The full container id, when the path is a container runtime's.
    pub container_id: Option<String>,
    /// The Kubernetes pod UID, with dashes.
    pub pod_uid: Option<String>,
}

impl CgroupInfo {
    pub fn of_path(path: &str) -> Self {
        Self {
            path: path.to_owned(),
            container_id: container_id(path),
            pod_uid: pod_uid(path),
        }
    }

    /// What names its container in a line of text, when it is one (a container id or a pod in
    /// its path): see [`CgroupInfo::short`].
    pub fn container_name(&self) -> Option<&str> {
        self.short()
            .filter(|_| self.container_id.is_some() || self.pod_uid.is_some())
    }

    /// What names the container in a line of text: its id's first 12 characters (as `docker ps`
    /// and `crictl ps` show it), else the cgroup's last component; `None` for the root cgroup.
    pub fn short(&self) -> Option<&str> {
        match &self.container_id {
            Some(id) => Some(&id[..12.min(id.len())]),
            None => self.path.rsplit('/').next().filter(|last| !last.is_empty()),
        }
    }
}

/// The container id in a cgroup path: the innermost component that is a runtime's scope
/// (`cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`, `libpod-<id>.scope`:
/// the systemd driver) or 64 hex digits alone (the cgroupfs driver: `/kubepods/<qos>/pod<uid>/<id>`,
/// `/docker/<id>`).
pub fn container_id(path: &str) -> Option<String> {
    path.rsplit('/').find_map(|component| {
        let id = match component.strip_suffix(".scope") {
            Some(scope) => ["cri-containerd-", "crio-", "docker-", "libpod-"]
                .iter()
                .find_map(|prefix| scope.strip_prefix(prefix))?,
            None => component,
        };
        is_container_id(id).then(|| id.to_owned())
    })
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The pod UID in a cgroup path: `kubepods-<qos>-pod<uid with underscores>.slice` or
/// `kubepods-pod<uid>.slice` (systemd driver), `pod<uid>` (cgroupfs driver).
pub fn pod_uid(path: &str) -> Option<String> {
    path.rsplit('/').find_map(|component| {
        let uid = match component.strip_suffix(".slice") {
            Some(slice) if slice.starts_with("kubepods") => slice
                .rsplit_once("-pod")
                .map(|(_, uid)| uid.replace('_', "-"))?,
            Some(_) => return None,
            None => component.strip_prefix("pod")?.to_owned(),
        };
        is_uid(&uid).then_some(uid)
    })
}

/// A UUID as Kubernetes writes it: 8-4-4-4-12 hex digits.
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The group of `--group-by container|pod|cgroup|netns` a socket placed at `placement` is in:
/// the container's short id, the pod's UID, the cgroup's path, the namespace's inode; `-` for
/// none (a host process), `?` when unknown. `None` for the other groupings.
pub fn group_of(
    by: crate::stats::GroupBy,
    placement: crate::event::Placement,
    cgroups: &Cgroups,
) -> Option<String> {
    use crate::stats::GroupBy;
    let info = || placement.cgroup().and_then(|id| cgroups.info(id));
    let named = |name: Option<&str>| name.unwrap_or("-").to_owned();
    Some(match by {
        GroupBy::Netns => placement
            .netns()
            .map_or_else(|| "?".to_owned(), |n| n.to_string()),
        GroupBy::Container => info().map_or_else(
            || "?".to_owned(),
            |i| named(i.container_id.as_deref().map(|id| &id[..12.min(id.len())])),
        ),
        GroupBy::Pod => info().map_or_else(|| "?".to_owned(), |i| named(i.pod_uid.as_deref())),
        GroupBy::Cgroup => info().map_or_else(|| "?".to_owned(), |i| i.path.clone()),
        GroupBy::Lport | GroupBy::Rport | GroupBy::Comm => return None,
    })
}

/// cgroup ids resolved to what their paths say, cached. Shared by the printers and the
/// metrics: a handle is cheap to clone.
#[derive(Clone, Default)]
pub struct Cgroups(Names);

#[derive(Clone, Default)]
enum Names {
    #[default]
    None,
    Host(Arc<Mutex<Resolver>>),
    /// Given paths, for tests.
    Fixed(Arc<HashMap<u64, Arc<CgroupInfo>>>),
}

struct Resolver {
    mount: PathBuf,
    /// The mount's root, for `open_by_handle_at()`.
    root: fs::File,
    cache: HashMap<u64, Option<Arc<CgroupInfo>>>,
    /// Set once `open_by_handle_at()` was refused (it needs CAP_DAC_READ_SEARCH): from then on
    /// ids are found by walking the hierarchy, on a thread of its own.
    walker: Option<Walker>,
}

/// The thread that walks the cgroup2 hierarchy for the ids `open_by_handle_at()` cannot open.
/// A walk reads every directory of the hierarchy (thousands on a busy node): it never runs on
/// the thread that drains the ring, which names a cgroup the walk has not found yet as unknown
/// and asks for it; the next record of that cgroup has its name.
struct Walker {
    asks: mpsc::Sender<u64>,
    /// Asked, not answered yet.
    pending: HashSet<u64>,
}

impl Cgroups {
    /// Resolves this host's cgroups; resolves nothing (with a warning) without a cgroup2 mount.
    pub fn of_host() -> Self {
        match widest_cgroup2_mount().and_then(|Cgroup2Mount { path: mount, root }| {
            if root == "/" && in_own_cgroup_namespace() {
                eprintln!(
                    "tcpclose: warning: this process has a cgroup namespace of its own and \
                     {} shows only its part of the cgroup2 hierarchy: sockets of other cgroups \
                     will have no cgroup, container or pod. Mount the host's hierarchy too (in \
                     Kubernetes, a read-only hostPath volume of /sys/fs/cgroup, as \
                     deploy/kubernetes/daemonset.yaml does)",
                    mount.display()
                );
            }
            let root =
                fs::File::open(&mount).with_context(|| format!("opening {}", mount.display()))?;
            Ok(Resolver {
                mount,
                root,
                cache: HashMap::new(),
                walker: None,
            })
        }) {
            Ok(resolver) => {
                let resolver = Arc::new(Mutex::new(resolver));
                // Whether ids can be opened is known from the root's: walk from the start
                // otherwise, so that the cgroups that exist already are named from the first
                // record.
                let refused = resolver.lock().is_ok_and(|r| {
                    matches!(r.by_handle(ROOT_CGROUP_ID), Err(e) if e.raw_os_error() == Some(libc::EPERM))
                });
                if refused || walk_forced() {
                    start_walker(&resolver, Some(ROOT_CGROUP_ID));
                }
                Self(Names::Host(resolver))
            }
            Err(err) => {
                eprintln!("tcpclose: warning: cgroups will not be named: {err:#}");
                Self(Names::None)
            }
        }
    }

    /// Resolves nothing: records carry cgroup ids only as `null` paths.
    pub fn none() -> Self {
        Self(Names::None)
    }

    /// Names these cgroups (id, path) and no other: for tests of what is printed.
    pub fn fixed(paths: &[(u64, &str)]) -> Self {
        Self(Names::Fixed(Arc::new(
            paths
                .iter()
                .map(|&(id, path)| (id, Arc::new(CgroupInfo::of_path(path))))
                .collect(),
        )))
    }

    /// What cgroup `id` is; `None` when unknown (0), gone, not resolvable here, or (without
    /// CAP_DAC_READ_SEARCH) not found by the tree walk yet.
    pub fn info(&self, id: u64) -> Option<Arc<CgroupInfo>> {
        if id == 0 {
            return None;
        }
        let resolver = match &self.0 {
            Names::None => return None,
            Names::Fixed(paths) => return paths.get(&id).cloned(),
            Names::Host(resolver) => resolver,
        };
        let mut guard = resolver.lock().ok()?;
        if let Some(found) = guard.cache.get(&id) {
            return found.clone();
        }
        if let Some(walker) = &mut guard.walker {
            if walker.pending.insert(id) {
                // A walker that has gone (it cannot: it lives as long as the resolver) would
                // leave the id unnamed.
                let _ = walker.asks.send(id);
            }
            return None;
        }
        match guard.by_handle(id) {
            Ok(absolute) => {
                let found = guard.relative(&absolute);
                guard.remember(id, found.clone());
                found
            }
            Err(err) if err.raw_os_error() == Some(libc::EPERM) => {
                drop(guard);
                start_walker(resolver, Some(id));
                None
            }
            // Gone (ESTALE) or never a cgroup.
            Err(_) => {
                guard.remember(id, None);
                None
            }
        }
    }
}

#[cfg(not(test))]
fn walk_forced() -> bool {
    false
}

#[cfg(test)]
fn walk_forced() -> bool {
    WALK_IN_TESTS.with(std::cell::Cell::get)
}

#[cfg(test)]
thread_local! {
    /// Resolves as if `open_by_handle_at()` were refused, by the walker only.
    static WALK_IN_TESTS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The root cgroup's id (`kernfs_node.id` of the hierarchy's root).
const ROOT_CGROUP_ID: u64 = 1;

/// Starts the walker of `resolver` (once), asking it for `first`.
fn start_walker(resolver: &Arc<Mutex<Resolver>>, first: Option<u64>) {
    let Ok(mut guard) = resolver.lock() else {
        return;
    };
    if guard.walker.is_some() {
        return;
    }
    let (asks, answers_needed) = mpsc::channel();
    let mount = guard.mount.clone();
    let weak = Arc::downgrade(resolver);
    let spawned = std::thread::Builder::new()
        .name("cgroup-walk".to_owned())
        .spawn(move || walk_on_request(&mount, &answers_needed, &weak));
    if spawned.is_err() {
        // No thread: cgroups stay unnamed rather than slow the ring's reader.
        return;
    }
    let mut walker = Walker {
        asks,
        pending: HashSet::new(),
    };
    if let Some(id) = first
        && walker.pending.insert(id)
    {
        let _ = walker.asks.send(id);
    }
    guard.walker = Some(walker);
}

/// The walker's loop: each batch of asked ids is answered by one walk of the whole hierarchy,
/// which also names every cgroup found (so that a cgroup made since the last walk costs one walk,
/// however many of its sockets come). Ends when the resolver is gone.
fn walk_on_request(mount: &Path, asks: &mpsc::Receiver<u64>, resolver: &Weak<Mutex<Resolver>>) {
    while let Ok(first) = asks.recv() {
        let asked: Vec<u64> = std::iter::once(first).chain(asks.try_iter()).collect();
        let found = index(mount);
        let Some(resolver) = resolver.upgrade() else {
            return;
        };
        let Ok(mut guard) = resolver.lock() else {
            return;
        };
        for (id, absolute) in &found {
            if !guard.cache.contains_key(id) {
                let info = guard.relative(absolute);
                guard.remember(*id, info);
            }
        }
        for id in asked {
            if let Some(walker) = &mut guard.walker {
                walker.pending.remove(&id);
            }
            if !found.contains_key(&id) {
                // Gone before the walk, or never a cgroup.
                guard.remember(id, None);
            }
        }
    }
}

impl Resolver {
    /// The cgroup at `absolute` (a directory under the mount), named relative to the mount.
    fn relative(&self, absolute: &Path) -> Option<Arc<CgroupInfo>> {
        let relative = absolute.strip_prefix(&self.mount).ok()?;
        let path = format!("/{}", relative.to_string_lossy());
        Some(Arc::new(CgroupInfo::of_path(&path)))
    }

    /// Caches what `id` is; the cache starts over when full.
    fn remember(&mut self, id: u64, found: Option<Arc<CgroupInfo>>) {
        if self.cache.len() >= MAX_CACHED {
            self.cache.clear();
        }
        self.cache.insert(id, found);
    }

    /// The directory of cgroup `id`, opened by its kernfs file handle (the id itself): one
    /// `open_by_handle_at()` and one `readlink()`, microseconds.
    fn by_handle(&self, id: u64) -> std::io::Result<PathBuf> {
        #[repr(C)]
        struct KernfsHandle {
            handle_bytes: u32,
            handle_type: i32,
            id: u64,
        }
        let mut handle = KernfsHandle {
            handle_bytes: 8,
            handle_type: FILEID_KERNFS,
            id,
        };
        // SAFETY: `handle` is a `struct file_handle` with its 8 bytes of `f_handle` inline;
        // the kernel reads it and returns a new descriptor or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_open_by_handle_at,
                self.root.as_raw_fd(),
                (&raw mut handle).cast::<libc::c_void>(),
                libc::O_PATH | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor the kernel just gave us, owned from here on.
        let file = unsafe { <fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
    }
}

/// Every directory under `root` by inode number (a cgroup's id), breadth first, at most
/// [`MAX_CACHED`].
fn index(root: &Path) -> HashMap<u64, PathBuf> {
    let mut found = HashMap::new();
    let mut queue = std::collections::VecDeque::from([root.to_path_buf()]);
    while let Some(dir) = queue.pop_front() {
        let Ok(meta) = fs::metadata(&dir) else {
            continue;
        };
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        found.insert(meta.ino(), dir);
        if found.len() >= MAX_CACHED {
            break;
        }
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push_back(entry.path());
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "3a1b2c3d-1111-2222-3333-444455556666";

    fn mount_point(mountinfo: &str) -> Option<PathBuf> {
        cgroup2_mount_in(mountinfo).map(|m| m.path)
    }

    #[test]
    fn finds_the_cgroup2_mount_pure_or_hybrid() {
        let pure = "22 27 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n\
                    30 22 0:26 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(mount_point(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        let hybrid = "30 22 0:26 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755\n\
                      31 30 0:27 / /sys/fs/cgroup/unified rw shared:10 - cgroup2 cgroup2 rw\n\
                      34 30 0:30 / /sys/fs/cgroup/memory rw shared:14 - cgroup cgroup rw,memory\n";
        assert_eq!(
            mount_point(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            mount_point("34 30 0:30 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"),
            None
        );
        assert_eq!(
            mount_point("31 30 0:27 / /run/my\\040cgroup rw - cgroup2 none rw\n"),
            Some(PathBuf::from("/run/my cgroup"))
        );
    }

    /// A pod's view: its own cgroup2 mount shows its namespace's subtree; the host's, bound
    /// from a hostPath volume, shows the whole hierarchy from two levels above, whichever
    /// comes first.
    #[test]
    fn in_a_cgroup_namespace_the_mount_of_the_whole_hierarchy_is_chosen() {
        let own = "1510 1502 0:27 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw\n";
        let host = "1520 1502 0:27 /../.. /host/sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw\n";
        for mountinfo in [format!("{own}{host}"), format!("{host}{own}")] {
            let found = cgroup2_mount_in(&mountinfo).expect("a cgroup2 mount");
            assert_eq!(
                found.path,
                PathBuf::from("/host/sys/fs/cgroup"),
                "{mountinfo}"
            );
            assert_eq!(found.root, "/../..");
        }
        // A mount of a subtree (a container's bind of its own cgroup) gives way to the root.
        let sub = "40 30 0:27 /kubepods.slice /mnt/pods rw - cgroup2 cgroup2 rw\n";
        let root = "31 30 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            mount_point(&format!("{sub}{root}")),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn names_containers_and_pods_of_every_runtime_and_driver() {
        let uid_ = UID.replace('-', "_");
        for (path, container, pod) in [
            // Kubernetes, systemd driver: containerd, CRI-O.
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/cri-containerd-{ID}.scope"
                ),
                Some(ID),
                Some(UID),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/crio-{ID}.scope"
                ),
                Some(ID),
                Some(UID),
            ),
            // Guaranteed pods have no QoS slice.
            (
                format!("/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{ID}.scope"),
                Some(ID),
                Some(UID),
            ),
            // Kubernetes, cgroupfs driver.
            (
                format!("/kubepods/besteffort/pod{UID}/{ID}"),
                Some(ID),
                Some(UID),
            ),
            (format!("/kubepods/pod{UID}/{ID}"), Some(ID), Some(UID)),
            // A process in a sub-cgroup of its container.
            (format!("/kubepods/pod{UID}/{ID}/init"), Some(ID), Some(UID)),
            // Docker and Podman.
            (format!("/system.slice/docker-{ID}.scope"), Some(ID), None),
            (format!("/docker/{ID}"), Some(ID), None),
            (format!("/machine.slice/libpod-{ID}.scope"), Some(ID), None),
            // Not containers.
            ("/system.slice/sshd.service".to_owned(), None, None),
            ("/".to_owned(), None, None),
            (
                format!("/kubepods.slice/kubepods-besteffort-pod{uid_}.slice"),
                None,
                Some(UID),
            ),
            ("/system.slice/docker-short.scope".to_owned(), None, None),
        ] {
            let info = CgroupInfo::of_path(&path);
            assert_eq!(info.container_id.as_deref(), container, "{path}");
            assert_eq!(info.pod_uid.as_deref(), pod, "{path}");
        }
    }

    #[test]
    fn a_container_is_named_short() {
        let info = CgroupInfo::of_path(&format!("/docker/{ID}"));
        assert_eq!(info.short(), Some("0123456789ab"));
        assert_eq!(
            CgroupInfo::of_path("/system.slice/cron.service").short(),
            Some("cron.service")
        );
        assert_eq!(CgroupInfo::of_path("/").short(), None);
    }

    /// Without CAP_DAC_READ_SEARCH: the walker names the cgroups, off the caller's thread.
    #[test]
    fn the_walker_names_cgroups_when_ids_cannot_be_opened() {
        WALK_IN_TESTS.with(|w| w.set(true));
        let cgroups = Cgroups::of_host();
        WALK_IN_TESTS.with(|w| w.set(false));
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup2 line")
            .to_owned();
        let id = cgroup_id(&own).unwrap();
        let found = eventually(&own, || cgroups.info(id));
        assert_eq!(found.path, own);
        let root = eventually("/", || cgroups.info(ROOT_CGROUP_ID));
        assert_eq!(root.path, "/");
        // An id that is no cgroup is answered as such, once: not asked for again and again.
        let bogus = u64::MAX - 1;
        assert_eq!(cgroups.info(bogus), None);
        let answer = eventually("an answer for a bogus id", || {
            let Names::Host(resolver) = &cgroups.0 else {
                unreachable!("a resolver of this host")
            };
            resolver.lock().unwrap().cache.get(&bogus).cloned()
        });
        assert_eq!(answer, None, "a bogus id named");
    }

    /// What `f` returns once it returns something, within 10 s.
    fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(found) = f() {
                return found;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: not within 10 s"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn resolves_this_hosts_root_and_own_cgroup() {
        let cgroups = Cgroups::of_host();
        let root = cgroups.info(1).expect("the root cgroup resolves");
        assert_eq!(root.path, "/");
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup2 line");
        let id = cgroup_id(own).unwrap();
        assert_eq!(cgroups.info(id).unwrap().path, own);
        assert_eq!(cgroups.info(0), None);
        assert!(cgroup_id("/no/such/cgroup").is_err());
    }
}
