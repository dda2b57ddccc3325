//! daxd as the disk of a libvirt domain: Debian's libvirt (11.3, bookworm-backports) runs
//! a TCG guest whose disk is `<disk type='vhostuser'>` on daxd's socket, with memfd-backed
//! shared memory and reconnection, exactly the XML the README shows. The guest checks the
//! disk's size, queues and serial and writes O_DIRECT patterns that the host then finds in
//! the region file; the domain ends with the guest's own clean power-off.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::guest::{guest_image, guest_script, parse_console, repo_root};
use crate::support::{pattern, test_dir, Backend};

const URI: &str = "qemu:///system";
const REGION_SIZE: u64 = 64 << 20;
const OFFSETS: [u64; 3] = [0, 3 << 20, 63 << 20];

fn virsh(args: &[&str]) -> (bool, String) {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .output()
        .expect("virsh (ci/install-deps.sh installs libvirt-clients)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Starts virtlogd and libvirtd (no systemd here) unless a libvirt daemon answers.
fn ensure_libvirtd() {
    if virsh(&["version"]).0 {
        return;
    }
    for daemon in ["virtlogd", "libvirtd"] {
        let status = Command::new(daemon).arg("--daemon").status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "cannot start {daemon} (ci/install-deps.sh installs libvirt-daemon)"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !virsh(&["version"]).0 {
        assert!(
            Instant::now() < deadline,
            "libvirtd does not answer on {URI}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The domain XML of README "Use with libvirt", filled in.
fn domain_xml(name: &str, socket: &Path, script: &Path, console: &Path) -> String {
    let (kernel, initrd) = guest_image();
    let template = std::fs::read_to_string(repo_root().join("resources/libvirt/daxd-guest.xml"))
        .expect("resources/libvirt/daxd-guest.xml");
    template
        .replace("@NAME@", name)
        .replace("@SOCKET@", &socket.display().to_string())
        .replace("@KERNEL@", &kernel.display().to_string())
        .replace("@INITRD@", &initrd.display().to_string())
        .replace("@SCRIPT@", &script.display().to_string())
        .replace("@CONSOLE@", &console.display().to_string())
}

#[test]
#[ignore = "needs libvirt, QEMU and the test guest; run by ci/test.sh"]
fn a_libvirt_domain_uses_daxd_as_its_disk() {
    ensure_libvirtd();
    let dir = test_dir("daxd-libvirt-");
    let d = dir.path();
    // QEMU runs as libvirt-qemu: it must reach the socket, the script and the payload.
    std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let region = d.join("region.img");
    let serial = "daxd-libvirt";
    let daxd = Backend::start_daxd(
        d,
        &region,
        &["--size", "64M", "--num-queues", "2", "--serial", serial],
    );
    // Who may connect is the socket's permission, as for any vhost-user backend: here
    // the user libvirt runs QEMU as.
    let chown = Command::new("chown")
        .arg("libvirt-qemu")
        .arg(&daxd.socket)
        .status()
        .unwrap();
    assert!(chown.success());
    let payload = d.join("payload.bin");
    std::fs::write(&payload, pattern(11, 65536)).unwrap();
    std::fs::set_permissions(
        &payload,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let offsets = OFFSETS.map(|o| o.to_string()).join(" ");
    let script = guest_script(
        d,
        "libvirt",
        &format!(
            "run_case identity case_identity {} 2 {serial} 0\n\
             run_case direct_io case_direct_io {} {offsets}\n",
            REGION_SIZE / 512,
            payload.display()
        ),
    );
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let console = d.join("libvirt.console.log");
    let name = format!("daxd-test-{}", std::process::id());
    let xml = d.join("domain.xml");
    std::fs::write(&xml, domain_xml(&name, &daxd.socket, &script, &console)).unwrap();

    let (ok, out) = virsh(&["define", xml.to_str().unwrap()]);
    assert!(ok, "virsh define: {out}");
    let (started, out) = virsh(&["start", &name]);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut state = String::new();
    while started && Instant::now() < deadline {
        state = virsh(&["domstate", &name, "--reason"]).1;
        if state.contains("shut off") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    if !state.contains("shut off") {
        virsh(&["destroy", &name]);
    }
    virsh(&["undefine", &name]);
    assert!(started, "virsh start: {out}");
    assert!(
        state.contains("shut off (shutdown)"),
        "the domain did not shut down cleanly: {state}"
    );

    let boot = parse_console(
        std::fs::read_to_string(&console).unwrap_or_default(),
        console.clone(),
    );
    boot.assert_passed(&["identity", "direct_io"], "");
    assert!(daxd.terminate().success());
    let bytes = std::fs::read(&region).unwrap();
    for offset in OFFSETS {
        let at = offset as usize;
        assert!(
            bytes[at..at + 65536] == pattern(11, 65536)[..],
            "the guest's data is not in the region at {offset}"
        );
    }
}
