//! Crash states of ext4 on daxd's disk under a real guest (Linux 6.12 under QEMU 10.0,
//! TCG): the guest creates, appends to, renames and removes files and fsyncs one file a
//! round while daxd records; `daxd crash-states` then checks every FLUSH point and
//! samples between them with e2fsck (the journal recovered first, as a mount would) and
//! reads back, with debugfs, every file fsync'd before the state's FLUSH point. A second
//! run loses the writes to the inode table (a drop rule), and the same command must
//! report a failing state.

use std::path::Path;
use std::time::Duration;

use crate::support::guest::{boot, print_qemu_args, printed_line, results, sid_qemu, Vm};
use crate::support::{daxd_command, daxd_fault as fault, test_dir, Backend};

const BOOT_TIMEOUT: Duration = Duration::from_secs(500);

/// What keep-N holds (as crash-cases.sh's keep_content writes it).
fn keep_content(n: u32) -> String {
    (0..600)
        .map(|i| format!("keep {n} line {i:04}\n"))
        .collect()
}

/// Which run: ext4 on the disk (QEMU 10), or ext4 with DAX on a pmem window whose
/// virtio-pmem FLUSH daxd serves (QEMU 11.1, the window in vhost-user shared memory).
#[derive(Clone, Copy, PartialEq, Eq)]
enum On {
    Disk,
    Dax,
    /// ext4 with DAX on a window QEMU 10 maps from the region file as virtio-pmem and
    /// flushes itself.
    MappedDax,
}

/// The checker: for states from the made file system on (mark fs-made), what a boot's
/// fsck does (`e2fsck -fp`: the journal recovered, what is safe to fix unattended fixed,
/// anything else a failure), then a full check that changes nothing, then each file the
/// state's marks say was fsync'd read back whole. Not `e2fsck -n` alone: with the orphan
/// file (e2fsprogs 1.47 makes one on file systems of 128 MiB and more) every state of a
/// mounted file system has `orphan_present` set and a clean orphan file, which `-n`
/// reports as an error and a boot's fsck fixes without a word.
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
# What a boot's fsck does: recover the journal, fix what is safe to fix unattended
# (status 4 and up: it found what it may not fix), then check that nothing is left.
e2fsck -fp "$img" > "$img.fsck" 2>&1
[ $? -lt 4 ] || {{ cat "$img.fsck"; exit 1; }}
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
fn recorded_run(dir: &Path, on: On, rounds: u32, drop_inode_table: bool) -> std::path::PathBuf {
    let control = dir.join("control.sock");
    let rec = dir.join("rec");
    let region = dir.join("region.img");
    let pmem_socket = dir.join("pmem.sock");
    let mut args: Vec<String> = ["--size", "64M"].map(String::from).to_vec();
    if on != On::Disk {
        args = [
            "--size",
            "192M",
            "--window",
            "name=disk,size=64M,serve=blk",
            "--window",
            "name=pm0,offset=64M,size=128M,serve=pmem",
        ]
        .map(String::from)
        .to_vec();
    }
    if on == On::Dax {
        args.extend([
            "--pmem-socket-path".into(),
            pmem_socket.display().to_string(),
        ]);
    }
    let mut serve: Vec<&str> = args.iter().map(String::as_str).collect();
    serve.extend([
        "--control-socket",
        control.to_str().unwrap(),
        "--record",
        rec.to_str().unwrap(),
    ]);
    let daxd = Backend::start_daxd(dir, &region, &serve);
    let vm = match on {
        On::Disk => Vm::blk(&daxd.socket, 1),
        On::Dax | On::MappedDax => {
            let mut print = vec![
                "--region".to_owned(),
                region.display().to_string(),
                "--socket-path".to_owned(),
                daxd.socket.display().to_string(),
            ];
            print.extend(args.iter().cloned());
            let printed = print_qemu_args(&print);
            let line = |prefix: &str| printed_line(&printed, prefix);
            let (extra, qemu) = match on {
                On::Dax => (line("-chardev socket,id=daxd-pmem-"), sid_qemu(dir)),
                _ => (
                    line("-object memory-backend-file"),
                    vec!["qemu-system-x86_64".into()],
                ),
            };
            Vm {
                memory: line("-m ").split_whitespace().nth(1).unwrap().to_owned(),
                extra: extra.split_whitespace().map(String::from).collect(),
                qemu,
                ..Vm::blk(&daxd.socket, 1)
            }
        }
    };
    let case = match on {
        On::Disk => "crash_workload case_crash_workload",
        On::Dax | On::MappedDax => "dax_crash_workload case_dax_crash_workload",
    };
    let run = boot(
        dir,
        "crash",
        &vm,
        &format!("run_case {case} {rounds}\n"),
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
    run.assert_passed(&[case.split(' ').next().unwrap()], "");
    assert!(daxd.terminate().success(), "daxd did not stop cleanly");
    rec
}

/// `daxd crash-states` on the recording `rec` with the checker of `rounds` rounds and
/// `options` (device, samples, bounds); prints its summary line.
fn crash_states(d: &Path, rec: &Path, rounds: u32, options: &[&str]) -> (bool, String, String) {
    let check = checker(d, rounds);
    let mut args = vec!["crash-states", "--record", rec.to_str().unwrap()];
    args.extend_from_slice(options);
    args.extend(["--check", &check]);
    let (ok, out, err) = daxd_command(&args);
    eprintln!(
        "crash-states {options:?}: {}",
        out.lines().last().unwrap_or_default()
    );
    (ok, out, err)
}

/// The marks reached the states: a state after the last round read back every keep file.
fn assert_every_keep_file_checked(out: &str, rounds: u32) {
    assert!(
        out.lines()
            .any(|l| l.contains(&format!("marks up to fsynced-{rounds}")) && l.ends_with(": ok")),
        "no state was checked against all fsync'd files:\n{out}"
    );
}

#[test]
#[ignore = "needs QEMU and the test guest; run by ci/test.sh"]
fn every_crash_state_of_ext4_is_clean_and_keeps_what_was_fsynced() {
    let dir = test_dir("daxd-guest-crash-");
    let d = dir.path();
    let rounds = 20;
    let rec = recorded_run(d, On::Disk, rounds, false);
    let (ok, out, err) = crash_states(d, &rec, rounds, &["--samples", "6", "--max-states", "400"]);
    assert!(ok, "a crash state of a sound run failed:\n{out}\n{err}");
    let summary = out.lines().last().unwrap_or_default();
    let states: u64 = summary.split(' ').next().unwrap().parse().unwrap();
    assert!(states >= 200, "only {states} states: {summary}");
    assert_every_keep_file_checked(&out, rounds);
}

#[test]
#[ignore = "needs QEMU and the test guest; run by ci/test.sh"]
fn lost_inode_table_writes_show_as_a_failing_crash_state() {
    let dir = test_dir("daxd-guest-crash-drop-");
    let d = dir.path();
    let rounds = 5;
    let rec = recorded_run(d, On::Disk, rounds, true);
    let (ok, out, err) = crash_states(d, &rec, rounds, &["--samples", "2"]);
    assert!(!ok, "the lost writes went unnoticed:\n{out}");
    assert!(out.contains("FAILED"), "{out}");
    assert!(
        err.contains("--state"),
        "no way to make the failing state again: {err}"
    );
}

/// The same workload on ext4 with DAX on a pmem window (QEMU 11.1): daxd records the
/// window's pages at each virtio-pmem FLUSH it serves; every FLUSH point and every sample
/// of the pages changed between two must be clean and hold what was fsync'd.
#[test]
#[ignore = "needs QEMU 11.1 (ci/build-sid-root.sh) and the test guest; run by ci/test.sh"]
fn every_crash_state_of_ext4_on_dax_is_clean_and_keeps_what_was_fsynced() {
    let dir = test_dir("daxd-guest-crash-dax-");
    let d = dir.path();
    let rounds = 10;
    let rec = recorded_run(d, On::Dax, rounds, false);
    let (ok, out, err) = crash_states(d, &rec, rounds, &["--device", "pm0", "--samples", "6"]);
    assert!(ok, "a crash state of a DAX run failed:\n{out}\n{err}");
    assert_every_keep_file_checked(&out, rounds);
    assert!(
        out.lines()
            .any(|l| l.contains("sample") && !l.contains(" 0 of ")),
        "no sample changed any page:\n{out}"
    );
}

/// The same on a window QEMU 10 maps from the region file (virtio-pmem-pci over
/// memory-backend-file), whose FLUSH QEMU serves without telling daxd: daxd records the
/// window at each mark instead, which the host sets after the guest's fsync returned.
#[test]
#[ignore = "needs QEMU and the test guest; run by ci/test.sh"]
fn crash_states_of_ext4_on_dax_qemu_maps_itself_come_at_marks() {
    let dir = test_dir("daxd-guest-crash-mapped-");
    let d = dir.path();
    let rounds = 10;
    let rec = recorded_run(d, On::MappedDax, rounds, false);
    let (ok, out, err) = crash_states(d, &rec, rounds, &["--device", "pm0", "--samples", "6"]);
    assert!(ok, "a crash state of a DAX run failed:\n{out}\n{err}");
    // A FLUSH point at each mark (fs-made and one per round), and no samples: QEMU's
    // FLUSHes between two marks ordered what the guest wrote, and daxd did not see them.
    let points = out.lines().filter(|l| l.contains("(FLUSH point ")).count();
    assert_eq!(points, rounds as usize + 1, "FLUSH points:\n{out}");
    assert!(!out.contains("(sample "), "samples between marks:\n{out}");
    assert_every_keep_file_checked(&out, rounds);
}
