//! Test harness: runs the real `ferrovol` binary on a private unix socket and
//! captures its log output, so tests talk real gRPC to the real thing.

use std::io::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrovol_csi::endpoint::{self, Endpoint};
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_ferrovol");

/// How long a driver may take to start before the test gives up. Generous:
/// CI machines are slow, and this is a failure bound, not a wait.
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Driver {
    child: Option<Child>,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    logs: Arc<Mutex<Vec<String>>>,
    lines: mpsc::Receiver<String>,
}

pub struct DriverBuilder {
    socket: PathBuf,
    state_dir: PathBuf,
    pool_dir: Option<PathBuf>,
    kubelet_dir: Option<PathBuf>,
    /// A program (with arguments) that runs the driver, e.g. to drop
    /// capabilities.
    wrapper: Vec<String>,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    node_id: String,
}

impl DriverBuilder {
    /// A driver whose state and socket live under `root`.
    pub fn new(root: &Path) -> Self {
        DriverBuilder {
            socket: root.join("csi.sock"),
            state_dir: root.join("state"),
            pool_dir: None,
            kubelet_dir: None,
            wrapper: Vec::new(),
            args: Vec::new(),
            envs: vec![("RUST_LOG".into(), "debug,h2=info,hyper=info,tower=info".into())],
            node_id: "test-node".into(),
        }
    }

    pub fn node_id(mut self, id: &str) -> Self {
        self.node_id = id.into();
        self
    }

    pub fn socket(mut self, p: impl Into<PathBuf>) -> Self {
        self.socket = p.into();
        self
    }

    pub fn pool(mut self, p: &TestPool) -> Self {
        self.pool_dir = Some(p.dir.clone());
        self
    }

    pub fn kubelet(mut self, k: &Kubelet) -> Self {
        self.kubelet_dir = Some(k.dir.clone());
        self
    }

    pub fn wrapped_in<I: IntoIterator<Item = S>, S: Into<String>>(mut self, w: I) -> Self {
        self.wrapper = w.into_iter().map(Into::into).collect();
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, a: I) -> Self {
        self.args.extend(a.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.envs.push((k.into(), v.into()));
        self
    }

    fn command(&self) -> Command {
        let mut cmd = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.arg("serve")
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--node-id")
            .arg(&self.node_id)
            .args(&self.args)
            .args(
                self.pool_dir
                    .iter()
                    .flat_map(|p| [std::ffi::OsStr::new("--pool-dir"), p.as_os_str()]),
            )
            .args(
                self.kubelet_dir
                    .iter()
                    .flat_map(|p| [std::ffi::OsStr::new("--kubelet-dir"), p.as_os_str()]),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts the driver and waits until it logs that it serves.
    pub fn start(self) -> Driver {
        let mut d = self.spawn();
        d.wait_for_log(ferrovol_core::server::READY_MESSAGE)
            .unwrap_or_else(|| panic!("driver did not become ready; log:\n{}", d.logs()));
        d
    }

    /// Starts the driver without waiting for readiness.
    pub fn spawn(self) -> Driver {
        spawn_logged(self.command(), self.socket, self.state_dir)
    }
}

/// Runs any command with its stderr captured line by line (for waiting on
/// log lines and asserting on them); killed on drop.
pub fn spawn_logged(mut cmd: Command, socket: PathBuf, state_dir: PathBuf) -> Driver {
    let mut child = cmd.stdin(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawning");
    let stderr = child.stderr.take().unwrap();
    let logs = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    let sink = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line.clone());
            let _ = tx.send(line);
        }
    });
    Driver { child: Some(child), socket, state_dir, logs, lines: rx }
}

impl Driver {
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.socket.clone())
    }

    pub async fn channel(&self) -> Channel {
        endpoint::connect(&self.endpoint()).await.expect("connecting to the driver")
    }

    /// Waits for a log line containing `needle`; None if the process ended
    /// or the start timeout passed first. The timeout bounds the whole wait,
    /// not the gap between lines: a process that keeps logging something
    /// else (a link retrying) must not hold a test for ever.
    pub fn wait_for_log(&mut self, needle: &str) -> Option<String> {
        if let Some(l) = self.logs.lock().unwrap().iter().find(|l| l.contains(needle)) {
            return Some(l.clone());
        }
        self.next_line_with(needle)
    }

    /// Waits until `needle` has been logged at least `n` times in all.
    pub fn wait_for_log_count(&mut self, needle: &str, n: usize) -> bool {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // Lines reach `logs` before the channel: nothing is missed.
            if self.logs.lock().unwrap().iter().filter(|l| l.contains(needle)).count() >= n {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if self.lines.recv_timeout(left).is_err() {
                return false;
            }
        }
    }

    /// Like `wait_for_log`, but only for lines logged from now on.
    pub fn wait_for_new_log(&mut self, needle: &str) -> Option<String> {
        while self.lines.try_recv().is_ok() {}
        self.next_line_with(needle)
    }

    /// The next line containing `needle`, within the start timeout in all.
    fn next_line_with(&mut self, needle: &str) -> Option<String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Some(line),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid()).unwrap();
        rustix::process::kill_process(pid, sig).expect("signalling driver");
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(rustix::process::Signal::TERM);
        self.wait()
    }

    /// Waits for the process to exit and for its log to be fully read.
    pub fn wait(&mut self) -> ExitStatus {
        let status = self.child.take().expect("running").wait().expect("waiting for driver");
        // Drain: the reader thread ends at EOF, which follows process exit.
        while self.lines.recv_timeout(START_TIMEOUT).is_ok() {}
        status
    }

    /// SIGKILL: the crash the sidecars must survive.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // A failing test shows what the driver said (and how it ended).
        if std::thread::panicking() {
            let status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            let logs = self.logs();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            eprintln!("driver (exit: {status:?}), last lines:");
            for l in tail.iter().rev() {
                eprintln!("  {l}");
            }
        }
        self.kill();
    }
}

/// Which filesystem a test pool sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolFs {
    /// XFS with reflink, on a loop-mounted image: the copy-on-write path.
    Xfs,
    /// A plain directory on the root ext4: the copy fallback.
    Ext4,
    /// ext4 on a loop-mounted image of its own: the copy fallback with a
    /// size small enough to fill.
    Ext4Image,
}

/// A pool directory for one test, unmounted and detached on drop (even when
/// the test panics), so no loop device or mount outlives the test.
pub struct TestPool {
    pub dir: PathBuf,
    image: Option<ferrovol_local::poolinit::PoolImage>,
    _root: tempfile::TempDir,
}

impl TestPool {
    pub async fn new(fs: PoolFs) -> TestPool {
        Self::with_size(fs, 4 << 30).await
    }

    pub async fn with_size(fs: PoolFs, size: u64) -> TestPool {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("pool");
        let image_fs = match fs {
            PoolFs::Xfs => ferrovol_local::poolinit::PoolFs::Xfs,
            PoolFs::Ext4Image => ferrovol_local::poolinit::PoolFs::Ext4,
            PoolFs::Ext4 => {
                std::fs::create_dir(&dir).unwrap();
                return TestPool { dir, image: None, _root: root };
            }
        };
        let image =
            ferrovol_local::poolinit::init(&dir, &root.path().join("pool.img"), size, image_fs)
                .await
                .expect("making a pool image");
        let image = Some(image);
        TestPool { dir, image, _root: root }
    }

    /// The file backing a volume or snapshot, by the pool's layout.
    pub fn volume_file(&self, id: &str) -> PathBuf {
        self.dir.join("volumes").join(format!("{id}.img"))
    }

    pub fn snapshot_file(&self, id: &str) -> PathBuf {
        self.dir.join("snapshots").join(format!("{id}.img"))
    }

    pub fn files(&self, sub: &str) -> Vec<PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(self.dir.join(sub))
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Bytes allocated to volume and snapshot files (the journal aside):
    /// what the pool itself holds, whatever else shares its filesystem.
    pub fn allocated(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        ["volumes", "snapshots", "staging", "trash"]
            .iter()
            .flat_map(|d| self.files(d))
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    /// Unmounts the pool's filesystem (its loop device stays attached), as a
    /// reboot without the fstab line leaves it: an empty mount point.
    pub fn unmount(&self) {
        rustix::mount::unmount(&self.dir, rustix::mount::UnmountFlags::empty())
            .expect("unmounting the test pool");
    }

    /// Mounts it again after [`TestPool::unmount`].
    pub fn remount(&self) {
        let img = self.image.as_ref().expect("an image pool");
        rustix::mount::mount(
            &img.device,
            &self.dir,
            img.fs.name(),
            rustix::mount::MountFlags::empty(),
            None,
        )
        .expect("mounting the test pool again");
    }

    /// Free bytes in the pool filesystem.
    pub fn free(&self) -> u64 {
        let st = rustix::fs::statvfs(&self.dir).unwrap();
        st.f_bavail * st.f_frsize
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        if let Some(img) = self.image.take() {
            // A driver that has not exited may still hold it: released lazily.
            ferrovol_local::poolinit::release(&img);
        }
    }
}

pub mod req {
    //! Terse builders for CSI requests.
    use std::path::Path;

    use ferrovol_csi as csi;
    use ferrovol_csi::controller_client::ControllerClient;
    use ferrovol_csi::volume_capability::access_mode::Mode;
    use ferrovol_csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
    use tonic::transport::Channel;

    pub const GIB: i64 = 1 << 30;
    pub const MIB: i64 = 1 << 20;

    pub fn stats(id: &str, path: &Path) -> csi::NodeGetVolumeStatsRequest {
        csi::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.display().to_string(),
            ..Default::default()
        }
    }

    pub fn mount_cap(fs: &str) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            })),
        }
    }

    pub fn block_cap() -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
            access_type: Some(AccessType::Block(BlockVolume {})),
        }
    }

    pub fn cap_with_mode(mode: Mode) -> csi::VolumeCapability {
        let mut c = mount_cap("ext4");
        c.access_mode = Some(AccessMode { mode: mode as i32 });
        c
    }

    pub fn range(required: i64, limit: i64) -> Option<csi::CapacityRange> {
        Some(csi::CapacityRange { required_bytes: required, limit_bytes: limit })
    }

    pub fn create(name: &str, required: i64) -> csi::CreateVolumeRequest {
        csi::CreateVolumeRequest {
            name: name.into(),
            capacity_range: range(required, 0),
            volume_capabilities: vec![mount_cap("ext4")],
            ..Default::default()
        }
    }

    pub fn from_snapshot(name: &str, snapshot_id: &str, required: i64) -> csi::CreateVolumeRequest {
        use csi::volume_content_source::{SnapshotSource, Type};
        csi::CreateVolumeRequest {
            volume_content_source: Some(csi::VolumeContentSource {
                r#type: Some(Type::Snapshot(SnapshotSource { snapshot_id: snapshot_id.into() })),
            }),
            ..create(name, required)
        }
    }

    pub fn from_volume(name: &str, volume_id: &str, required: i64) -> csi::CreateVolumeRequest {
        use csi::volume_content_source::{Type, VolumeSource};
        csi::CreateVolumeRequest {
            volume_content_source: Some(csi::VolumeContentSource {
                r#type: Some(Type::Volume(VolumeSource { volume_id: volume_id.into() })),
            }),
            ..create(name, required)
        }
    }

    pub fn snapshot(name: &str, source: &str) -> csi::CreateSnapshotRequest {
        csi::CreateSnapshotRequest {
            name: name.into(),
            source_volume_id: source.into(),
            ..Default::default()
        }
    }

    pub fn delete(id: &str) -> csi::DeleteVolumeRequest {
        csi::DeleteVolumeRequest { volume_id: id.into(), ..Default::default() }
    }

    pub fn delete_snapshot(id: &str) -> csi::DeleteSnapshotRequest {
        csi::DeleteSnapshotRequest { snapshot_id: id.into(), ..Default::default() }
    }

    pub fn stage_req(
        id: &str,
        staging: &Path,
        cap: csi::VolumeCapability,
    ) -> csi::NodeStageVolumeRequest {
        csi::NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap),
            ..Default::default()
        }
    }

    pub fn publish_req(
        id: &str,
        staging: &Path,
        target: &Path,
        cap: csi::VolumeCapability,
        ro: bool,
    ) -> csi::NodePublishVolumeRequest {
        csi::NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap),
            readonly: ro,
            ..Default::default()
        }
    }

    pub fn unpublish_req(id: &str, target: &Path) -> csi::NodeUnpublishVolumeRequest {
        csi::NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: target.display().to_string(),
        }
    }

    pub fn unstage_req(id: &str, staging: &Path) -> csi::NodeUnstageVolumeRequest {
        csi::NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
        }
    }

    pub async fn new_volume(
        c: &mut ControllerClient<Channel>,
        name: &str,
        size: i64,
        cap: csi::VolumeCapability,
    ) -> String {
        let r = csi::CreateVolumeRequest { volume_capabilities: vec![cap], ..create(name, size) };
        c.create_volume(r).await.unwrap().into_inner().volume.unwrap().volume_id
    }
}

/// Writes `len` bytes of a pattern derived from `seed` at `offset` of a file.
pub fn write_pattern(path: &Path, offset: u64, len: usize, seed: u8) {
    use std::io::{Seek, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(std::io::SeekFrom::Start(offset)).unwrap();
    let block: Vec<u8> =
        (0..1 << 20).map(|i: usize| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len());
        f.write_all(&block[..n]).unwrap();
        left -= n;
    }
    f.sync_all().unwrap();
}

/// Reads `len` bytes at `offset`.
/// A device a write through `path` cannot reach: opening it for writing,
/// or else writing and syncing, fails with a read-only or permission error.
pub fn assert_refuses_writes(path: &Path) {
    use std::os::unix::fs::FileExt;
    let refused = |e: &std::io::Error| {
        matches!(e.raw_os_error(), Some(libc::EROFS | libc::EPERM | libc::EACCES))
    };
    match std::fs::OpenOptions::new().write(true).open(path) {
        Err(err) => assert!(refused(&err), "opening {} for writing: {err}", path.display()),
        Ok(dev) => {
            let wrote = dev.write_at(&[0xCD; 4096], 0).and_then(|_| dev.sync_all());
            let err = wrote.expect_err("a write through a read-only publish must fail");
            assert!(refused(&err), "writing {}: {err}", path.display());
        }
    }
}

/// Loop devices backed by a file under `dir`, and those backed by one of
/// them (a read-only publish's device), the latter first (so detaching in
/// order frees them all).
pub fn loops_under(dir: &Path) -> Vec<ferrovol_host::loopdev::Attached> {
    let all = ferrovol_host::loopdev::list().unwrap();
    let ours: Vec<_> = all.iter().filter(|a| a.backing.starts_with(dir)).cloned().collect();
    let mut out: Vec<_> =
        all.iter().filter(|a| ours.iter().any(|o| o.device == a.backing)).cloned().collect();
    out.extend(ours);
    out
}

pub fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// A private kubelet root for node tests. On drop it force-cleans whatever a
/// failed test left (mounts below it, loop devices backed by its pool), so no
/// test ever leaks kernel state; `assert_clean` checks that nothing needed it.
pub struct Kubelet {
    pub dir: PathBuf,
    pool_dir: PathBuf,
    _root: tempfile::TempDir,
}

impl Kubelet {
    pub fn new(pool: &TestPool) -> Kubelet {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("kubelet");
        std::fs::create_dir_all(&dir).unwrap();
        Kubelet {
            dir: dir.canonicalize().unwrap(),
            pool_dir: pool.dir.canonicalize().unwrap(),
            _root: root,
        }
    }

    pub fn staging(&self, pv: &str) -> PathBuf {
        let p = self.dir.join("plugins/kubernetes.io/csi/pv").join(pv).join("globalmount");
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    pub fn target(&self, pod: &str, pv: &str) -> PathBuf {
        let p = self.dir.join("pods").join(pod).join("volumes/kubernetes.io~csi").join(pv);
        std::fs::create_dir_all(&p).unwrap();
        p.join("mount")
    }

    /// Mount points below the kubelet root, deepest first.
    pub fn mounts(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = ferrovol_host::node::mountinfo::read()
            .unwrap()
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(&self.dir))
            .collect();
        v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        v
    }

    /// Loop devices whose backing file is in this test's pool, and those
    /// backed by one of them (a read-only publish's device).
    pub fn loops(&self) -> Vec<ferrovol_host::loopdev::Attached> {
        loops_under(&self.pool_dir)
    }

    pub fn assert_clean(&self) {
        assert!(self.mounts().is_empty(), "mounts left behind: {:?}", self.mounts());
        assert!(self.loops().is_empty(), "loop devices left behind: {:?}", self.loops());
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        for m in self.mounts() {
            let _ = rustix::mount::unmount(&m, rustix::mount::UnmountFlags::DETACH);
        }
        for l in self.loops() {
            let _ = ferrovol_host::loopdev::detach(&l.device);
        }
    }
}

/// A read-only bind mount of a directory over itself, undone on drop so a
/// failing test leaves no mount behind.
pub struct ReadOnly<'a>(&'a Path);

impl<'a> ReadOnly<'a> {
    pub fn new(dir: &'a Path) -> Self {
        use rustix::mount::{mount_bind, mount_remount, MountFlags};
        mount_bind(dir, dir).expect("bind mount");
        let guard = ReadOnly(dir);
        mount_remount(dir, MountFlags::BIND | MountFlags::RDONLY, "").expect("remount ro");
        guard
    }
}

impl Drop for ReadOnly<'_> {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(self.0, rustix::mount::UnmountFlags::DETACH);
    }
}

/// xorshift: reproducible random choices without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Is `path` a mount point right now (by the kernel's mount table)?
pub fn is_mounted(path: &Path) -> bool {
    ferrovol_host::node::mountinfo::read().unwrap().iter().any(|m| m.mount_point == path)
}

pub struct Env {
    // Field order is drop order: the driver stops before mounts are forced
    // away and the pool is unmounted.
    pub driver: Driver,
    pub kubelet: Kubelet,
    pub pool: TestPool,
    _root: tempfile::TempDir,
}

pub async fn env(fs: PoolFs) -> Env {
    env_on(TestPool::new(fs).await)
}

/// A driver, with a kubelet root, on a pool the test made.
pub fn env_on(pool: TestPool) -> Env {
    let kubelet = Kubelet::new(&pool);
    let root = tempfile::tempdir().unwrap();
    let driver = DriverBuilder::new(root.path()).pool(&pool).kubelet(&kubelet).start();
    Env { driver, kubelet, pool, _root: root }
}

impl Env {
    pub async fn clients(
        &self,
    ) -> (
        ferrovol_csi::controller_client::ControllerClient<tonic::transport::Channel>,
        ferrovol_csi::node_client::NodeClient<tonic::transport::Channel>,
    ) {
        let ch = self.driver.channel().await;
        (
            ferrovol_csi::controller_client::ControllerClient::new(ch.clone()),
            ferrovol_csi::node_client::NodeClient::new(ch),
        )
    }

    pub fn restart(&mut self) {
        self.driver.kill();
        let root = self.driver.socket.parent().unwrap().to_path_buf();
        self.driver = DriverBuilder::new(&root).pool(&self.pool).kubelet(&self.kubelet).start();
    }
}

/// A plain HTTP/1.1 GET on loopback: (status code, body).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let (status, _, body) = http_get_accepting(addr, path, None).await;
    (status, body)
}

/// GET with an optional `Accept` header: (status, Content-Type, body).
pub async fn http_get_accepting(
    addr: &str,
    path: &str,
    accept: Option<&str>,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connecting");
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    let body = match header("transfer-encoding") {
        Some(te) if te.eq_ignore_ascii_case("chunked") => dechunk(body),
        _ => body.to_string(),
    };
    (status, header("content-type").unwrap_or_default(), body)
}

/// An HTTP/1.1 chunked body, joined (Go servers chunk larger answers).
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].strip_prefix("\r\n").unwrap_or(&after[size..]);
    }
    out
}

/// The `addr=` field of a log line.
pub fn logged_addr(line: &str) -> String {
    line.split("addr=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("addr in log line")
        .to_string()
}

/// Runs `ferrovol pool check` (with `--repair` if asked) on a pool no driver
/// holds: (clean, everything it printed).
pub fn pool_check(pool: &TestPool, repair: bool) -> (bool, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["pool", "check", "--pool-dir"]).arg(&pool.dir);
    if repair {
        cmd.arg("--repair");
    }
    let out = cmd.output().expect("running ferrovol pool check");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The local engine split as a node runs it: a `--mode controller`
/// process on `pool`, and a `--mode node` one on the same pool serving
/// `kubelet`, each under its own directory of `root`.
pub fn controller_and_node(root: &Path, pool: &TestPool, kubelet: &Kubelet) -> (Driver, Driver) {
    let controller = DriverBuilder::new(&root.join("controller"))
        .pool(pool)
        .args(["--mode", "controller"])
        .start();
    let node = DriverBuilder::new(&root.join("node"))
        .pool(pool)
        .kubelet(kubelet)
        .args(["--mode", "node"])
        .start();
    (controller, node)
}

/// A driver that stops at `failpoint` until something is written to the
/// returned FIFO: a deterministic way to hold an operation in flight.
pub fn driver_paused_at(root: &Path, pool: &TestPool, failpoint: &str) -> (Driver, PathBuf) {
    let fifo = root.join("gate");
    rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::from_raw_mode(0o600)).unwrap();
    let spec = format!("{failpoint}=pause:{}", fifo.display());
    let driver = DriverBuilder::new(root).pool(pool).env("FERROVOL_FAILPOINTS", &spec).start();
    (driver, fifo)
}

/// One writer appending sequence numbers to every member in lockstep (seq
/// N to each member, in order, before N+1), as the one-node group test.
pub struct Lockstep {
    stop: Arc<AtomicBool>,
    steps: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Lockstep {
    /// Started, and demonstrably running, on each volume's `log` file.
    pub fn start(vols: &[(String, PathBuf, PathBuf)]) -> Lockstep {
        Lockstep::run(vols, false, 1000)
    }

    /// The same, each write made durable (fdatasync) before the next: at
    /// any instant the members' durable logs differ by at most one step,
    /// so a crash-consistent group snapshot (no freeze) restores members
    /// within one step of each other.
    pub fn start_durable(vols: &[(String, PathBuf, PathBuf)]) -> Lockstep {
        Lockstep::run(vols, true, 20)
    }

    fn run(vols: &[(String, PathBuf, PathBuf)], durable: bool, warm_up: u64) -> Lockstep {
        let logs: Vec<PathBuf> = vols.iter().map(|(_, _, t)| t.join("log")).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let steps = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, steps) = (stop.clone(), steps.clone());
            std::thread::spawn(move || {
                let mut files: Vec<_> =
                    logs.iter().map(|l| std::fs::File::create(l).unwrap()).collect();
                let mut seq = 1u64;
                'writing: while !stop.load(Ordering::Relaxed) {
                    for f in &mut files {
                        // A test stuck elsewhere fills the volume; the
                        // writer stops then, and the test fails on its own.
                        if writeln!(f, "{seq}").is_err() || (durable && f.sync_data().is_err()) {
                            break 'writing;
                        }
                    }
                    steps.store(seq, Ordering::Relaxed);
                    seq += 1;
                }
            })
        };
        let writer = Lockstep { stop, steps, thread };
        writer.wait_for(warm_up);
        writer
    }

    /// Returns once `n` more steps are written to every member.
    pub fn advance(&self, n: u64) {
        self.wait_for(self.steps.load(Ordering::Relaxed) + n);
    }

    /// Until `target` steps are written; a writer that stopped (its volume
    /// full, its file gone) fails the test instead of spinning it for ever.
    fn wait_for(&self, target: u64) {
        let deadline = Instant::now() + START_TIMEOUT;
        while self.steps.load(Ordering::Relaxed) < target {
            assert!(!self.thread.is_finished(), "the lockstep writer stopped short of {target}");
            assert!(Instant::now() < deadline, "the lockstep writer is stuck short of {target}");
            std::thread::yield_now();
        }
    }

    /// Stops it; answers how many steps it wrote.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        self.steps.load(Ordering::Relaxed)
    }
}

/// The last sequence number in a log a [`Lockstep`] writer appends to.
pub fn last_seq(log: &Path) -> u64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().rev().find_map(|l| l.parse().ok()).unwrap_or(0)
}

/// An engine as the conformance suite sees it: its sockets (the processes
/// stay with the test) and how to ask it for a volume.
pub struct Conforming {
    pub name: String,
    pub controller: tonic::transport::Channel,
    pub node: Option<(tonic::transport::Channel, PathBuf)>,
    #[allow(clippy::type_complexity)]
    pub create: Box<
        dyn Fn(&str, i64, ferrovol_csi::VolumeCapability) -> ferrovol_csi::CreateVolumeRequest
            + Send
            + Sync,
    >,
    pub volume_size: i64,
    pub fs_type: String,
}

#[tonic::async_trait]
impl ferrovol_testkit::conformance::Subject for Conforming {
    fn name(&self) -> String {
        self.name.clone()
    }

    async fn controller(&self) -> tonic::transport::Channel {
        self.controller.clone()
    }

    async fn node(&self) -> Option<(tonic::transport::Channel, PathBuf)> {
        self.node.clone()
    }

    fn create(
        &self,
        name: &str,
        bytes: i64,
        cap: ferrovol_csi::VolumeCapability,
    ) -> ferrovol_csi::CreateVolumeRequest {
        (self.create)(name, bytes, cap)
    }

    fn volume_size(&self) -> i64 {
        self.volume_size
    }

    fn fs_type(&self) -> String {
        self.fs_type.clone()
    }
}

/// What the Ceph engines' tests share: the dev cluster's tools, the
/// kubelet's paths, and what a test left on this host.
pub mod ceph {
    use std::path::{Path, PathBuf};

    /// The dev cluster's ceph.conf (`FERROVOL_TEST_CEPH_CONF`), a scratch
    /// directory and the kubelet directory in it; None (the test says it
    /// is skipped) without a cluster, unless `FERROVOL_REQUIRE_CEPH` is set.
    pub fn scratch(test: &str) -> Option<(PathBuf, tempfile::TempDir, PathBuf)> {
        let Some(conf) = std::env::var_os("FERROVOL_TEST_CEPH_CONF") else {
            assert!(
                std::env::var_os("FERROVOL_REQUIRE_CEPH").is_none(),
                "FERROVOL_REQUIRE_CEPH is set but FERROVOL_TEST_CEPH_CONF is not"
            );
            eprintln!("{test}: skipped (no Ceph: set FERROVOL_TEST_CEPH_CONF, see .ci/run)");
            return None;
        };
        let root = tempfile::tempdir().unwrap();
        let kubelet = root.path().join("kubelet");
        std::fs::create_dir_all(&kubelet).unwrap();
        let kubelet = kubelet.canonicalize().unwrap();
        Some((conf.into(), root, kubelet))
    }

    /// Runs a Ceph tool against the dev cluster; answers its stdout.
    pub fn tool(conf: &Path, tool: &str, args: &[&str]) -> String {
        let out = std::process::Command::new(tool)
            .arg("-c")
            .arg(conf)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {tool}: {e}"));
        assert!(out.status.success(), "{tool} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A PV's staging directory under the kubelet directory, made.
    pub fn staging(kubelet: &Path, pv: &str) -> PathBuf {
        let p = kubelet.join("plugins/kubernetes.io/csi/pv").join(pv).join("globalmount");
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// A pod's target for a PV (its parent made, as the kubelet does).
    pub fn target(kubelet: &Path, pod: &str, pv: &str) -> PathBuf {
        let p = kubelet.join("pods").join(pod).join("volumes/kubernetes.io~csi").join(pv);
        std::fs::create_dir_all(&p).unwrap();
        p.join("mount")
    }

    /// Mounts below `root`, deepest first (the order to unmount them in).
    pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = ferrovol_host::node::mountinfo::read()
            .unwrap()
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(root))
            .collect();
        v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        v
    }

    /// Running (not zombie) `program` helpers whose command line names a
    /// path below `root`.
    pub fn helpers(program: &str, root: &Path) -> Vec<i32> {
        let root = root.display().to_string();
        let mut out = vec![];
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let zombie = stat.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z'));
            if cmd.starts_with(program) && cmd.contains(&root) && !zombie {
                out.push(pid);
            }
        }
        out
    }
}

/// Two cgroups (v2) standing for a node container and the place its
/// helpers run (`--helper-cgroup`); whatever is left in them is killed and
/// they are removed on drop.
pub struct Cgroups {
    root: PathBuf,
    container: PathBuf,
    pub helpers: PathBuf,
}

impl Cgroups {
    pub fn new(test: &str) -> Cgroups {
        let mounts = ferrovol_host::node::mountinfo::read().unwrap();
        let unified = mounts.iter().find(|m| m.fs_type == "cgroup2").expect("a cgroup v2 mount");
        let root = unified.mount_point.join(format!("ferrovol-{test}-{}", std::process::id()));
        let (container, helpers) = (root.join("container"), root.join("helpers"));
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&container).unwrap();
        Cgroups { root, container, helpers }
    }

    /// A driver started as a container runs: in the container's cgroup,
    /// and in a cgroup namespace rooted there (as on a cgroup v2 host, where
    /// nothing outside the container's cgroup can be named from inside).
    pub fn containerised(&self, driver: DriverBuilder) -> Driver {
        let procs = self.container.join("cgroup.procs");
        let enter = format!("echo $$ > {} && exec unshare --cgroup \"$@\"", procs.display());
        let d = driver.wrapped_in(["sh".to_string(), "-c".into(), enter, "sh".into()]).start();
        let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/cgroup")).unwrap();
        assert_ne!(ns(&d.pid().to_string()), ns("self"), "a cgroup namespace of its own");
        d
    }

    /// What a runtime does to stop a container: every process of its
    /// cgroup killed at once, whatever its session; done when the cgroup
    /// says it holds none (its `populated 0`), as a runtime waits for.
    pub fn kill_container(&self) {
        std::fs::write(self.container.join("cgroup.kill"), "1").unwrap();
        let events = self.container.join("cgroup.events");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&events).unwrap().contains("populated 0") {
            assert!(Instant::now() < deadline, "the container's processes outlived the kill");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The cgroup `pid` is in, relative to the mount (`/ferrovol-…/helpers`).
    pub fn of(pid: i32) -> String {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        text.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or_default().to_string()
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for cg in [&self.container, &self.helpers] {
            let _ = std::fs::write(cg.join("cgroup.kill"), "1");
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::fs::read_to_string(cg.join("cgroup.procs")).is_ok_and(|p| !p.is_empty())
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = std::fs::remove_dir(cg);
        }
        let _ = std::fs::remove_dir(&self.root);
    }
}
