//! Fault rules under a real guest (Linux 6.12 under QEMU 10.0, TCG): what a file system
//! tester sees when daxd's disk fails on purpose. The guest prints what to aim at (the
//! sectors of a file, the queue of a CPU); at each step the host sets or clears a rule on
//! daxd's control socket, and afterwards checks each rule's hits against what the guest
//! did.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::support::guest::{boot, print_qemu_args, printed_line, results, sid_qemu, Vm};
use crate::support::{daxd_fault as fault, fault_rules, test_dir, Backend};

const BOOT_TIMEOUT: Duration = Duration::from_secs(400);
/// Where the bad-blocks case puts its bad sectors (beyond fio's 64 MiB and the ext4
/// cases run later on a fresh file system).
const BAD_SECTOR: u64 = 200_000;
const DELAY_MS: u64 = 20;

/// Each rule's hits, by its text.
fn hits(control: &Path) -> BTreeMap<String, u64> {
    fault_rules(control)
        .into_iter()
        .map(|rule| (rule.rule, rule.hits))
        .collect()
}

#[test]
#[ignore = "needs QEMU and the test guest; run by ci/test.sh"]
fn a_guest_meets_the_faults_its_tester_sets() {
    let dir = test_dir("daxd-guest-faults-");
    let d = dir.path();
    let control = d.join("control.sock");
    let daxd = Backend::start_daxd(
        d,
        &d.join("region.img"),
        &[
            "--size",
            "256M",
            "--num-queues",
            "2",
            "--control-socket",
            control.to_str().unwrap(),
        ],
    );
    // What each step left behind, checked after the boot.
    let mut seen: BTreeMap<&'static str, BTreeMap<String, u64>> = BTreeMap::new();
    let run = boot(
        d,
        "faults",
        &Vm::blk(&daxd.socket, 2),
        &format!(
            "run_case bad_blocks case_bad_blocks {BAD_SECTOR}\n\
             run_case delay case_delay\n\
             run_case read_error case_read_error\n\
             run_case flush_error case_flush_error\n\
             run_case write_error case_write_error\n"
        ),
        BOOT_TIMEOUT,
        &mut |step, console| {
            let result = |key: &str| {
                results(console)
                    .get(key)
                    .cloned()
                    .unwrap_or_else(|| panic!("the guest printed no {key} before step {step}"))
            };
            let (name, rule): (&'static str, Option<String>) = match step {
                "bad-blocks" => (
                    "bad-blocks",
                    Some(format!(
                        "sectors={BAD_SECTOR}..{},action=bad-blocks",
                        BAD_SECTOR + 8
                    )),
                ),
                "delay" => (
                    "delay",
                    Some(format!(
                        "queue={},action=delay:{DELAY_MS}ms",
                        result("queue_of_cpu0")
                    )),
                ),
                "read-rule" => (
                    "read-rule",
                    Some(format!(
                        "op=read,sectors={},action=fail",
                        result("victim_sectors")
                    )),
                ),
                "flush-rule" => ("flush-rule", Some("op=flush,action=fail".into())),
                "write-rule" => ("write-rule", Some("op=write,action=fail".into())),
                "delay-cleared" => ("delay-cleared", None),
                "read-counted" => ("read-counted", None),
                "read-cleared" => ("read-cleared", None),
                "flush-cleared" => ("flush-cleared", None),
                "write-cleared" => ("write-cleared", None),
                other => panic!("unexpected step {other}"),
            };
            // The rules' hits as the guest reached the step, before it changes anything.
            seen.insert(name, hits(&control));
            if rule.is_some() || name.ends_with("-cleared") {
                fault(&control, &["clear", "--all"]);
            }
            if let Some(rule) = rule {
                fault(&control, &["add", &rule]);
            }
        },
    );
    run.assert_passed(
        &[
            "bad_blocks",
            "delay",
            "read_error",
            "flush_error",
            "write_error",
        ],
        &format!("rules' hits at each step: {seen:?}"),
    );
    let report = format!("console log {}; hits {seen:?}", run.console_log.display());
    let number = |key: &str| -> u64 {
        run.result(key)
            .unwrap_or_else(|| panic!("no {key}: {report}"))
            .parse()
            .unwrap()
    };
    let only = |step: &str| -> u64 {
        let rules = &seen[step];
        assert_eq!(rules.len(), 1, "{step}: {report}");
        *rules.values().next().unwrap()
    };

    // Bad blocks: the two reads that touched sectors still bad failed, nothing else.
    assert_eq!(only("delay"), 2, "{report}");

    // Delay: CPU 0's reads waited at least the delay longer; CPU 1's did not.
    let (before0, delayed0) = (number("before_cpu0"), number("delayed_cpu0"));
    let (before1, delayed1) = (number("before_cpu1"), number("delayed_cpu1"));
    assert!(
        delayed0 >= before0 + DELAY_MS * 1000,
        "CPU 0's median read latency went from {before0} us to {delayed0} us: {report}"
    );
    assert!(
        delayed1 < before1 + 5000,
        "CPU 1's median read latency went from {before1} us to {delayed1} us: {report}"
    );
    // Every read of CPU 0's fio job went through the delayed queue; hardly anything else.
    let ios = number("delayed_cpu0_ios");
    let delayed = only("delay-cleared");
    assert!(
        delayed >= ios && delayed <= ios + 16,
        "the delay rule acted on {delayed} requests, fio on CPU 0 made {ios}: {report}"
    );

    // Read error: the one O_DIRECT read of the file, then at least the buffered read.
    assert_eq!(only("read-counted"), 1, "{report}");
    assert!(only("read-cleared") >= 2, "{report}");
    // FLUSH and write errors: acted on what the guest sent.
    assert!(only("flush-cleared") >= 1, "{report}");
    assert!(only("write-cleared") >= 1, "{report}");
    drop(daxd);
}

/// A guest's fsync on a DAX file fails when a rule fails the virtio-pmem FLUSH that daxd
/// serves (QEMU 11.1, the window in vhost-user shared memory). With QEMU 10, which maps
/// the window from the file and serves its FLUSH itself, daxd never sees the FLUSH and
/// refuses rules that name the window (tests/faults.rs).
#[test]
#[ignore = "needs QEMU 11.1 (ci/build-sid-root.sh) and the test guest; run by ci/test.sh"]
fn a_failing_virtio_pmem_flush_fails_the_guests_fsync_on_dax() {
    let dir = test_dir("daxd-guest-pmem-faults-");
    let d = dir.path();
    let region = d.join("region.img");
    let control = d.join("control.sock");
    let pmem_socket = d.join("pmem.sock");
    let args: Vec<String> = [
        "--size",
        "256M",
        "--window",
        "name=disk,size=128M,serve=blk",
        "--window",
        "name=pm0,offset=128M,size=128M,serve=pmem",
        "--pmem-socket-path",
        pmem_socket.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    let mut serve: Vec<&str> = args.iter().map(String::as_str).collect();
    serve.extend(["--control-socket", control.to_str().unwrap()]);
    let daxd = Backend::start_daxd(d, &region, &serve);
    let mut print = vec![
        "--region".to_owned(),
        region.display().to_string(),
        "--socket-path".to_owned(),
        daxd.socket.display().to_string(),
    ];
    print.extend(args);
    let printed = print_qemu_args(&print);
    let line = |prefix: &str| printed_line(&printed, prefix);
    let vm = Vm {
        memory: line("-m ").split_whitespace().nth(1).unwrap().to_owned(),
        extra: line("-chardev socket,id=daxd-pmem-")
            .split_whitespace()
            .map(String::from)
            .collect(),
        qemu: sid_qemu(d),
        ..Vm::blk(&daxd.socket, 1)
    };
    let mut seen: BTreeMap<&'static str, BTreeMap<String, u64>> = BTreeMap::new();
    let run = boot(
        d,
        "pmem-faults",
        &vm,
        "run_case pmem_flush_error case_pmem_flush_error\n",
        BOOT_TIMEOUT,
        &mut |step, _| match step {
            "pmem-flush-rule" => {
                seen.insert("pmem-flush-rule", hits(&control));
                fault(&control, &["add", "device=pm0,action=fail"]);
            }
            "pmem-flush-cleared" => {
                seen.insert("pmem-flush-cleared", hits(&control));
                fault(&control, &["clear", "--all"]);
            }
            other => panic!("unexpected step {other}"),
        },
    );
    run.assert_passed(&["pmem_flush_error"], &format!("hits: {seen:?}"));
    let hits = seen["pmem-flush-cleared"]["device=pm0,action=fail"];
    assert!(
        hits >= 1,
        "the rule acted on {hits} FLUSHes; console log {}",
        run.console_log.display()
    );
    assert!(daxd.terminate().success());
}
