//! Crash states of ext4 on daxd's disk under a real guest (Linux 6.12 under QEMU 10.0,
//! TCG): the guest creates, appends to, renames and removes files and fsyncs one file a
//! round while daxd records; `daxd crash-states` then checks every FLUSH point and
//! samples between them with e2fsck (the journal recovered first, as a mount would) and
//! reads back, with debugfs, every file fsync'd before the state's FLUSH point. A second
//! run loses the writes to the inode table (a drop rule), and the same command must
//! report a failing state.

use std::path::Path;
use std::time::Duration;

use crate::support::guest::{boot, results, Vm};
use crate::support::{daxd_command, daxd_fault as fault, test_dir, Backend};

const BOOT_TIMEOUT: Duration = Duration::from_secs(500);

/// What keep-N holds (as crash-cases.sh's keep_content writes it).
fn keep_content(n: u32) -> String {
    (0..600)
        .map(|i| format!("keep {n} line {i:04}\n"))
        .collect()
}

/// The checker: for states from the made file system on (mark fs-made), the journal
/// recovered as a mount would, then a full check that changes nothing, then each file the
/// state's marks say was fsync'd read back whole.
fn checker(dir: &Path, rounds: u32) -> String {
    let expected = dir.join("expected");
    std::fs::create_dir_all(&expected).unwrap();
    for n in 1..=rounds {
        std::fs::write(expected.join(format!("keep-{n}")), keep_content(n)).unwrap();
    }
    let script = dir.join("check.sh");
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/sh
PATH=$PATH:/usr/sbin:/sbin
img=$1
# Before mkfs.ext4 finished (its last FLUSH precedes mark fs-made) there is no file
# system to check.
case "$DAXD_MARKS" in *fs-made*) ;; *) exit 0 ;; esac
e2fsck -p -E journal_only "$img" > /dev/null 2>&1
e2fsck -fn "$img" > "$img.fsck" 2>&1 || {{ cat "$img.fsck"; exit 1; }}
for mark in $DAXD_MARKS; do
    n=${{mark#fsynced-}}
    [ "$n" = "$mark" ] && continue
    debugfs -R "cat /keep-$n" "$img" > "$img.keep" 2> /dev/null
    cmp -s "$img.keep" "{expected}/keep-$n" || {{ echo "keep-$n is not whole in a state after mark $mark"; exit 1; }}
done
"#,
            expected = expected.display()
        ),
    )
    .unwrap();
    format!("sh {} {{}}", script.display())
}

/// Runs the workload for `rounds` rounds with a recording (and, with `drop_inode_table`,
/// a rule that loses every write to the inode table once the file system is made);
/// returns the recording's directory.
fn recorded_run(dir: &Path, rounds: u32, drop_inode_table: bool) -> std::path::PathBuf {
    let control = dir.join("control.sock");
    let rec = dir.join("rec");
    let daxd = Backend::start_daxd(
        dir,
        &dir.join("region.img"),
        &[
            "--size",
            "64M",
            "--control-socket",
            control.to_str().unwrap(),
            "--record",
            rec.to_str().unwrap(),
        ],
    );
    let run = boot(
        dir,
        "crash",
        &Vm::blk(&daxd.socket, 1),
        &format!("run_case crash_workload case_crash_workload {rounds}\n"),
        BOOT_TIMEOUT,
        &mut |step, console| {
            if step == "fs-made" && drop_inode_table {
                let sectors = results(console)
                    .get("inode_table_sectors")
                    .cloned()
                    .expect("the guest printed no inode_table_sectors");
                fault(
                    &control,
                    &["add", &format!("op=write,sectors={sectors},action=drop")],
                );
            }
            let (ok, _, err) =
                daxd_command(&["mark", "--control-socket", control.to_str().unwrap(), step]);
            assert!(ok, "daxd mark {step}: {err}");
        },
    );
    run.assert_passed(&["crash_workload"], "");
    assert!(daxd.terminate().success(), "daxd did not stop cleanly");
    rec
}

#[test]
#[ignore = "needs QEMU and the test guest; run by ci/test.sh"]
fn every_crash_state_of_ext4_is_clean_and_keeps_what_was_fsynced() {
    let dir = test_dir("daxd-guest-crash-");
    let d = dir.path();
    let rounds = 20;
    let rec = recorded_run(d, rounds, false);
    let check = checker(d, rounds);
    let (ok, out, err) = daxd_command(&[
        "crash-states",
        "--record",
        rec.to_str().unwrap(),
        "--samples",
        "6",
        "--max-states",
        "400",
        "--check",
        &check,
    ]);
    let summary = out.lines().last().unwrap_or_default().to_owned();
    eprintln!("crash-states: {summary}");
    assert!(ok, "a crash state of a sound run failed:\n{out}\n{err}");
    let states: u64 = summary.split(' ').next().unwrap().parse().unwrap();
    assert!(states >= 200, "only {states} states: {summary}");
    // The marks reached the states: the last FLUSH points read back every keep file.
    assert!(
        out.lines()
            .any(|l| l.contains(&format!("marks up to fsynced-{rounds}")) && l.ends_with(": ok")),
        "no state was checked against all fsync'd files:\n{out}"
    );
}

#[test]
#[ignore = "needs QEMU and the test guest; run by ci/test.sh"]
fn lost_inode_table_writes_show_as_a_failing_crash_state() {
    let dir = test_dir("daxd-guest-crash-drop-");
    let d = dir.path();
    let rounds = 5;
    let rec = recorded_run(d, rounds, true);
    let (ok, out, err) = daxd_command(&[
        "crash-states",
        "--record",
        rec.to_str().unwrap(),
        "--samples",
        "2",
        "--check",
        &checker(d, rounds),
    ]);
    assert!(!ok, "the lost writes went unnoticed:\n{out}");
    assert!(out.contains("FAILED"), "{out}");
    assert!(
        err.contains("--state"),
        "no way to make the failing state again: {err}"
    );
}
