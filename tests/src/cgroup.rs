//! cgroup2 cgroups of the test's own, made where container runtimes make theirs
//! (`/kubepods.slice/...`, `/kubepods/...`, `/docker/...`), and processes started in them.

use std::{
    fs, io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::OnceLock,
};

/// Where the tests mount cgroup2 when the machine has no cgroup2 mount (a guest may not).
const OWN_MOUNT: &str = "/run/tcpclose-tests-cgroup2";

/// The cgroup2 mount point, from `/proc/self/mounts` (`/sys/fs/cgroup` on a pure cgroup2 host,
/// `/sys/fs/cgroup/unified` on a hybrid one); mounted at [`OWN_MOUNT`] when there is none.
pub fn mount() -> &'static Path {
    static MOUNT: OnceLock<PathBuf> = OnceLock::new();
    MOUNT.get_or_init(|| {
        let mounts = fs::read_to_string("/proc/self/mounts").expect("reading /proc/self/mounts");
        if let Some(found) = mounts.lines().find_map(|line| {
            let mut f = line.split_whitespace();
            let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(path))
        }) {
            return found;
        }
        fs::create_dir_all(OWN_MOUNT).expect("creating a cgroup2 mount point");
        crate::run_ok(Command::new("mount").args(["-t", "cgroup2", "none", OWN_MOUNT]));
        PathBuf::from(OWN_MOUNT)
    })
}

/// The cgroup2 path (relative to the root, starting with `/`) of this process.
pub fn own_path() -> String {
    let own = fs::read_to_string("/proc/self/cgroup").expect("reading /proc/self/cgroup");
    own.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup2 line in /proc/self/cgroup")
        .to_owned()
}

/// A Kubernetes pod UID and a container id (64 hex digits) of this run's own, different for
/// each `tag`.
pub fn test_ids(tag: u8) -> (String, String) {
    let seed = (std::process::id() as u64) << 8 | u64::from(tag);
    let uid = format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        seed as u32,
        tag,
        0x4000 | (seed & 0xfff),
        0x8000 | (seed & 0xfff),
        seed
    );
    let id = format!("{seed:016x}").repeat(4);
    (uid, id)
}

/// Where the kubelet's systemd cgroup driver puts containerd's container `id` of a BestEffort
/// pod whose UID is `uid`.
pub fn containerd_path(uid: &str, id: &str) -> String {
    format!(
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/\
         cri-containerd-{id}.scope",
        uid.replace('-', "_")
    )
}

/// A cgroup made for a test, removed on drop with the directories above it that it made.
pub struct Cgroup {
    /// Relative to the cgroup2 root, starting with `/`, as tcpclose prints it.
    pub path: String,
    pub dir: PathBuf,
    /// Directories this made, outermost first.
    made: Vec<PathBuf>,
}

impl Cgroup {
    /// Makes the cgroup `path` (relative to the cgroup2 root) and any missing parent.
    pub fn create(path: &str) -> Self {
        crate::require_root();
        let mut dir = mount().to_path_buf();
        let mut made = Vec::new();
        for component in path.split('/').filter(|c| !c.is_empty()) {
            dir.push(component);
            match fs::create_dir(&dir) {
                Ok(()) => made.push(dir.clone()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => panic!("making the cgroup {}: {e}", dir.display()),
            }
        }
        Self {
            path: path.to_owned(),
            dir,
            made,
        }
    }

    /// The cgroup's id, as the kernel reports it: its directory's inode.
    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        fs::metadata(&self.dir)
            .expect("the cgroup's directory")
            .ino()
    }

    /// Spawns `cmd` (through [`crate::spawn`]) in this cgroup: the child moves itself there
    /// before it execs, so that every socket the program makes is this cgroup's.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
        self.move_child(cmd)?;
        crate::spawn(cmd)
    }

    /// [`crate::spawn_holding`] in this cgroup: the files in `fds` were made before the move,
    /// so sockets among them stay in the cgroup they were made in.
    pub fn spawn_holding(
        &self,
        cmd: &mut Command,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> io::Result<Child> {
        self.move_child(cmd)?;
        crate::spawn_holding(cmd, fds)
    }

    fn move_child(&self, cmd: &mut Command) -> io::Result<()> {
        use std::os::unix::process::CommandExt as _;
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(self.dir.join("cgroup.procs"))?;
        // SAFETY: the closure runs in the child between fork and exec; it allocates nothing and
        // only calls write(2), which is async-signal-safe. Writing 0 to `cgroup.procs` moves
        // the writing process (cgroup_procs_write_start()).
        unsafe {
            cmd.pre_exec(move || {
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            })
        };
        Ok(())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // A cgroup goes once its processes have exited; their reaping may lag a little.
        for dir in self.made.iter().rev() {
            for _ in 0..50 {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}
