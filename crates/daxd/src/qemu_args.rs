//! `daxd print-qemu-args`: the QEMU options for a daxd configuration, with the window
//! offsets filled in so nobody computes them by hand.

use std::fmt::Write as _;
use std::path::Path;

use daxd_region::{Layout, PMEM_ALIGN};

use crate::config::Config;

const GIB: u64 = 1 << 30;

/// The QEMU options for `args`' disk and pmem windows, for a guest with `ram` bytes of RAM.
pub fn qemu_args(config: &Config, layout: &Layout, region_path: &Path, ram: u64) -> String {
    let mut out = String::new();
    let pmem_total: u64 = layout.pmem().map(|w| w.size).sum();
    let slots = layout.pmem().count() + 1;
    let maxmem = (ram + pmem_total).div_ceil(GIB).max(1) * GIB;
    let _ = writeln!(
        out,
        "# Guest RAM must be shared with daxd (vhost-user); pmem windows need hotplug slots."
    );
    let _ = writeln!(
        out,
        "-m {ram_m}M,slots={slots},maxmem={max_m}M -object memory-backend-memfd,id=mem,size={ram_m}M,share=on -numa node,memdev=mem",
        ram_m = ram >> 20,
        max_m = maxmem >> 20,
    );
    if let Some(disk) = layout.blk() {
        let socket = socket_text(&config.socket);
        let _ = writeln!(
            out,
            "# disk: window {} (region bytes {:#x}+{:#x}), served on {socket}",
            disk.name, disk.offset, disk.size
        );
        let _ = writeln!(
            out,
            "-chardev socket,id=daxd-{name},path={socket} -device vhost-user-blk-pci,chardev=daxd-{name},num-queues={q}",
            name = disk.name,
            q = config.num_queues
        );
    }
    for w in layout.pmem() {
        debug_assert_eq!(w.offset % PMEM_ALIGN, 0);
        let _ = writeln!(
            out,
            "# pmem window {} (region bytes {:#x}+{:#x}), mapped by QEMU from the region file \
             (daxd finds it in its vhost-user memory table and tracks its pages):",
            w.name, w.offset, w.size
        );
        let _ = writeln!(
            out,
            "-object memory-backend-file,id={name},share=on,mem-path={path},offset={offset},size={size} -device virtio-pmem-pci,memdev={name},id=pmem-{name}",
            name = w.name,
            path = region_path.display(),
            offset = w.offset,
            size = w.size
        );
        let _ = writeln!(
            out,
            "#   or as an NVDIMM (add nvdimm=on to -machine): -device nvdimm,memdev={name},id=nvdimm-{name}",
            name = w.name
        );
    }
    let _ = writeln!(
        out,
        "# Live migration to another QEMU on this host: start it with the same options and \
         -incoming defer; it connects to the same daxd socket while the source still runs \
         (daxd serves both through its one mapping of the region)."
    );
    if layout.pmem().next().is_some() {
        let _ = writeln!(
            out,
            "#   Both QEMUs map the pmem windows from the region file, so their pages must not be \
             copied (QEMU would write old copies into the file under the running source): on \
             both QEMUs, before migrate-incoming and migrate, QMP \
             {{\"execute\": \"migrate-set-capabilities\", \"arguments\": {{\"capabilities\": \
             [{{\"capability\": \"x-ignore-shared\", \"state\": true}}]}}}}. \
             Guest RAM stays a memfd (not a named file), which is still copied. The guest does \
             nothing."
        );
    }
    if let (Some(socket), Some(w)) = (&config.pmem_socket, config.pmem_window(layout).ok()) {
        let _ = writeln!(
            out,
            "# QEMU >= 11.1 instead: daxd serves window {} as virtio-pmem and maps it into the \
             device's shared memory itself (no memory-backend-file, no hotplug slot needed):",
            w.name
        );
        let _ = writeln!(
            out,
            "-chardev socket,id=daxd-pmem-{name},path={socket} -device vhost-user-test-device-pci,chardev=daxd-pmem-{name},virtio-id=27,num_vqs=1,config_size=16",
            name = w.name,
            socket = socket_text(socket)
        );
        let _ = writeln!(
            out,
            "#   QEMU does not migrate a VM with this device (it marks vhost-user-test-device \
             non-migratable); use the memory-backend-file window above for a VM that moves."
        );
    }
    out
}

/// A socket's path for QEMU's -chardev; an inherited socket's path is the caller's to fill.
fn socket_text(socket: &daxd_vhost_user::SocketAddr) -> String {
    match socket {
        daxd_vhost_user::SocketAddr::Path(path) => path.display().to_string(),
        daxd_vhost_user::SocketAddr::Fd(_) => "SOCKET".to_owned(),
    }
}
