//! Shared by the end-to-end suites: start the real daxd binary, and drive a vhost-user-blk
//! backend with the `blkio` crate's `virtio-blk-vhost-user` driver (a client nobody here
//! wrote).

use std::mem::MaybeUninit;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

/// Bytes of buffer each queue handle owns; the largest single request the suites send.
pub mod frontend;
pub mod guest;
pub mod qmp;

pub const QUEUE_BUF: usize = 1 << 20;

/// A running backend process (daxd or its peer), killed on drop if a test did not stop it.
pub struct Backend {
    child: Option<Child>,
    pub socket: PathBuf,
}

impl Backend {
    /// Starts daxd serving `region` on `dir/blk.sock` with `extra` arguments and waits
    /// until it accepts connections.
    pub fn start_daxd(dir: &Path, region: &Path, extra: &[&str]) -> Backend {
        let socket = dir.join("blk.sock");
        let mut command = Command::new(env!("CARGO_BIN_EXE_daxd"));
        command
            .arg("--region")
            .arg(region)
            .arg("--socket-path")
            .arg(&socket)
            .args(extra)
            .stdin(Stdio::null());
        Self::spawn(command, socket, true)
    }

    /// Starts daxd with exactly `command`'s arguments. With `wait_for_socket` set, waits for
    /// `socket` to accept connections.
    pub fn spawn(mut command: Command, socket: PathBuf, wait_for_socket: bool) -> Backend {
        let child = command.spawn().expect("start daxd");
        let mut daxd = Backend {
            child: Some(child),
            socket,
        };
        if wait_for_socket {
            daxd.wait_until_listening();
        }
        daxd
    }

    fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                // That probe was a connection of its own: daxd serves it (it ends at once)
                // and goes back to accepting. Nothing else to wait for.
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("daxd exited before listening: {status}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "daxd did not listen on {} within 20 s",
            self.socket.display()
        );
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// The process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// CPU time the process has used so far (user and system), in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&child),
            rustix::process::Signal::TERM,
        )
        .expect("send SIGTERM to daxd");
        wait_with_timeout(&mut child, Duration::from_secs(20))
    }
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            // It may have exited meanwhile; wait() below tells either way.
            child.kill().ok();
            let status = child.wait().unwrap();
            panic!("daxd did not exit within {timeout:?} (killed: {status:?})");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A child that already exited cannot be killed; its status is reported below.
            child.kill().ok();
            let status = child.wait();
            if let Ok(status) = status {
                if status.signal() != Some(9) && !std::thread::panicking() {
                    eprintln!("daxd had already exited: {status}");
                }
            }
        }
    }
}

/// A connected, started blkio client.
pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<QueueHandle>,
    pub capacity: u64,
}

/// One queue and the part of the client's buffer region that is its own.
pub struct QueueHandle {
    q: Blkioq,
    buf: *mut u8,
    completions: Vec<MaybeUninit<Completion>>,
}

// SAFETY: `buf` points into a memory region owned by the Blkio instance, which outlives
// the handle in every suite; only the handle's owner touches its part of it.
unsafe impl Send for QueueHandle {}

impl Client {
    /// Connects to `socket` with `num_queues` queues.
    pub fn connect(
        socket: &Path,
        num_queues: usize,
        read_only: bool,
    ) -> Result<Client, blkio::Error> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", socket.to_str().unwrap())?;
        blkio.set_bool("read-only", read_only)?;
        blkio.connect()?;
        blkio.set_i32("num-queues", num_queues as i32)?;
        let started = blkio.start()?;
        let capacity = blkio.get_u64("capacity")?;
        let region = blkio.alloc_mem_region(QUEUE_BUF * num_queues)?;
        blkio.map_mem_region(&region)?;
        let queues = started
            .queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| QueueHandle {
                q,
                buf: (region.addr + i * QUEUE_BUF) as *mut u8,
                completions: (0..64).map(|_| MaybeUninit::uninit()).collect(),
            })
            .collect();
        Ok(Client {
            blkio,
            queues,
            capacity,
        })
    }

    pub fn q(&mut self) -> &mut QueueHandle {
        &mut self.queues[0]
    }
}

/// The result of one request: 0 or a negative errno.
pub type Ret = i32;

impl QueueHandle {
    fn buf(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= QUEUE_BUF);
        // SAFETY: `buf` is the start of this handle's QUEUE_BUF bytes of a mapped blkio
        // memory region that lives as long as the client; no request is in flight while
        // the slice exists (requests here are submitted and completed synchronously).
        unsafe { std::slice::from_raw_parts_mut(self.buf, len) }
    }

    /// Waits for the one outstanding request and returns its result.
    fn complete(&mut self) -> Ret {
        let mut timeout = Duration::from_secs(30);
        let n = self
            .q
            .do_io(&mut self.completions[..1], 1, Some(&mut timeout), None)
            .expect("do_io");
        assert_eq!(n, 1, "request did not complete within 30 s");
        // SAFETY: do_io initialised the first `n` (= 1) completions.
        let completion = unsafe { self.completions[0].assume_init_read() };
        completion.ret
    }

    /// Sends two reads of `len` bytes at once (at `first`, then at `second`) and returns
    /// which completed first (0 or 1) and when each completed, from the submission.
    pub fn two_reads(&mut self, first: u64, second: u64, len: usize) -> (usize, [Duration; 2]) {
        assert!(2 * len <= QUEUE_BUF);
        let buf = self.buf(2 * len).as_mut_ptr();
        let start = Instant::now();
        self.q.read(first, buf, len, 0, ReqFlags::empty());
        // SAFETY: the second half of this handle's buffer, `len` bytes after `buf`.
        let buf2 = unsafe { buf.add(len) };
        self.q.read(second, buf2, len, 1, ReqFlags::empty());
        let mut took = [Duration::ZERO; 2];
        let mut order = Vec::new();
        while order.len() < 2 {
            let mut timeout = Duration::from_secs(30);
            let n = self
                .q
                .do_io(&mut self.completions[..2], 1, Some(&mut timeout), None)
                .expect("do_io");
            assert!(n >= 1, "requests did not complete within 30 s");
            for c in &self.completions[..n] {
                // SAFETY: do_io initialised the first `n` completions.
                let c = unsafe { c.assume_init_read() };
                assert_eq!(c.ret, 0, "read {} failed", c.user_data);
                took[c.user_data] = start.elapsed();
                order.push(c.user_data);
            }
        }
        (order[0], took)
    }

    /// `count` requests of 4 KiB, `depth` at a time, reads and writes alternating at
    /// random 4 KiB-aligned offsets below `span`; panics on a failed request.
    pub fn random_io(&mut self, count: u64, depth: usize, span: u64, seed: u64) {
        assert!(depth <= self.completions.len() && depth * 4096 <= QUEUE_BUF);
        let mut x = seed | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let base = self.buf(depth * 4096).as_mut_ptr();
        let mut submit = |q: &mut Blkioq, slot: usize, n: u64| {
            // SAFETY: slot < depth: the slot's own 4 KiB of this handle's buffer.
            let buf = unsafe { base.add(slot * 4096) };
            let offset = next() % (span / 4096) * 4096;
            if n % 2 == 0 {
                q.read(offset, buf, 4096, slot, ReqFlags::empty());
            } else {
                q.write(offset, buf, 4096, slot, ReqFlags::empty());
            }
        };
        let mut submitted = 0;
        for slot in 0..depth.min(count as usize) {
            submit(&mut self.q, slot, submitted);
            submitted += 1;
        }
        let mut completed = 0;
        while completed < count {
            let mut timeout = Duration::from_secs(30);
            let n = self
                .q
                .do_io(&mut self.completions[..depth], 1, Some(&mut timeout), None)
                .expect("do_io");
            assert!(n >= 1, "no request completed within 30 s");
            for i in 0..n {
                // SAFETY: do_io initialised the first `n` completions.
                let c = unsafe { self.completions[i].assume_init_read() };
                assert_eq!(
                    c.ret,
                    0,
                    "request {completed} failed: slot {} (buffer at {:#x}; this queue's buffers \
                     start at {:#x})",
                    c.user_data,
                    base as usize + c.user_data * 4096,
                    base as usize
                );
                completed += 1;
                if submitted < count {
                    submit(&mut self.q, c.user_data, submitted);
                    submitted += 1;
                }
            }
        }
    }

    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, Ret> {
        let buf = self.buf(len).as_mut_ptr();
        self.q.read(offset, buf, len, 0, ReqFlags::empty());
        match self.complete() {
            0 => Ok(self.buf(len).to_vec()),
            err => Err(err),
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Ret> {
        self.buf(data.len()).copy_from_slice(data);
        let buf = self.buf(data.len()).as_ptr();
        self.q.write(offset, buf, data.len(), 0, ReqFlags::empty());
        match self.complete() {
            0 => Ok(()),
            err => Err(err),
        }
    }

    pub fn flush(&mut self) -> Result<(), Ret> {
        self.q.flush(0, ReqFlags::empty());
        match self.complete() {
            0 => Ok(()),
            err => Err(err),
        }
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), Ret> {
        self.q.discard(offset, len, 0, ReqFlags::empty());
        match self.complete() {
            0 => Ok(()),
            err => Err(err),
        }
    }

    /// Write-zeroes; `unmap` lets the device deallocate the range.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), Ret> {
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.q.write_zeroes(offset, len, 0, flags);
        match self.complete() {
            0 => Ok(()),
            err => Err(err),
        }
    }
}

/// Runs daxd with `args`, which must be refused: it must exit with a failure status
/// within 10 s (one that keeps serving was not refused, and is killed). Returns what it
/// printed on standard error.
pub fn refused_start(args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_daxd"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            panic!("daxd {args:?} was not refused: it kept running");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "daxd {args:?} was not refused: {}",
        out.status
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `daxd inspect --control-socket CONTROL FORMAT...` of a running daxd; asserts that it
/// answered and returns what it printed.
pub fn daxd_inspect(control: &Path, format: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_daxd"))
        .arg("inspect")
        .arg("--control-socket")
        .arg(control)
        .args(format)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "daxd inspect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `daxd ARGS` (a helper command such as `fault add`) and returns its status and what
/// it printed on standard output and standard error.
pub fn daxd_command(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_daxd"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `daxd fault SUBCOMMAND --control-socket CONTROL ARGS...` (`args` starts with the
/// subcommand); asserts success and returns what it printed.
pub fn daxd_fault(control: &Path, args: &[&str]) -> String {
    let mut all = vec![
        "fault",
        args[0],
        "--control-socket",
        control.to_str().unwrap(),
    ];
    all.extend_from_slice(&args[1..]);
    let (ok, out, err) = daxd_command(&all);
    assert!(ok, "daxd {all:?}: {err}");
    out
}

/// The fault rules as `daxd fault list --json` reports them, read as daxd's own type.
pub fn fault_rules(control: &Path) -> Vec<daxd_fault::RuleInfo> {
    serde_json::from_str(&daxd_fault(control, &["list", "--json"]))
        .expect("fault list --json prints the rules")
}

/// The registry as `daxd inspect --json` reports it, read as the registry's own type.
pub fn inspect(control: &Path) -> daxd_registry::Snapshot {
    let mut inspection = inspection_json(control);
    serde_json::from_value(inspection["registry"].take()).expect("the registry is a Snapshot")
}

/// `daxd inspect --json` of a running daxd, parsed.
pub fn inspection_json(control: &Path) -> serde_json::Value {
    serde_json::from_str(&daxd_inspect(control, &["--json"])).expect("inspect --json prints JSON")
}

/// A temporary directory for one test; kept (and its path printed) when the environment
/// sets DAXD_KEEP_TEST_DIR, to read console logs after a run.
pub fn test_dir(prefix: &str) -> tempfile::TempDir {
    let mut dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    if std::env::var_os("DAXD_KEEP_TEST_DIR").is_some() {
        eprintln!("keeping {}", dir.path().display());
        dir.disable_cleanup(true);
    }
    dir
}

/// `lseek(SEEK_DATA)` from `offset`: where the next data at or after `offset` starts (the
/// file's length when only hole follows).
pub fn next_data(path: &Path, offset: u64) -> u64 {
    let file = std::fs::File::open(path).unwrap();
    match rustix::fs::seek(&file, rustix::fs::SeekFrom::Data(offset)) {
        Ok(at) => at,
        // Nothing but hole up to the end of the file.
        Err(rustix::io::Errno::NXIO) => std::fs::metadata(path).unwrap().len(),
        Err(e) => panic!("SEEK_DATA on {}: {e}", path.display()),
    }
}

/// Bytes `offset..offset+len` of a file, as the host sees them.
pub fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; len];
    file.read_exact(&mut buf).unwrap();
    buf
}

/// A deterministic pattern that differs per `seed` and per byte position.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A small file system mounted for one test, unmounted when dropped.
pub struct SmallFs {
    pub path: std::path::PathBuf,
}

#[derive(Debug, Clone, Copy)]
pub enum FsKind {
    /// Allocates a page even to read a hole through a shared mapping.
    Tmpfs,
    /// Maps the zero page for a hole that is only read.
    Ext4,
    /// Tracks dirty blocks per folio with iomap (ext4 with buffer heads).
    Xfs,
}

impl SmallFs {
    /// Mounts a file system of `size` bytes at `dir/small`.
    pub fn mount(dir: &std::path::Path, kind: FsKind, size: u64) -> SmallFs {
        let path = dir.join("small");
        std::fs::create_dir_all(&path).unwrap();
        let mut mount = Command::new("mount");
        match kind {
            FsKind::Tmpfs => {
                mount.args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]);
            }
            FsKind::Ext4 | FsKind::Xfs => {
                let (mkfs, force) = match kind {
                    FsKind::Xfs => ("mkfs.xfs", "-f"),
                    _ => ("mkfs.ext4", "-F"),
                };
                let image = dir.join(format!("small.{mkfs}"));
                std::fs::File::create(&image)
                    .unwrap()
                    .set_len(size)
                    .unwrap();
                let made = Command::new(mkfs)
                    .args(["-q", force])
                    .arg(&image)
                    .status()
                    .unwrap_or_else(|e| panic!("{mkfs}: {e} (ci/install-deps installs it)"));
                assert!(made.success(), "{mkfs}");
                mount.args(["-o", "loop"]).arg(&image);
            }
        }
        let status = mount.arg(&path).status().unwrap();
        assert!(status.success(), "mount a small {kind:?} (needs root)");
        SmallFs { path }
    }

    /// Writes a file until the file system is full.
    pub fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0xffu8; 4096];
        while file.write_all(&chunk).is_ok() {}
        filler
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount").arg(&self.path).status();
        if !matches!(unmounted, Ok(s) if s.success()) {
            eprintln!("cannot unmount {}", self.path.display());
        }
    }
}

/// Makes `fd` (a listening socket) the child's fd 3, without close-on-exec: where `--fd 3`
/// and systemd socket activation (`LISTEN_FDS=1`) expect it.
pub fn pass_as_fd_3(command: &mut Command, fd: std::os::fd::RawFd) {
    use std::os::unix::process::CommandExt;
    let place_at_fd_3 = move || {
        let ret = if fd == 3 {
            // SAFETY: clears close-on-exec on fd 3, which is the listener; no memory involved.
            unsafe { libc::fcntl(3, libc::F_SETFD, 0) }
        } else {
            // SAFETY: duplicates the listener onto fd 3 (the copy has no close-on-exec).
            unsafe { libc::dup2(fd, 3) }
        };
        if ret < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
    // functions (fcntl, dup2), allocating nothing.
    unsafe { command.pre_exec(place_at_fd_3) };
}
