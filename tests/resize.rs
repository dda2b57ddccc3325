//! Online resize (`daxd resize`): the disk window grows inside its region while daxd
//! serves; a frontend sees the new capacity, writes land in the region at their offsets,
//! and what cannot be done (shrinking, growing past the region, a window that is pmem too)
//! is refused with a message saying what to do; and a running guest under QEMU that sees
//! the new capacity and grows its file system.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::support::guest::{boot, host_tool, sha256, Vm};
use crate::support::{daxd_inspect, file_bytes, pattern, test_dir, Backend, Client};

const M: u64 = 1 << 20;

fn resize(control: &Path, size: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_daxd"))
        .args(["resize", "--control-socket"])
        .arg(control)
        .arg(size)
        .output()
        .unwrap()
}

/// daxd on `d/region.img` with `args` and a control socket; returns it, the region's path
/// and the control socket's.
fn daxd_with_control(d: &Path, args: &[&str]) -> (Backend, PathBuf, PathBuf) {
    let region = d.join("region.img");
    let control = d.join("control.sock");
    let mut all = args.to_vec();
    all.extend(["--control-socket", control.to_str().unwrap()]);
    (Backend::start_daxd(d, &region, &all), region, control)
}

fn refused(control: &Path, size: &str) -> String {
    let out = resize(control, size);
    assert!(!out.status.success(), "resize to {size} was not refused");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn a_disk_grows_inside_its_region_while_served() {
    let dir = test_dir("daxd-resize-");
    let (daxd, region, control) = daxd_with_control(
        dir.path(),
        &["--size", "64M", "--window", "name=disk,size=16M,serve=blk"],
    );
    let mut client = Client::connect(&daxd.socket, 1, false).unwrap();
    assert_eq!(client.capacity, 16 * M);
    assert!(
        client.q().write(20 * M, &pattern(1, 4096)).is_err(),
        "past the end before"
    );

    // Grown while this client is connected (blkio sets up no backend channel, so nobody is
    // told); the next connection sees the new size.
    let out = resize(&control, "32M");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("disk window disk: 33554432 bytes (was 16777216)"),
        "{stdout}"
    );
    drop(client);
    let mut client = Client::connect(&daxd.socket, 1, false).unwrap();
    assert_eq!(client.capacity, 32 * M);
    let data = pattern(2, 64 << 10);
    client.q().write(20 * M, &data).unwrap();
    client.q().flush().unwrap();
    assert_eq!(file_bytes(&region, 20 * M, data.len()), data);
    let inspection = daxd_inspect(&control, &["--json"]);
    assert!(
        inspection.contains(r#"{"name":"disk","offset":0,"size":33554432,"serve":"blk"}"#),
        "{inspection}"
    );

    // What cannot be done changes nothing and says what to do.
    assert!(refused(&control, "16M").contains("only grows"));
    assert!(refused(&control, "128M").contains("start daxd with a larger --size"));
    assert!(refused(&control, "40001K").contains("multiples of 4 KiB"));
    let same = resize(&control, "32M");
    assert!(same.status.success());
    assert!(String::from_utf8_lossy(&same.stdout).contains("unchanged"));
    drop(client);
    let client = Client::connect(&daxd.socket, 1, false).unwrap();
    assert_eq!(client.capacity, 32 * M);
    drop(client);
    assert!(daxd.terminate().success());
    assert_eq!(std::fs::metadata(&region).unwrap().len(), 64 * M);
}

#[test]
fn a_disk_that_is_the_whole_region_or_pmem_too_does_not_grow() {
    let dir = test_dir("daxd-resize-");
    let (daxd, _, control) = daxd_with_control(dir.path(), &["--size", "16M"]);
    let message = refused(&control, "32M");
    assert!(
        message.contains("--window name=disk,size=16777216,serve=blk"),
        "{message}"
    );
    assert!(daxd.terminate().success());

    let (daxd, _, control) =
        daxd_with_control(dir.path(), &["--window", "name=both,size=8M,serve=both"]);
    assert!(refused(&control, "10M").contains("served as pmem too"));
    assert!(daxd.terminate().success());
}

/// A running guest (QEMU 10) sees its disk grow: daxd tells QEMU, QEMU interrupts the
/// guest, which then grows its mounted ext4 online and writes more than the old disk held.
#[test]
#[ignore = "needs QEMU and the test guest; run by ci/test.sh"]
fn a_running_guest_sees_its_disk_grow_and_grows_its_file_system() {
    let dir = test_dir("daxd-resize-guest-");
    let d = dir.path();
    let (daxd, region, control) = daxd_with_control(
        d,
        &["--size", "256M", "--window", "name=disk,size=64M,serve=blk"],
    );
    let mut told = String::new();
    let run = boot(
        d,
        "resize",
        &Vm::blk(&daxd.socket, 1),
        "run_case resize case_resize_online 262144 80\n",
        Duration::from_secs(300),
        &mut |step, _| {
            assert_eq!(step, "resize");
            let out = resize(&control, "128M");
            told = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "{told}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        },
    );
    run.assert_passed(&["resize"], "");
    let report = format!("console log: {}", run.console_log.display());
    assert!(
        told.contains("the frontend acknowledged the change"),
        "QEMU was not told: {told}"
    );
    assert_eq!(run.result("sectors_before"), Some("131072"), "{report}");
    assert_eq!(run.result("sectors_after"), Some("262144"), "{report}");
    let fs_kib: u64 = run.result("fs_kib").unwrap().parse().unwrap();
    assert!(
        fs_kib > 100 << 10,
        "the file system did not grow: {fs_kib} KiB; {report}"
    );
    assert!(daxd.terminate().success());
    // The file that did not fit the old disk, in the region, in a clean file system.
    let (ok, _, err) = host_tool("e2fsck", &["-fn", region.to_str().unwrap()]);
    assert!(ok, "e2fsck: {err}");
    let (ok, big, err) = host_tool("debugfs", &["-R", "cat /big", region.to_str().unwrap()]);
    assert!(ok, "debugfs: {err}");
    assert_eq!(big.len(), 80 << 20);
    assert_eq!(
        run.result("big_sha"),
        Some(sha256(&big).as_str()),
        "{report}"
    );
}
