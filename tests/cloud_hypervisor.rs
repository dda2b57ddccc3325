//! cloud-hypervisor against daxd: a KVM guest booted by cloud-hypervisor inside the test
//! guest (QEMU, TCG, `-cpu max`, whose emulated SVM with nested paging lets kvm_amd load),
//! with daxd, in the same test guest, serving its vhost-user-blk disk with 2 queues. The
//! inner guest reports the disk's size, queues and serial and writes marker blocks with an
//! fsync; the test checks them in daxd's region file, and daxd's clean exit on SIGTERM.
//! cloud-hypervisor is built by ci/build-cloud-hypervisor.sh.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::guest::{boot, guest_image, repo_root, Vm};
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

/// The test guest's initramfs with resources/guest/inner-init as its /init (a second
/// archive appended: the kernel unpacks both, the later file wins).
fn inner_initramfs(dir: &Path) -> PathBuf {
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

#[test]
#[ignore = "needs QEMU, the test guest and cloud-hypervisor; run by ci/test.sh"]
fn a_cloud_hypervisor_guest_uses_daxd_as_its_disk() {
    let ch = cloud_hypervisor();
    let dir = test_dir("daxd-ch-");
    let d = dir.path();
    let (kernel, _) = guest_image();
    let initramfs = inner_initramfs(d);
    let daxd = env!("CARGO_BIN_EXE_daxd");
    let run = boot(
        d,
        "ch",
        &Vm::diskless(),
        &format!(
            "run_case cloud_hypervisor case_cloud_hypervisor {daxd} {} {} {}\n",
            ch.display(),
            kernel.display(),
            initramfs.display()
        ),
        Duration::from_secs(400),
        &mut |_, _| {},
    );
    run.assert_passed(&["cloud_hypervisor"], "");
    // What the inner guest printed, through cloud-hypervisor's serial console.
    let inner = |key: &str| {
        run.console
            .lines()
            .filter_map(|l| {
                l.trim_end_matches('\r')
                    .strip_prefix("INNER: INNER-RESULT ")
            })
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
            .map(str::to_owned)
    };
    let report = format!("console log: {}", run.console_log.display());
    assert_eq!(run.result("kvm_amd_nested"), Some("1"), "{report}");
    assert_eq!(run.result("ch_exit"), Some("0"), "{report}");
    assert_eq!(inner("sectors").as_deref(), Some("131072"), "{report}");
    assert_eq!(inner("queues").as_deref(), Some("2"), "{report}");
    assert_eq!(inner("serial").as_deref(), Some("ch-inner"), "{report}");
    assert_eq!(inner("write_failed"), None, "{report}");
    for block in [0, 256, 16383] {
        assert_eq!(
            run.result(&format!("block_{block}")),
            Some(format!("daxd-under-cloud-hypervisor_block_{block}").as_str()),
            "block {block} is not in the region; {report}"
        );
    }
    assert_eq!(run.result("daxd_exit"), Some("0"), "{report}");
    let inner_lines: Vec<&str> = run
        .console
        .lines()
        .filter(|l| l.starts_with("INNER: "))
        .collect();
    eprintln!(
        "cloud-hypervisor's guest on daxd: {} of its console lines:\n{}",
        inner_lines.len(),
        inner_lines.join("\n")
    );
}
