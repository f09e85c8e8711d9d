//! cgroup2 cgroups: where the hierarchy is mounted, a cgroup's id from its directory and its
//! directory from its id, and what its path says of the container and the Kubernetes pod.
//!
//! The kernel programs report a socket's cgroup by id (`kernfs_node.id`, which is also its
//! directory's inode number on the cgroup2 mount). Ids are 64-bit and never reused, so an id
//! resolved once stays right; a cgroup created after start is resolved when first seen.

use std::{
    collections::HashMap,
    ffi::CString,
    fs,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result, bail};

/// `CGROUP2_SUPER_MAGIC` (include/uapi/linux/magic.h).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// `FILEID_KERNFS` (include/linux/exportfs.h): a kernfs file handle is the node's 64-bit id.
const FILEID_KERNFS: i32 = 0xfe;
/// Resolved cgroups kept at most; the cache starts over when full.
const MAX_CACHED: usize = 16_384;

/// The cgroup2 mount point in `mounts` (the text of `/proc/self/mounts`): `/sys/fs/cgroup` on
/// a pure cgroup2 host, `/sys/fs/cgroup/unified` on a hybrid one.
pub fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, path, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        // Spaces in mount points are written as `\040`.
        (fstype == "cgroup2").then(|| PathBuf::from(path.replace("\\040", " ")))
    })
}

/// This host's cgroup2 mount point.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    cgroup2_mount_in(&mounts).context(
        "no cgroup2 file system is mounted (see /proc/self/mounts): mount one with \
         `mount -t cgroup2 none /sys/fs/cgroup`",
    )
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
    /// ids are found by walking the hierarchy.
    walk: bool,
}

impl Cgroups {
    /// Resolves this host's cgroups; resolves nothing (with a warning) without a cgroup2 mount.
    pub fn of_host() -> Self {
        match cgroup2_mount().and_then(|mount| {
            let root =
                fs::File::open(&mount).with_context(|| format!("opening {}", mount.display()))?;
            Ok(Resolver {
                mount,
                root,
                cache: HashMap::new(),
                walk: false,
            })
        }) {
            Ok(resolver) => Self(Names::Host(Arc::new(Mutex::new(resolver)))),
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

    /// What cgroup `id` is; `None` when unknown (0), gone, or not resolvable here.
    pub fn info(&self, id: u64) -> Option<Arc<CgroupInfo>> {
        if id == 0 {
            return None;
        }
        let resolver = match &self.0 {
            Names::None => return None,
            Names::Fixed(paths) => return paths.get(&id).cloned(),
            Names::Host(resolver) => resolver,
        };
        let mut resolver = resolver.lock().ok()?;
        if let Some(found) = resolver.cache.get(&id) {
            return found.clone();
        }
        let found = resolver
            .resolve(id)
            .map(|path| Arc::new(CgroupInfo::of_path(&path)));
        if resolver.cache.len() >= MAX_CACHED {
            resolver.cache.clear();
        }
        resolver.cache.insert(id, found.clone());
        found
    }
}

impl Resolver {
    /// The path of cgroup `id` relative to the mount, `/` for the root.
    fn resolve(&mut self, id: u64) -> Option<String> {
        let absolute = if self.walk {
            None
        } else {
            match self.by_handle(id) {
                Ok(path) => Some(path),
                Err(err) if err.raw_os_error() == Some(libc::EPERM) => {
                    self.walk = true;
                    None
                }
                // Gone (ESTALE) or never a cgroup.
                Err(_) => return None,
            }
        };
        let absolute = match absolute {
            Some(path) => path,
            None => walk(&self.mount, id)?,
        };
        let relative = absolute.strip_prefix(&self.mount).ok()?;
        Some(format!("/{}", relative.to_string_lossy()))
    }

    /// The directory of cgroup `id`, opened by its kernfs file handle (the id itself).
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

/// Finds the directory whose inode is `id` under `root`, breadth first.
fn walk(root: &Path, id: u64) -> Option<PathBuf> {
    let mut queue = std::collections::VecDeque::from([root.to_path_buf()]);
    while let Some(dir) = queue.pop_front() {
        let meta = fs::metadata(&dir).ok()?;
        if meta.ino() == id {
            return Some(dir);
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push_back(entry.path());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const UID: &str = "3a1b2c3d-1111-2222-3333-444455556666";

    #[test]
    fn finds_the_cgroup2_mount_pure_or_hybrid() {
        let pure = "sysfs /sys sysfs rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        assert_eq!(
            cgroup2_mount_in(pure),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount_in("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
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
