//! `daxd print-qemu-args`: the QEMU options for a daxd configuration, with the window
//! offsets filled in so nobody computes them by hand.

use std::fmt::Write as _;
use std::path::Path;

use daxd_region::{Layout, RegionKind, PMEM_ALIGN};

use crate::config::Config;

const GIB: u64 = 1 << 30;

/// The QEMU options for `args`' disk and pmem windows of a region of `kind`, for a guest
/// with `ram` bytes of RAM.
pub fn qemu_args(
    config: &Config,
    layout: &Layout,
    region_path: &Path,
    kind: RegionKind,
    ram: u64,
) -> String {
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
        let backend = format!(
            "-object memory-backend-file,id={name},share=on,mem-path={path},offset={offset},size={size}",
            name = w.name,
            path = region_path.display(),
            offset = w.offset,
            size = w.size
        );
        if let RegionKind::DeviceDax(dax) = kind {
            // Persistent memory itself: the guest gets it as an NVDIMM and writes its cache
            // lines back itself (virtio-pmem's FLUSH would be QEMU's fsync, which a
            // device-DAX device does not have). QEMU must map it in the device's pages.
            let _ = writeln!(
                out,
                "#   (add nvdimm=on to -machine; the guest makes its own stores durable, as on \
                 a host NVDIMM)"
            );
            let _ = writeln!(
                out,
                "{backend},align={align},pmem=on -device nvdimm,memdev={name},id=nvdimm-{name}",
                align = dax.align,
                name = w.name
            );
            continue;
        }
        let _ = writeln!(
            out,
            "{backend} -device virtio-pmem-pci,memdev={name},id=pmem-{name}",
            name = w.name,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Cli, Command};
    use clap::Parser;
    use daxd_region::DeviceDax;

    fn printed(kind: RegionKind) -> String {
        let cli = Cli::try_parse_from([
            "daxd",
            "print-qemu-args",
            "--region",
            "/dev/dax0.0",
            "--socket-path",
            "/run/daxd.sock",
            "--window",
            "name=pm0,offset=0,size=32M,serve=pmem",
            "--window",
            "name=disk,offset=32M,size=32M,serve=blk",
        ])
        .unwrap();
        let Some(Command::PrintQemuArgs(print)) = cli.command else {
            panic!("not print-qemu-args")
        };
        let config = Config::try_from(print.serve).unwrap();
        let layout = config.layout(64 << 20).unwrap();
        qemu_args(&config, &layout, Path::new("/dev/dax0.0"), kind, 1 << 30)
    }

    #[test]
    fn a_device_dax_window_is_an_nvdimm_mapped_in_the_devices_pages() {
        let dax = printed(RegionKind::DeviceDax(DeviceDax {
            size: 64 << 20,
            align: 2 << 20,
        }));
        assert!(
            dax.contains(
                "-object memory-backend-file,id=pm0,share=on,mem-path=/dev/dax0.0,offset=0,\
                 size=33554432,align=2097152,pmem=on -device nvdimm,memdev=pm0,id=nvdimm-pm0"
            ),
            "{dax}"
        );
        assert!(!dax.contains("virtio-pmem-pci"), "{dax}");
        let file = printed(RegionKind::File);
        assert!(!file.contains("pmem=on"), "{file}");
        assert!(
            file.contains("size=33554432 -device virtio-pmem-pci,memdev=pm0"),
            "{file}"
        );
    }
}
