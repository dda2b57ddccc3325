//! daxd's threads under their seccomp filters, as an operator would check them: each
//! thread's `Seccomp_filters` in /proc, and a daemon that serves, answers `daxd inspect` and
//! shuts down cleanly (its final flush included) with the default `--seccomp kill`. Every
//! other suite runs daxd with the same default, which is what shows the lists complete.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::support::{daxd_inspect, pattern, test_dir, Backend, Client};

/// Thread name -> the seccomp filter counts of the threads of that name.
fn filters_by_thread(pid: u32) -> BTreeMap<String, Vec<u32>> {
    let mut threads = BTreeMap::<String, Vec<u32>>::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let Ok(name) = std::fs::read_to_string(task.join("comm")) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(task.join("status")) else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().parse::<u32>().unwrap())
                .unwrap()
        };
        let filters = field("Seccomp_filters:");
        if filters > 0 {
            assert_eq!(field("Seccomp:"), 2, "{name}: filter mode");
            assert_eq!(field("NoNewPrivs:"), 1, "{name}: no_new_privs");
        }
        // Handler threads are named after their connection: daxd-blk-1, daxd-blk-2, ...
        let name = name.trim();
        let name = match name.strip_prefix("daxd-blk-") {
            Some(n) if n.parse::<u64>().is_ok() => "daxd-blk-N",
            _ => name,
        };
        threads.entry(name.to_owned()).or_default().push(filters);
    }
    threads
}

/// Starts daxd with 2 queues, has a client write, flush and read, and returns the filter
/// counts of its threads while the client is still connected, once the threads are
/// `settled` (or after 10 s): the connection that probed the socket at start may still be
/// ending, and the backend for the next frontend still starting, when the client is done.
fn threads_of_a_serving_daxd(
    extra: &[&str],
    settled: impl Fn(&BTreeMap<String, Vec<u32>>) -> bool,
) -> (BTreeMap<String, Vec<u32>>, Backend, tempfile::TempDir) {
    let dir = test_dir("daxd-confine-");
    let region = dir.path().join("region.img");
    let control = dir.path().join("control.sock");
    let mut args = vec![
        "--size",
        "4M",
        "--num-queues",
        "2",
        "--control-socket",
        control.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let daxd = Backend::start_daxd(dir.path(), &region, &args);
    let mut client = Client::connect(&daxd.socket, 2, false).unwrap();
    client.queues[1].write(8192, &pattern(3, 4096)).unwrap();
    client.queues[1].flush().unwrap();
    assert_eq!(client.queues[0].read(8192, 4096).unwrap(), pattern(3, 4096));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut threads = filters_by_thread(daxd.pid());
    while !settled(&threads) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        threads = filters_by_thread(daxd.pid());
    }
    // The main thread's control socket, under its filter.
    daxd_inspect(&control, &["--json"]);
    drop(client);
    (threads, daxd, dir)
}

#[test]
fn every_daxd_thread_runs_under_its_own_filter() {
    // One filter where main started the thread and it added nothing yet (main, the
    // server, the thread that waits for the connection to end); two where a thread
    // narrowed the filter it inherited. The flusher and queue workers are there twice:
    // the client's, and those of the backend that waits in accept for the next frontend.
    let expected: BTreeMap<String, Vec<u32>> = [
        ("daxd", vec![1]),
        ("daxd-blk-accept", vec![1]),
        ("daxd-blk-conn", vec![1]),
        ("daxd-blk-N", vec![2]),
        ("daxd-blk-flush", vec![2, 2]),
        ("vring_worker", vec![2, 2, 2, 2]),
    ]
    .into_iter()
    .map(|(name, filters)| (name.to_owned(), filters))
    .collect();
    let (threads, daxd, _dir) = threads_of_a_serving_daxd(&[], |threads| threads == &expected);
    assert_eq!(threads, expected);
    // The shutdown (stopping the servers, the final fdatasync, removing the sockets) runs
    // under the main thread's filter too.
    let status = daxd.terminate();
    assert!(status.success(), "daxd exited {status}");
}

#[test]
fn seccomp_none_installs_no_filter() {
    // Every thread there, as in every_daxd_thread_runs_under_its_own_filter.
    let (threads, daxd, _dir) = threads_of_a_serving_daxd(&["--seccomp", "none"], |threads| {
        threads.get("vring_worker").map(Vec::len) == Some(4)
            && threads.get("daxd-blk-conn").map(Vec::len) == Some(1)
    });
    assert!(
        threads.values().flatten().all(|&filters| filters == 0),
        "{threads:?}"
    );
    assert!(daxd.terminate().success());
}

/// Every path under `root` (a process's /proc/PID/root), relative to it.
fn visible_paths(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            found.push(path.strip_prefix(root).unwrap().to_path_buf());
            if path.is_dir() && !path.is_symlink() {
                stack.push(path);
            }
        }
    }
    found.sort();
    found
}

fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
        .unwrap()
}

#[test]
fn the_sandbox_leaves_daxd_its_socket_directory_and_nothing_else() {
    let sockets = test_dir("daxd-sandbox-sockets-");
    let data = test_dir("daxd-sandbox-data-");
    let region = data.path().join("region.img");
    let control = sockets.path().join("control.sock");
    let daxd = Backend::start_daxd(
        sockets.path(),
        &region,
        &[
            "--size",
            "4M",
            "--sandbox",
            "namespace",
            "--control-socket",
            control.to_str().unwrap(),
        ],
    );
    let pid = daxd.pid();
    let mut client = Client::connect(&daxd.socket, 1, false).unwrap();
    client.q().write(0, &pattern(9, 4096)).unwrap();
    client.q().flush().unwrap();

    // The file system daxd sees: the socket directory at its path, with the sockets.
    let socket_dir = sockets.path().canonicalize().unwrap();
    let mut expected: Vec<PathBuf> = socket_dir
        .ancestors()
        .filter(|p| *p != Path::new("/"))
        .map(|p| p.strip_prefix("/").unwrap().to_path_buf())
        .collect();
    for name in ["blk.sock", "control.sock"] {
        expected.push(
            socket_dir
                .join(name)
                .strip_prefix("/")
                .unwrap()
                .to_path_buf(),
        );
    }
    expected.sort();
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    assert_eq!(visible_paths(&root), expected);
    assert!(!root.join(region.strip_prefix("/").unwrap()).exists());
    // Namespaces of its own, no capabilities, bounded descriptors.
    for ns in ["mnt", "net", "ipc"] {
        assert_ne!(
            std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap(),
            std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(),
            "{ns} namespace"
        );
    }
    for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect::<Vec<_>>();
    assert_eq!(open_files, ["4096", "4096"]);

    // Still serving, answering inspect, and shutting down cleanly: the data flushed, the
    // socket files removed through the kept directory.
    assert_eq!(client.q().read(0, 4096).unwrap(), pattern(9, 4096));
    drop(client);
    daxd_inspect(&control, &[]);
    assert!(daxd.terminate().success());
    assert!(!sockets.path().join("blk.sock").exists());
    assert!(!control.exists());
    assert_eq!(
        crate::support::file_bytes(&region, 0, 4096),
        pattern(9, 4096)
    );
}

#[test]
fn sandbox_none_shares_the_host_view() {
    let dir = test_dir("daxd-sandbox-none-");
    let region = dir.path().join("region.img");
    let daxd = Backend::start_daxd(dir.path(), &region, &["--size", "4M", "--sandbox", "none"]);
    let pid = daxd.pid();
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap()
    );
    assert!(PathBuf::from(format!("/proc/{pid}/root"))
        .join(region.strip_prefix("/").unwrap())
        .exists());
    assert!(daxd.terminate().success());
}
