//! Regions on persistent memory, on a real DAX stack: the test guest (QEMU, TCG) has two
//! emulated NVDIMMs, which it turns into what a host with persistent memory has, as
//! `ndctl create-namespace` would: ext4 mounted `-o dax` on an fsdax namespace, with the
//! region file on it served with `--direct` (MAP_SYNC), and a device-DAX device
//! (`--region /dev/dax1.0`). daxd runs in the test guest under `--seccomp trap`; the
//! power-cut suite's client writes, discards and FLUSHes through it, and after daxd was
//! stopped and started again reads every block back against what daxd acknowledged
//! (resources/guest/dax-cases.sh).
//!
//! What is checked besides the data: `daxd inspect` shows the kind, MAP_SYNC and the cache
//! write-back the FLUSHes use; on device-DAX the FLUSHes wrote back exactly the pages the
//! requests since each previous FLUSH stored into (computed here from the client's plan),
//! and no fdatasync; under `--seccomp trap` with the device-DAX lists, which allow no
//! pread, pwrite, fallocate, lseek or fdatasync, daxd served it all and exited 0.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use daxd_bench::cut::{Plan, BLOCK};

use crate::support::guest::{
    boot, boot_for_a_verdict, guest_image, inner_initramfs, sid_root, tools_disk, Vm,
};
use crate::support::test_dir;

/// Bytes of each emulated NVDIMM.
const NVDIMM_SIZE: u64 = 256 << 20;
/// The client's requests per run, and a FLUSH after every this many (see dax-cases.sh).
const OPS: u64 = 400;
const FLUSH_EVERY: u64 = 8;
const DISCARD_EVERY: u64 = 10;

/// Bytes a FLUSH after every [`FLUSH_EVERY`] requests of the client's plan must write back
/// when every request stores into its block through the mapping: the distinct blocks of
/// each run of requests between two FLUSHes.
fn stored_between_flushes(seed: u64, blocks: u64) -> u64 {
    let plan: Vec<_> = Plan::new(seed, 1, blocks, DISCARD_EVERY)
        .take(OPS as usize)
        .collect();
    plan.chunks(FLUSH_EVERY as usize)
        .map(|run| run.iter().map(|r| r.block).collect::<BTreeSet<_>>().len() as u64)
        .sum::<u64>()
        * BLOCK as u64
}

/// A field of a `daxd inspect --json` line the guest printed.
fn inspected(line: Option<&String>, pointer: &str) -> serde_json::Value {
    let line = line.unwrap_or_else(|| panic!("no inspection line for {pointer}"));
    let json: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    json.pointer(pointer)
        .unwrap_or_else(|| panic!("no {pointer} in {line}"))
        .clone()
}

#[test]
#[ignore = "needs QEMU and the test guest image (ci/build-guest.sh); run by ci/test.sh"]
fn regions_on_a_dax_file_system_and_a_device_dax_device_keep_every_flushed_write() {
    let dir = test_dir("daxd-dax-host-");
    let d = dir.path();
    let daxd = env!("CARGO_BIN_EXE_daxd");
    let client = Path::new(daxd).with_file_name("daxd-cut-client");
    let mut extra = Vec::new();
    let backings: Vec<_> = (0..2).map(|n| d.join(format!("nvdimm{n}.img"))).collect();
    for (n, backing) in backings.iter().enumerate() {
        extra.extend([
            "-object".to_owned(),
            format!(
                "memory-backend-file,id=nv{n},share=on,mem-path={},size={NVDIMM_SIZE}",
                backing.display()
            ),
            "-device".to_owned(),
            format!("nvdimm,memdev=nv{n},id=nvdimm{n}"),
        ]);
    }
    let vm = Vm {
        machine: "q35,nvdimm=on".to_owned(),
        memory: "1G,slots=2,maxmem=2G".to_owned(),
        extra,
        ..Vm::diskless()
    };
    // What the nested guest boots from, in `d` (bound into the QEMU 11.1 root as /srv).
    let (kernel, _) = guest_image();
    std::fs::copy(kernel, d.join("vmlinuz")).unwrap();
    inner_initramfs(d);
    tools_disk(d, &[Path::new("/usr/bin/fio"), Path::new("/sbin/mke2fs")]);
    let (fsdax_seed, devdax_seed) = (7, 8);
    let script = format!(
        "run_case dax_fsdax case_dax_fsdax {daxd} {client} {fsdax_seed}\n\
         run_case dax_devdax case_dax_devdax {daxd} {client} {devdax_seed}\n\
         run_case dax_nested_fsdax case_dax_nested {daxd} {sid} {dir} fsdax\n\
         run_case dax_nested_devdax case_dax_nested {daxd} {sid} {dir} devdax\n",
        client = client.display(),
        sid = sid_root().display(),
        dir = d.display()
    );
    let (run, _) = boot_for_a_verdict(|attempt| {
        // Blank NVDIMMs for every attempt: a test guest run again must not find the
        // namespaces the previous one made.
        for backing in &backings {
            let file = std::fs::File::create(backing).unwrap();
            file.set_len(NVDIMM_SIZE).unwrap();
        }
        boot(
            d,
            &format!("dax-{attempt}"),
            &vm,
            &script,
            Duration::from_secs(900),
            &mut |_, _| {},
        )
    });
    // What the guest found, for a failure in CI, where the console log is gone: its
    // results (inspections cut short), the inner guests' results and any finding.
    let found: Vec<String> = run
        .console
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| {
            l.starts_with("RESULT ")
                || l.contains("INNER-RESULT")
                || l.starts_with("FINDING")
                || l.starts_with("CLIENT ERROR")
                || l.starts_with("CASE ")
                || l.starts_with("INNER-LOST")
        })
        .map(|l| l.chars().take(240).collect())
        .collect();
    let report = format!(
        "console log: {}; the guest printed:\n{}",
        run.console_log.display(),
        found.join("\n")
    );
    run.assert_passed(
        &[
            "dax_fsdax",
            "dax_devdax",
            "dax_nested_fsdax",
            "dax_nested_devdax",
        ],
        "",
    );
    let result = |key: &str| run.results.get(key).map(String::as_str);
    for name in ["fsdax", "fsdax_kernel", "devdax"] {
        assert_eq!(
            result(&format!("client_exit_{name}")),
            Some("0"),
            "{report}"
        );
        // SIGTERM: every request made durable, then exit 0; a system call outside the
        // lists would have ended daxd with 128 + SIGSYS (--seccomp trap).
        assert_eq!(result(&format!("daxd_exit_{name}")), Some("0"), "{report}");
        assert_eq!(
            result(&format!("daxd_exit_again_{name}")),
            Some("0"),
            "{report}"
        );
        assert_eq!(result(&format!("check_exit_{name}")), Some("0"), "{report}");
    }

    // ext4 -o dax: a region file mapped with MAP_SYNC, whose FLUSHes write cache lines
    // back, and sync the file where a request changed its blocks (a zeroed range).
    let before = run.results.get("inspect_fsdax_before");
    let after = run.results.get("inspect_fsdax_after");
    assert_eq!(inspected(before, "/region/kind"), "file", "{report}");
    assert_eq!(inspected(before, "/region/map_sync"), true, "{report}");
    assert!(
        inspected(before, "/region/cache_write_back").is_string(),
        "{report}"
    );
    assert_eq!(inspected(before, "/region/written_back"), 0, "{report}");
    let written_back = inspected(after, "/region/written_back").as_u64().unwrap();
    let most = stored_between_flushes(fsdax_seed, (64 << 20) / BLOCK as u64);
    assert!(
        written_back > 0 && written_back <= most && written_back % 4096 == 0,
        "{written_back} bytes written back, at most {most} stored; {report}"
    );
    let syncs = inspected(after, "/region/write_back_fdatasyncs")
        .as_u64()
        .unwrap();
    assert!(
        (1..=OPS / FLUSH_EVERY).contains(&syncs),
        "{syncs} fdatasyncs; {report}"
    );
    assert_eq!(result("checked_fsdax"), Some("16384 0"), "{report}");
    // --flush-path fdatasync on the same file: still MAP_SYNC, FLUSH by the kernel.
    let kernel = run.results.get("inspect_fsdax_kernel_after");
    assert_eq!(inspected(kernel, "/region/map_sync"), true, "{report}");
    assert_eq!(
        inspected(kernel, "/region/cache_write_back"),
        serde_json::Value::Null,
        "{report}"
    );
    assert_eq!(inspected(kernel, "/region/written_back"), 0, "{report}");
    assert_eq!(result("checked_fsdax_kernel"), Some("16384 0"), "{report}");

    // Device-DAX: the device's size and pages; every FLUSH wrote back exactly the pages the
    // requests before it stored into, never an fdatasync.
    let size: u64 = result("devdax_size").unwrap().parse().unwrap();
    assert_eq!(result("devdax_align"), Some("2097152"), "{report}");
    let before = run.results.get("inspect_devdax_before");
    let after = run.results.get("inspect_devdax_after");
    assert_eq!(inspected(before, "/region/kind"), "device-dax", "{report}");
    assert_eq!(inspected(before, "/region/size"), size, "{report}");
    assert_eq!(inspected(before, "/region/map_align"), 2 << 20, "{report}");
    assert_eq!(inspected(before, "/region/written_back"), 0, "{report}");
    assert_eq!(
        inspected(after, "/region/written_back"),
        stored_between_flushes(devdax_seed, size / BLOCK as u64),
        "{report}"
    );
    assert_eq!(
        inspected(after, "/region/write_back_fdatasyncs"),
        0,
        "{report}"
    );
    assert_eq!(
        result("checked_devdax"),
        Some(format!("{} 0", size / BLOCK as u64).as_str()),
        "{report}"
    );

    // Guests nested in the test guest on the same persistent memory, each with ext4 and
    // DAX on a pmem window of the region and fio with verify on its disk; after daxd was
    // stopped and started again, a second guest finds both. On the DAX file system daxd
    // maps the window into QEMU 11.1's shared memory and serves its FLUSHes; on device-DAX
    // QEMU maps the window as an NVDIMM with the options print-qemu-args gives.
    let inner = |kind: &str, step: &str, key: &str| {
        let prefix = format!("INNER {kind} {step}: INNER-RESULT {key} ");
        run.console
            .lines()
            .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix.as_str()))
            .map(str::to_owned)
    };
    let some = |v: &str| Some(v.to_owned());
    for kind in ["fsdax", "devdax"] {
        for step in ["dax-write", "dax-read"] {
            let what = format!("{kind} {step}: {report}");
            // A nested guest that reset itself ran once more (dax-cases.sh); say so.
            if let Some(why) = result(&format!("nested_rerun_{kind}_{step}")) {
                eprintln!("the nested guest of {kind} {step} ran again: {why} ({report})");
            }
            let exit = |key: &str| result(&format!("{key}_{kind}_{step}")).map(str::to_owned);
            assert_eq!(exit("nested_exit"), some("0"), "{what}");
            assert_eq!(exit("daxd_exit_nested"), some("0"), "{what}");
            assert_eq!(inner(kind, step, "done"), some(step), "{what}");
            assert_eq!(inner(kind, step, "pmem_dax"), some("1"), "{what}");
            assert_eq!(inner(kind, step, "pmem_mount"), some("1"), "{what}");
            for failure in [
                "fsdax_failed",
                "mkfs_failed",
                "mount_failed",
                "umount_failed",
            ] {
                assert_eq!(inner(kind, step, failure), None, "{failure}: {what}");
            }
        }
        assert_eq!(inner(kind, "dax-write", "fio_exit"), some("0"), "{report}");
        for key in ["pmem_file", "disk_16m"] {
            let written = inner(kind, "dax-write", key);
            assert!(written.is_some(), "{kind} {key}: {report}");
            assert_eq!(
                inner(kind, "dax-read", key),
                written,
                "{kind} {key}: {report}"
            );
        }
    }
    // The guest's sync reached daxd as a virtio-pmem FLUSH: on a DAX file, an fdatasync
    // (the kernel tracks the guest's stores through the mapping daxd gave QEMU).
    let syncs = inspected(
        run.results.get("inspect_nested_fsdax_dax-write"),
        "/region/write_back_fdatasyncs",
    );
    assert!(syncs.as_u64().unwrap() >= 1, "{syncs}; {report}");
    let window = result("nested_window_options").unwrap_or_default();
    assert!(
        window.contains("mem-path=/dev/dax1.0,offset=67108864,size=33554432,align=2097152,pmem=on"),
        "{window}; {report}"
    );
}

/// What a FLUSH costs on ext4 mounted `-o dax`: daxd-bench in the test guest, daxd writing
/// cache lines back and daxd calling fdatasync (`--flush-path`), each against
/// qemu-storage-daemon, QD1 write+FLUSH and QD8 with a FLUSH every 16. A report, by hand:
/// the release builds must exist (`cargo build --release -p daxd -p daxd-bench`), and
/// under TCG the absolute figures are the emulator's.
#[test]
#[ignore = "by hand: a report of the flush cost on a DAX file system"]
fn soak_dax_flush_cost() {
    let dir = test_dir("daxd-dax-flush-");
    let d = dir.path();
    let release = Path::new(env!("CARGO_BIN_EXE_daxd"))
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("release");
    let (bench, daxd) = (release.join("daxd-bench"), release.join("daxd"));
    assert!(
        bench.exists() && daxd.exists(),
        "build them first: cargo build --release -p daxd -p daxd-bench"
    );
    let backing = d.join("nvdimm0.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(NVDIMM_SIZE)
        .unwrap();
    let vm = Vm {
        machine: "q35,nvdimm=on".to_owned(),
        memory: "1G,slots=2,maxmem=2G".to_owned(),
        extra: vec![
            "-object".to_owned(),
            format!(
                "memory-backend-file,id=nv0,share=on,mem-path={},size={NVDIMM_SIZE}",
                backing.display()
            ),
            "-device".to_owned(),
            "nvdimm,memdev=nv0,id=nvdimm0".to_owned(),
        ],
        ..Vm::diskless()
    };
    let script = format!(
        "run_case dax_flush_cost case_dax_flush_cost {} {}\n",
        bench.display(),
        daxd.display()
    );
    let run = boot(
        d,
        "flush-cost",
        &vm,
        &script,
        Duration::from_secs(1800),
        &mut |_, _| {},
    );
    for line in run.console.lines().filter(|l| l.starts_with("BENCH ")) {
        println!("{line}");
    }
    run.assert_passed(&["dax_flush_cost"], "");
}
