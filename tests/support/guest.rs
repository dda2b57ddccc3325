//! Booting the test guest (built by ci/build-guest.sh) under QEMU with TCG against a
//! vhost-user-blk backend, and reading its verdict from the serial console.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The repository root (tests/ lives there).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The kernel and initramfs ci/build-guest.sh made.
pub fn guest_image() -> (PathBuf, PathBuf) {
    let dir = repo_root().join(".cache/guest/current");
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initramfs.img");
    assert!(
        kernel.exists() && initrd.exists(),
        "no test guest in {}: run ci/build-guest.sh (ci/test.sh does)",
        dir.display()
    );
    (kernel, initrd)
}

/// For a guest started inside the test guest (by cloud-hypervisor or a nested QEMU): the
/// test guest's initramfs with resources/guest/inner-init as its /init (a second
/// archive appended: the kernel unpacks both, the later file wins).
pub fn inner_initramfs(dir: &Path) -> PathBuf {
    let (_, initrd) = guest_image();
    let tree = dir.join("inner");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::copy(
        repo_root().join("resources/guest/inner-init"),
        tree.join("init"),
    )
    .unwrap();
    let archive = Command::new("sh")
        .arg("-c")
        .arg("chmod 755 init && echo init | cpio -o -H newc --quiet | gzip -1")
        .current_dir(&tree)
        .output()
        .unwrap();
    assert!(archive.status.success(), "cpio: {:?}", archive);
    let mut image = std::fs::read(initrd).unwrap();
    image.extend_from_slice(&archive.stdout);
    let path = dir.join("inner-initramfs.img");
    std::fs::write(&path, image).unwrap();
    path
}

/// A read-only ext4 image holding the host's `programs` with every library they load and
/// the dynamic loader, for a guest started inside the test guest, which has only busybox:
/// its init (resources/guest/inner-init) runs them as
/// `/tools/ld.so --library-path /tools/lib /tools/bin/NAME`.
pub fn tools_disk(dir: &Path, programs: &[&Path]) -> PathBuf {
    let tree = dir.join("tools");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::create_dir_all(tree.join("lib")).unwrap();
    let mut libraries = std::collections::BTreeSet::new();
    for program in programs {
        let name = program.file_name().unwrap();
        std::fs::copy(program, tree.join("bin").join(name)).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (ci/install-deps.sh installs it)",
                program.display()
            )
        });
        let ldd = Command::new("ldd").arg(program).output().unwrap();
        assert!(ldd.status.success(), "ldd {}: {ldd:?}", program.display());
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux... (0x...)"
        for line in String::from_utf8(ldd.stdout).unwrap().lines() {
            let path = line.split("=>").last().unwrap().split_whitespace().next();
            if let Some(path) = path.filter(|p| p.starts_with('/')) {
                libraries.insert(PathBuf::from(path));
            }
        }
    }
    let mut bytes = 0;
    for library in &libraries {
        let name = library.file_name().unwrap().to_str().unwrap();
        let target = if name.starts_with("ld-linux") {
            tree.join("ld.so")
        } else {
            tree.join("lib").join(name)
        };
        bytes += std::fs::copy(library, target).unwrap();
    }
    assert!(
        tree.join("ld.so").exists(),
        "no dynamic loader among {libraries:?}"
    );
    let image = dir.join("tools.img");
    let mib = bytes / (1 << 20) * 5 / 4 + 32;
    let mkfs = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg(format!("{mib}M"))
        .output()
        .unwrap();
    assert!(mkfs.status.success(), "mke2fs -d: {mkfs:?}");
    image
}

/// One case's verdict as the guest printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail(Vec<String>),
    /// BEGIN seen but neither PASS nor FAIL: the guest died or hung in the case.
    Unfinished,
}

/// What one boot printed.
#[derive(Debug)]
pub struct Boot {
    pub console: String,
    pub console_log: PathBuf,
    pub cases: BTreeMap<String, Verdict>,
    /// Each case's output lines (BEGIN to its verdict), for failure reports.
    pub case_output: BTreeMap<String, Vec<String>>,
    pub results: BTreeMap<String, String>,
    pub finished: bool,
    /// The runner killed QEMU at its timeout: the guest hung.
    pub timed_out: bool,
    /// At the timeout a vCPU of the test guest had halted for good: over
    /// [`VCPU_STOP_SAMPLE`] its thread in QEMU neither ran nor was woken, so no interrupt,
    /// not even the guest's own timers, reached it (QEMU's TCG emulation of nested SVM
    /// loses them now and then; a hung backend leaves the guest's CPUs waking).
    pub halted: bool,
    /// The test guest finished, but a guest nested in it stopped on its own CPU rather
    /// than on its disk (see `cloud_hypervisor::inner_timer_stopped`): what the runner
    /// found, for the report. Such a run is run again, as one with a halted vCPU is.
    pub nested_cpu_stopped: Option<String>,
}

/// How long a QEMU that reached the runner's timeout is watched before it is killed, for a
/// vCPU that stopped for good (see [`Boot::halted`]). A live Linux CPU, even an idle one,
/// wakes at least every 4 s (its soft-lockup watchdog's timer), and a guest that is merely
/// waiting (on a hung backend, say) runs its watchdogs and the `timeout`s of its scripts
/// too.
pub const VCPU_STOP_SAMPLE: Duration = Duration::from_secs(10);

/// Context switches and CPU time (user and system, in clock ticks) of each vCPU thread of
/// QEMU `pid`: the threads it names `CPU n/...` (`-name ...,debug-threads=on`).
fn vcpu_activity(pid: u32) -> Vec<(String, u64, u64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut vcpus = Vec::new();
    for task in tasks.flatten() {
        let dir = task.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.starts_with("CPU ") {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let switches: u64 = status
            .lines()
            .filter(|l| l.contains("voluntary_ctxt_switches"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        // The fields after the command name, which is in parentheses and holds spaces;
        // utime and stime are fields 14 and 15 of proc(5), this slice starts at field 3.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        let ticks = field(14).unwrap_or(0) + field(15).unwrap_or(0);
        vcpus.push((comm.trim().to_owned(), switches, ticks));
    }
    vcpus
}

/// Whether a vCPU thread of QEMU `pid` neither ran nor was woken over
/// [`VCPU_STOP_SAMPLE`]: that vCPU halted and no interrupt reaches it any more.
fn a_vcpu_stopped_for_a_sample(pid: u32) -> bool {
    let before = vcpu_activity(pid);
    if before.is_empty() {
        return false;
    }
    std::thread::sleep(VCPU_STOP_SAMPLE);
    let after = vcpu_activity(pid);
    before.iter().any(|vcpu| after.contains(vcpu))
}

impl Boot {
    /// The guest gave no verdict: its script neither finished nor was cut off by the
    /// runner's power cut, and either QEMU ended by itself (the test guest reset itself,
    /// QEMU runs with -no-reboot, or its process vanished) or at the runner's timeout a
    /// vCPU had stopped for good ([`Boot::halted`]), or it finished but a guest nested in
    /// it stopped on its own CPU ([`Boot::nested_cpu_stopped`]). A guest that stopped
    /// printing until the runner's timeout while its vCPUs still ran or woke hung, and
    /// that is a verdict: a failure.
    pub fn gave_no_verdict(&self) -> bool {
        if self.console.contains("\n[runner] power cut\n") {
            return false;
        }
        self.nested_cpu_stopped.is_some() || (!self.finished && (!self.timed_out || self.halted))
    }

    /// The console's last `n` lines, for a report.
    pub fn console_tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Panics, naming the case and quoting what the guest printed, unless every case in
    /// `expected` passed.
    pub fn assert_passed(&self, expected: &[&str], host_findings: &str) {
        let mut report = String::new();
        if !self.finished {
            let _ = writeln!(report, "the guest did not finish its script");
        }
        for name in expected {
            match self.cases.get(*name) {
                Some(Verdict::Pass) => {}
                Some(verdict) => {
                    let _ = writeln!(report, "case {name}: {verdict:?}");
                    for line in self.case_output.get(*name).into_iter().flatten() {
                        let _ = writeln!(report, "    guest: {line}");
                    }
                }
                None => {
                    let _ = writeln!(report, "case {name}: never started");
                }
            }
        }
        if !report.is_empty() {
            let tail: Vec<&str> = self.console.lines().rev().take(25).collect();
            panic!(
                "{report}host found: {host_findings}\nconsole log: {}\nlast console lines:\n{}",
                self.console_log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }

    pub fn result(&self, key: &str) -> Option<&str> {
        self.results.get(key).map(String::as_str)
    }
}

/// The machine a test boots.
#[derive(Debug, Clone)]
pub struct Vm<'a> {
    /// The vhost-user-blk socket, if the guest has that disk.
    pub socket: Option<&'a Path>,
    pub num_queues: u16,
    /// `-machine` value.
    pub machine: String,
    /// `-m` value; the memfd backing guest RAM is always 1 GiB.
    pub memory: String,
    /// More QEMU arguments (pmem devices).
    pub extra: Vec<String>,
    /// The command that runs QEMU, QEMU's arguments appended (default: the host's QEMU).
    pub qemu: Vec<String>,
    /// QEMU reconnects to the vhost-user-blk socket this often when the backend is gone
    /// (`reconnect-ms`; none: a lost backend stops the disk).
    pub reconnect_ms: Option<u32>,
    /// More kernel command-line parameters.
    pub kernel_args: String,
}

impl<'a> Vm<'a> {
    /// A guest with no disk but what `extra` adds.
    pub fn diskless() -> Vm<'a> {
        Vm {
            socket: None,
            num_queues: 1,
            machine: "q35".into(),
            memory: "1G".into(),
            extra: Vec::new(),
            qemu: vec!["qemu-system-x86_64".into()],
            reconnect_ms: None,
            kernel_args: String::new(),
        }
    }

    /// A guest with one vhost-user-blk disk.
    pub fn blk(socket: &'a Path, num_queues: u16) -> Vm<'a> {
        Vm {
            socket: Some(socket),
            num_queues,
            machine: "q35".into(),
            memory: "1G".into(),
            extra: Vec::new(),
            qemu: vec!["qemu-system-x86_64".into()],
            reconnect_ms: None,
            kernel_args: String::new(),
        }
    }
}

/// The Debian sid root with QEMU 11.1 that ci/build-sid-root.sh made.
pub fn sid_root() -> PathBuf {
    let sid = repo_root().join(".cache/sid-root");
    assert!(
        sid.join("usr/bin/qemu-system-x86_64").exists(),
        "no QEMU 11.1 root in {}: run ci/build-sid-root.sh (ci/test.sh does)",
        sid.display()
    );
    sid
}

/// The command prefix that runs QEMU >= 11.1 from the sid root ci/build-sid-root.sh made:
/// in a private mount namespace with /dev, the repository and `dir` bind-mounted at their
/// own paths, chrooted into the root. The guest's 9p share of "/" is then the sid root.
pub fn sid_qemu(dir: &Path) -> Vec<String> {
    let sid = sid_root();
    let repo = repo_root();
    let script = format!(
        "set -e; mount --rbind /dev {sid}/dev; \
         mkdir -p {sid}{dir} {sid}{repo}; mount --bind {dir} {sid}{dir}; mount --bind {repo} {sid}{repo}; \
         exec chroot {sid} qemu-system-x86_64 \"$@\"",
        sid = sid.display(),
        dir = dir.display(),
        repo = repo.display(),
    );
    [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
        "sh",
    ]
    .map(String::from)
    .to_vec()
}

/// Runs `attempt(0)` and, if that boot gave no verdict, reports it with the end of its
/// console and runs `attempt(1)`; returns the boot and its attempt number. For test guests
/// that run KVM guests of their own: now and then (2 of 13 cloud-hypervisor runs in one
/// session) such a test guest stops while its KVM guest runs, in one of two ways, both
/// QEMU's TCG emulation of nested SVM giving up: it resets itself (no panic, no message;
/// QEMU exits as for a reboot), or every one of its vCPUs halts and no interrupt wakes
/// one again (QEMU idle, its vCPU threads asleep, nothing printed; seen in the
/// cloud-hypervisor restart loop). Those two are run again. A guest that hangs until the
/// runner's timeout while QEMU still runs it is a failure (`Boot::timed_out`), as is any
/// failure the guest reports.
pub fn boot_for_a_verdict(mut attempt: impl FnMut(u32) -> Boot) -> (Boot, u32) {
    let boot = attempt(0);
    if !boot.gave_no_verdict() {
        return (boot, 0);
    }
    eprintln!(
        "the test guest gave no verdict (console log {}{}); running it again. Its console ended:\n{}",
        boot.console_log.display(),
        boot.nested_cpu_stopped
            .as_deref()
            .map_or(String::new(), |why| format!("; {why}")),
        boot.console_tail(15)
    );
    (attempt(1), 1)
}

/// Boots the guest, runs `script` (a file under `dir`, read by the guest over 9p, with
/// resources/guest/*-cases.sh sourced) and waits up to `timeout` for it to power off. The
/// console goes to `dir/<name>.console.log`. When the guest prints `WAIT <step>`, `host`
/// runs with the step and the console so far, then the file `dir/<step>` is created,
/// which the guest waits for.
pub fn boot(
    dir: &Path,
    name: &str,
    vm: &Vm<'_>,
    script: &str,
    timeout: Duration,
    host: &mut dyn FnMut(&str, &str),
) -> Boot {
    boot_until(dir, name, vm, script, timeout, host, &mut |_| false)
}

/// [`boot`], and QEMU is killed with SIGKILL (a power cut for everything in the guest) as
/// soon as `cut` returns true for the console so far. The returned boot is then not
/// `finished` and its console ends with a `[runner] power cut` line.
pub fn boot_until(
    dir: &Path,
    name: &str,
    vm: &Vm<'_>,
    script: &str,
    timeout: Duration,
    host: &mut dyn FnMut(&str, &str),
    cut: &mut dyn FnMut(&str) -> bool,
) -> Boot {
    let script_path = guest_script(dir, name, script);
    let console_log = dir.join(format!("{name}.console.log"));
    let mut qemu = qemu_command(vm, &script_path, &console_log);
    let spawned = qemu
        .spawn()
        .unwrap_or_else(|e| panic!("start {:?} (run ci/install-deps.sh): {e}", vm.qemu));
    let mut guard = KillOnDrop(Some(spawned));
    // A host callback that panics must not leave QEMU running.
    let child = guard.0.as_mut().unwrap();
    let deadline = Instant::now() + timeout;
    let mut answered = 0;
    let mut was_cut = false;
    let mut halted = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        let console = std::fs::read_to_string(&console_log).unwrap_or_default();
        if cut(&console) {
            // SIGKILL: QEMU gets no chance to write anything more; what the guest had
            // not written to its disks is gone.
            child.kill().ok();
            child.wait().ok();
            was_cut = true;
            break None;
        }
        let waits: Vec<&str> = console
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix("WAIT "))
            .collect();
        for step in waits.iter().skip(answered) {
            host(step, &console);
            std::fs::write(dir.join(step), b"go").unwrap();
            answered += 1;
        }
        if Instant::now() > deadline {
            // The guest is stuck: end QEMU; the report below says the script never
            // finished, whatever kill and wait return. First see whether it stopped
            // because the emulated CPUs did (see `Boot::halted`).
            halted = a_vcpu_stopped_for_a_sample(child.id());
            child.kill().ok();
            child.wait().ok();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = guard.0.take().unwrap().wait_with_output().unwrap();
    let console = std::fs::read_to_string(&console_log).unwrap_or_default();
    let mut boot = parse_console(console, console_log);
    if was_cut {
        boot.finished = false;
        boot.console.push_str("\n[runner] power cut\n");
        return boot;
    }
    if status.is_none() {
        boot.finished = false;
        boot.timed_out = true;
        boot.halted = halted;
        boot.console
            .push_str(&format!("\n[runner] QEMU killed after {timeout:?}\n"));
        if halted {
            boot.console.push_str(&format!(
                "[runner] a vCPU of the test guest had neither run nor been woken for \
                 {VCPU_STOP_SAMPLE:?}: halted with no interrupt reaching it\n"
            ));
        }
    }
    if status.is_some_and(|s| !s.success()) || !boot.finished {
        boot.console.push_str(&format!(
            "\n[runner] QEMU {status:?}; stderr: {}\n",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    boot
}

/// The QEMU command that boots `vm` with the test kernel, running `script_path` (see
/// [`guest_script`]), its serial console written to `console_log`; stdout and stderr piped.
pub fn qemu_command(vm: &Vm<'_>, script_path: &Path, console_log: &Path) -> Command {
    let (kernel, initrd) = guest_image();
    let mut qemu = Command::new(&vm.qemu[0]);
    qemu.args(&vm.qemu[1..])
        .arg("-machine")
        .arg(&vm.machine)
        .args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
        ])
        .arg(&vm.memory)
        .args(["-object", "memory-backend-memfd,id=mem,size=1G,share=on"])
        .args(["-numa", "node,memdev=mem"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 quiet daxd.script={} {}",
            script_path.display(),
            vm.kernel_args
        ))
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        // vCPU threads named `CPU n/TCG`, for telling a stopped vCPU from a hung guest.
        .args(["-name", "daxd-test-guest,debug-threads=on"])
        .arg("-serial")
        .arg(format!("file:{}", console_log.display()))
        .args(vm.socket.map_or_else(Vec::new, |socket| {
            vec![
                "-chardev".to_owned(),
                format!(
                    "socket,id=blk0,path={}{}",
                    socket.display(),
                    vm.reconnect_ms
                        .map_or_else(String::new, |ms| format!(",reconnect-ms={ms}"))
                ),
                "-device".to_owned(),
                format!(
                    "vhost-user-blk-pci,chardev=blk0,num-queues={}",
                    vm.num_queues
                ),
            ]
        }))
        .args([
            "-virtfs",
            "local,path=/,mount_tag=host,security_model=none,readonly=on",
        ])
        .args(&vm.extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    qemu
}

/// Kills the QEMU it holds when dropped (a test that panics mid-run).
pub struct KillOnDrop(pub Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

/// Writes the guest's script for boot `name` into `dir` (every resources/guest/*-cases.sh
/// sourced first, so that a new one cannot be forgotten) and returns its path, for the
/// kernel command line's `daxd.script=`.
pub fn guest_script(dir: &Path, name: &str, script: &str) -> PathBuf {
    let script_path = dir.join(format!("{name}.sh"));
    let mut prelude = format!("WAIT_DIR={}\n", dir.display());
    let mut libs: Vec<PathBuf> = std::fs::read_dir(repo_root().join("resources/guest"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.to_string_lossy().ends_with("-cases.sh"))
        .collect();
    libs.sort();
    for path in libs {
        prelude += &format!(". /host{}\n", path.display());
    }
    std::fs::write(&script_path, format!("{prelude}{script}")).unwrap();
    script_path
}

/// A host tool's (success, stdout, stderr), with sbin on PATH.
pub fn host_tool(program: &str, args: &[&str]) -> (bool, Vec<u8>, String) {
    let out = Command::new(program)
        .args(args)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The line of `printed` (what `daxd print-qemu-args` printed) that starts with `prefix`.
pub fn printed_line(printed: &str, prefix: &str) -> String {
    printed
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("print-qemu-args printed no {prefix} line:\n{printed}"))
        .to_owned()
}

/// What `daxd print-qemu-args` prints for daxd's `args` (which name the region and the
/// socket), to build a guest's QEMU options from.
pub fn print_qemu_args<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let printed = Command::new(env!("CARGO_BIN_EXE_daxd"))
        .arg("print-qemu-args")
        .args(args)
        .output()
        .unwrap();
    assert!(printed.status.success(), "daxd print-qemu-args failed");
    String::from_utf8(printed.stdout).unwrap()
}

/// The `-device` value of the NVDIMM that `print-qemu-args` offers (in a comment) for a
/// pmem window instead of virtio-pmem.
pub fn nvdimm_alternative(printed: &str) -> String {
    printed
        .lines()
        .find_map(|l| {
            l.split_once("-device nvdimm,")
                .map(|(_, d)| format!("nvdimm,{d}"))
        })
        .unwrap_or_else(|| panic!("print-qemu-args offers no NVDIMM:\n{printed}"))
}

/// A byte string's sha256 as sha256sum prints it, to compare with what a guest printed.
pub fn sha256(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The `RESULT key value` lines of a console, so far.
pub fn results(console: &str) -> BTreeMap<String, String> {
    console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("RESULT "))
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

pub fn parse_console(console: String, console_log: PathBuf) -> Boot {
    let mut cases = BTreeMap::new();
    let mut case_output: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut finished = false;
    for line in console.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line.strip_prefix("CASE ") {
            let (name, what) = rest.split_once(' ').unwrap_or((rest, ""));
            match what {
                "BEGIN" => {
                    cases.insert(name.to_owned(), Verdict::Unfinished);
                    current = Some(name.to_owned());
                }
                "PASS" => {
                    cases.insert(name.to_owned(), Verdict::Pass);
                    current = None;
                }
                fail => {
                    let entry = cases.entry(name.to_owned()).or_insert(Verdict::Unfinished);
                    match entry {
                        Verdict::Fail(reasons) => reasons.push(fail.to_owned()),
                        _ => *entry = Verdict::Fail(vec![fail.to_owned()]),
                    }
                }
            }
        } else if line.starts_with("DAXD-GUEST-DONE") {
            finished = true;
            current = None;
        }
        if let Some(name) = &current {
            case_output
                .entry(name.clone())
                .or_default()
                .push(line.to_owned());
        }
    }
    Boot {
        results: results(&console),
        console,
        console_log,
        cases,
        case_output,
        finished,
        timed_out: false,
        halted: false,
        nested_cpu_stopped: None,
    }
}
