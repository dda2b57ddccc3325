//! cloud-hypervisor against daxd: KVM guests booted by cloud-hypervisor inside the test
//! guest (QEMU, TCG, `-cpu max`, whose emulated SVM with nested paging lets kvm_amd load),
//! with daxd, in the same test guest, serving their vhost-user-blk disk with 2 queues. One
//! boot per step of resources/guest/inner-init: O_DIRECT patterns found in the region file
//! and a discard; a second boot on the same daxd; fio verify over both queues; daxd killed
//! and restarted under a running guest; an ext4 file system that e2fsck finds clean inside
//! and outside; a read-only disk; a pmem window of the region that cloud-hypervisor maps
//! for the guest's DAX, next to daxd's disk. Each boot checks size, queues and serial.
//! cloud-hypervisor is built by ci/build-cloud-hypervisor.sh.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::guest::{
    boot, boot_for_a_verdict, guest_image, inner_initramfs, repo_root, tools_disk, Vm,
};
use crate::support::test_dir;

/// The cloud-hypervisor binary ci/build-cloud-hypervisor.sh made.
fn cloud_hypervisor() -> PathBuf {
    let binary = repo_root().join(".cache/cloud-hypervisor/current/cloud-hypervisor");
    assert!(
        binary.exists(),
        "no cloud-hypervisor at {}: run ci/build-cloud-hypervisor.sh (ci/test.sh does)",
        binary.display()
    );
    binary
}

/// What one run of the cloud-hypervisor case printed: the outer guest's `RESULT` lines
/// and the inner guests' `INNER-RESULT` lines by step.
struct ChRun {
    boot: crate::support::guest::Boot,
}

/// What the inner guest of `step` printed (its console lines, CR dropped).
fn inner_lines<'a>(console: &'a str, step: &str) -> Vec<&'a str> {
    let prefix = format!("INNER {step}: ");
    console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix(prefix.as_str()))
        .collect()
}

/// The step whose inner guest stopped on a CPU of its own and not on its disk, with what
/// shows it: cloud-hypervisor ended at its 180 s timeout (exit 124); the inner kernel
/// reported that a CPU's timer stopped (RCU's "timer wakeup didn't happen", which KVM under
/// QEMU's TCG emulation of SVM causes now and then by losing a timer interrupt); and from
/// the step's last progress line on, its watchdog (the restart step's, every 5 s) saw no
/// request of the disk in flight, at least twice. A run that stops with a request in flight,
/// or without the kernel's report, is not this: it fails.
pub(crate) fn inner_timer_stopped(console: &str) -> Option<String> {
    console.lines().find_map(|line| {
        let step = line
            .trim_end_matches('\r')
            .strip_prefix("RESULT ch_exit_")?
            .strip_suffix(" 124")?;
        let lines = inner_lines(console, step);
        if !lines
            .iter()
            .any(|l| l.contains("timer wakeup didn't happen"))
        {
            return None;
        }
        let since_progress = lines
            .iter()
            .rposition(|l| l.starts_with("INNER-PROGRESS "))
            .map_or(&lines[..], |last| &lines[last + 1..]);
        let watched: Vec<Vec<u64>> = since_progress
            .iter()
            .filter_map(|l| l.strip_prefix("INNER-WATCH inflight"))
            .map(|counts| {
                counts
                    .split_whitespace()
                    .map(|n| n.parse().unwrap_or(u64::MAX))
                    .collect()
            })
            .collect();
        let idle = watched.len() >= 2
            && watched
                .iter()
                .all(|counts| counts.len() == 2 && counts.iter().all(|&n| n == 0));
        idle.then(|| {
            format!(
                "step {step}: the inner guest's kernel reported a CPU whose timer stopped, \
                 with nothing in flight on its disk in {} samples",
                watched.len()
            )
        })
    })
}

impl ChRun {
    /// The console of `step`'s inner guest and the backend's last lines, for a report.
    fn step_report(&self, step: &str) -> String {
        let lines = inner_lines(&self.boot.console, step);
        let tail = &lines[lines.len().saturating_sub(40)..];
        let backend: Vec<&str> = self
            .boot
            .console
            .lines()
            .filter(|l| l.starts_with("BACKEND: "))
            .collect();
        format!(
            "the inner guest of step {step} printed, at the end:\n{}\nthe backend's log ended:\n{}",
            tail.join("\n"),
            backend.join("\n")
        )
    }

    fn inner(&self, step: &str, key: &str) -> Option<String> {
        let prefix = format!("INNER {step}: INNER-RESULT {key} ");
        self.boot
            .console
            .lines()
            .find_map(|l| l.trim_end_matches('\r').strip_prefix(&prefix))
            .map(str::to_owned)
    }

    fn outer(&self, key: &str) -> Option<String> {
        self.boot.result(key).map(str::to_owned)
    }
}

/// The case against `backend` (daxd's path or `qemu-storage-daemon`), its verdicts checked
/// but for the serial number, which only daxd sets (`serial`).
fn cloud_hypervisor_suite(backend: &str, serial: Option<&str>) {
    let ch = cloud_hypervisor();
    let dir = test_dir("daxd-ch-");
    let d = dir.path();
    let (kernel, _) = guest_image();
    let initramfs = inner_initramfs(d);
    let tools = tools_disk(
        d,
        &[
            Path::new("/usr/bin/fio"),
            Path::new("/sbin/mke2fs"),
            Path::new("/sbin/e2fsck"),
        ],
    );
    let script = format!(
        "run_case cloud_hypervisor case_cloud_hypervisor {backend} {} {} {} {} {}\n",
        ch.display(),
        kernel.display(),
        initramfs.display(),
        tools.display(),
        repo_root()
            .join("resources/cloud-hypervisor/vhost_user_block")
            .display()
    );
    let run_once = |name: &str| {
        let mut boot = boot(
            d,
            name,
            &Vm::diskless(),
            &script,
            Duration::from_secs(600),
            &mut |_, _| {},
        );
        boot.nested_cpu_stopped = inner_timer_stopped(&boot.console);
        boot
    };
    let (boot, _) = boot_for_a_verdict(|attempt| run_once(&format!("ch-{attempt}")));
    boot.assert_passed(&["cloud_hypervisor"], "");
    let run = ChRun { boot };
    let report = format!("console log: {}", run.boot.console_log.display());
    let some = |v: &str| Some(v.to_owned());
    assert_eq!(run.outer("kvm_amd_nested"), some("1"), "{report}");
    let daxd = serial.is_some();
    let steps: &[&str] = if daxd {
        &[
            "write",
            "again",
            "fio",
            "restart",
            "fs",
            "read-only",
            "pmem",
        ]
    } else {
        &["write", "again", "fio", "restart", "fs", "read-only"]
    };
    for &step in steps {
        assert_eq!(
            run.outer(&format!("ch_exit_{step}")),
            some("0"),
            "{step}: {report}; {}",
            run.step_report(step)
        );
        // The inner guest's timer ticks periodically (see inner_timer_args in
        // resources/guest/ch-cases.sh): the local APIC, not its TSC deadline mode, on both
        // CPUs.
        assert_eq!(run.inner(step, "clockevent"), some("lapic"), "{report}");
        assert_eq!(run.inner(step, "tick_modes"), some("0:0 1:0"), "{report}");
        assert_eq!(run.inner(step, "done"), some(step), "{step}: {report}");
        assert_eq!(run.inner(step, "sectors"), some("131072"), "{report}");
        assert_eq!(run.inner(step, "queues"), some("2"), "{report}");
        // The fio step's daxd was started as vhost_user_block, which has no serial option.
        if let Some(serial) = serial.filter(|_| step != "fio") {
            assert_eq!(run.inner(step, "serial"), some(serial), "{report}");
        }
        for failure in [
            "tools_missing",
            "write_failed",
            "readback_differs",
            "discard_failed",
            "discard_not_zero",
            "mkfs_failed",
            "mount_failed",
            "umount_failed",
        ] {
            assert_eq!(
                run.inner(step, failure),
                None,
                "{step}: {failure}; {report}"
            );
        }
    }
    // O_DIRECT patterns where the guest put them, in the region file; the discarded MiB
    // zero there; a second boot on the same backend reads them back.
    for kib in ["0", "3072", "65472"] {
        let wrote = run.inner("write", &format!("wrote_{kib}"));
        assert!(wrote.is_some(), "{report}");
        assert_eq!(
            run.outer(&format!("region_{kib}")),
            wrote,
            "{kib} KiB; {report}"
        );
        assert_eq!(
            run.inner("again", &format!("found_{kib}")),
            wrote,
            "{report}"
        );
    }
    assert_eq!(
        run.outer("region_discarded"),
        run.outer("zero_1m"),
        "{report}"
    );
    // fio verified every block it wrote, and both queues carried requests.
    assert_eq!(run.inner("fio", "fio_exit"), some("0"), "{report}");
    for queue in ["req.0", "req.1"] {
        let interrupts: u64 = run
            .inner("fio", &format!("interrupts_{queue}"))
            .unwrap_or_else(|| panic!("no interrupt count of {queue}; {report}"))
            .parse()
            .unwrap();
        assert!(interrupts > 0, "{queue} completed nothing; {report}");
    }
    // Killed and started again under the running guest: every block read back as written.
    assert_eq!(run.outer("restarted"), some("1"), "{report}");
    // Killed while the guest was at it (progress is printed every 20 blocks of 400).
    let killed_after: u32 = run.outer("killed_after").unwrap().parse().unwrap();
    assert!(
        killed_after < 20,
        "the guest was done before the kill; {report}"
    );
    assert_eq!(
        run.inner("restart", "restart_blocks"),
        some("400"),
        "{report}"
    );
    assert_eq!(run.inner("restart", "restart_bad"), some("0"), "{report}");
    // The guest's file system, clean and with its files, as e2fsck in the guest and
    // e2fsck and debugfs outside see it.
    assert_eq!(run.inner("fs", "e2fsck_exit"), some("0"), "{report}");
    assert_eq!(run.outer("e2fsck_exit"), some("0"), "{report}");
    for n in 1..=3 {
        let file = run.inner("fs", &format!("file{n}"));
        assert!(file.is_some(), "{report}");
        assert_eq!(run.outer(&format!("fs_file{n}")), file, "{report}");
    }
    // Read-only: flagged, a write refused, reads served.
    assert_eq!(run.inner("read-only", "ro"), some("1"), "{report}");
    assert_eq!(
        run.inner("read-only", "read_only_write"),
        some("refused"),
        "{report}"
    );
    assert_eq!(
        run.inner("read-only", "read_only_read"),
        run.outer("region_0_now"),
        "{report}"
    );
    for step in ["again", "fio", "fs"] {
        assert_eq!(
            run.outer(&format!("backend_exit_{step}")),
            some("0"),
            "{step}: {report}"
        );
    }
    assert_eq!(run.outer("backend_exit_read-only"), some("0"), "{report}");
    if daxd {
        // DAX on daxd's pmem window (32 MiB at offset 0): the guest's file is in the region
        // file where the window is, and the disk's first block 32 MiB after it.
        assert_eq!(run.inner("pmem", "pmem_sectors"), some("65536"), "{report}");
        assert_eq!(run.inner("pmem", "pmem_dax"), some("1"), "{report}");
        assert_eq!(run.inner("pmem", "pmem_mount"), some("1"), "{report}");
        let file = run.inner("pmem", "pmem_file");
        assert!(file.is_some(), "{report}");
        assert_eq!(run.outer("pmem_region_file"), file, "{report}");
        let wrote = run.inner("pmem", "wrote_0");
        assert!(wrote.is_some(), "{report}");
        assert_eq!(run.outer("pmem_region_disk_0"), wrote, "{report}");
        assert_eq!(run.outer("backend_exit_pmem"), some("0"), "{report}");
    }
    let inner_lines = run
        .boot
        .console
        .lines()
        .filter(|l| l.starts_with("INNER "))
        .count();
    eprintln!(
        "{backend}: every check passed ({inner_lines} lines from cloud-hypervisor's guests; \
         killed under the running guest after {} of 400 blocks)",
        killed_after * 20
    );
}

#[test]
#[ignore = "needs QEMU, the test guest and cloud-hypervisor; run by ci/test.sh"]
fn cloud_hypervisor_guests_use_daxd_as_their_disk() {
    cloud_hypervisor_suite(env!("CARGO_BIN_EXE_daxd"), Some("ch-inner"));
}

/// The same suite against QEMU's backend, to show it tests the frontend path and not daxd
/// alone.
#[test]
#[ignore = "by hand, for comparison with the peer"]
fn soak_cloud_hypervisor_against_qemu_storage_daemon() {
    cloud_hypervisor_suite("qemu-storage-daemon", None);
}

/// The restart step alone, many times (`DAXD_CH_RESTARTS` inner boots, default 30), each
/// with daxd SIGKILLed and started again twice under the inner guest's writes, daxd at
/// debug level: a table of the runs, and every run must end with all 400 blocks read back
/// as written. A run that stalls prints the inner guest's watchdog (requests in flight
/// every 5 s, hung-task reports) and daxd's log.
#[test]
#[ignore = "by hand: a loop of cloud-hypervisor restarts"]
fn soak_cloud_hypervisor_restart_loop() {
    let runs: u32 = std::env::var("DAXD_CH_RESTARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let ch = cloud_hypervisor();
    let dir = test_dir("daxd-ch-loop-");
    let d = dir.path();
    let (kernel, _) = guest_image();
    let initramfs = inner_initramfs(d);
    // The restart step needs no tool of its own; the disk is the suite's.
    let tools = tools_disk(d, &[Path::new("/usr/bin/fio")]);
    let script = format!(
        "run_case ch_restart_loop case_ch_restart_loop {} {} {} {} {} {runs}\n",
        env!("CARGO_BIN_EXE_daxd"),
        ch.display(),
        kernel.display(),
        initramfs.display(),
        tools.display(),
    );
    let started = std::time::Instant::now();
    // QEMU logs why the test guest's CPUs were reset (a triple fault under its emulation
    // of nested SVM has been seen to end the test guest right after a restart).
    let mut vm = Vm::diskless();
    vm.extra = vec![
        "-d".into(),
        "cpu_reset,guest_errors".into(),
        "-D".into(),
        d.join("qemu-cpu-reset.log").display().to_string(),
    ];
    let run = boot(
        d,
        "ch-loop",
        &vm,
        &script,
        Duration::from_secs(120 + 240 * u64::from(runs)),
        &mut |_, _| {},
    );
    let mut passed = 0;
    let mut failed = Vec::new();
    for n in 1..=runs {
        let line = run.result(&format!("loop_{n}")).map(str::to_owned);
        eprintln!(
            "run {n}: {}",
            line.as_deref()
                .unwrap_or("no result (the test guest stopped)")
        );
        if line.as_deref() == Some("0 400 0") {
            passed += 1;
        } else {
            failed.push(n);
        }
    }
    eprintln!(
        "{runs} inner boots, {} SIGKILLs of daxd under them: {passed} passed, failed: {failed:?}; {:?}; console log {}",
        2 * runs,
        started.elapsed(),
        run.console_log.display()
    );
    assert!(
        failed.is_empty(),
        "console log: {}",
        run.console_log.display()
    );
    run.assert_passed(&["ch_restart_loop"], "");
}

/// Which stopped restart steps are the inner guest's CPU and run again: only one where
/// the inner kernel reported its timer stopped and no request of its disk was in flight
/// from the last progress on. The consoles are shaped like the stall seen in the restart
/// loop (boot 14 of its third session).
#[test]
fn an_inner_guest_stopped_on_its_disk_fails_and_only_one_whose_timer_stopped_runs_again() {
    let console = |exit: &str, rcu: bool, watch: &[&str]| {
        let mut c = format!("RESULT ch_exit_restart {exit}\r\n");
        c += "INNER restart: INNER-RESTART-READY\r\n";
        c += "INNER restart: INNER-WATCH inflight        1        0\r\n";
        c += "INNER restart: INNER-PROGRESS 300\r\n";
        for (i, counts) in watch.iter().enumerate() {
            c += &format!("INNER restart: INNER-WATCH inflight {counts}\r\n");
            if rcu && i == 0 {
                c += "INNER restart: [   52.448191] rcu: rcu_preempt kthread timer wakeup \
                      didn't happen for 5251 jiffies! g7745 f0x2 RCU_GP_WAIT_FQS(5)\r\n";
            }
        }
        c += "RESULT killed_after 1\n";
        c
    };
    let idle = ["       0        0"; 3];
    let stopped = inner_timer_stopped(&console("124", true, &idle));
    assert!(
        stopped
            .as_deref()
            .is_some_and(|why| why.starts_with("step restart:")),
        "{stopped:?}"
    );
    // A request still in flight during the stall: the guest waits on its disk.
    let waiting = [
        "       0        0",
        "       1        0",
        "       0        0",
    ];
    assert_eq!(inner_timer_stopped(&console("124", true, &waiting)), None);
    // No report from the inner kernel: nothing shows the CPU stopped.
    assert_eq!(inner_timer_stopped(&console("124", false, &idle)), None);
    // One sample is not enough to call the disk idle.
    assert_eq!(inner_timer_stopped(&console("124", true, &idle[..1])), None);
    // cloud-hypervisor ended by itself: not a stop at all.
    assert_eq!(inner_timer_stopped(&console("0", true, &idle)), None);

    // A test guest that finished with such a step gave no verdict and is run again; one
    // that finished with a step stopped on its disk gave one (a failure).
    let finished = |c: String| {
        let mut boot = crate::support::guest::parse_console(
            c + "DAXD-GUEST-DONE\n",
            std::path::PathBuf::from("console.log"),
        );
        boot.nested_cpu_stopped = inner_timer_stopped(&boot.console);
        boot
    };
    assert!(finished(console("124", true, &idle)).gave_no_verdict());
    assert!(!finished(console("124", true, &waiting)).gave_no_verdict());
}
