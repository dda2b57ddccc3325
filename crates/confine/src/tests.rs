use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use super::*;

#[test]
fn every_allowed_call_has_a_name() {
    for kind in ThreadKind::ALL {
        for call in kind.allowed() {
            assert!(
                syscall_name(call).is_some(),
                "{}: call {call} has no name",
                kind.name()
            );
        }
    }
}

#[test]
fn a_thread_allows_what_the_threads_it_creates_do() {
    for kind in ThreadKind::ALL {
        for child in kind.children() {
            assert!(child.allowed().is_subset(&kind.allowed()));
        }
    }
}

#[test]
fn a_queue_worker_cannot_reach_out() {
    let worker = ThreadKind::QueueWorker.allowed();
    for call in [
        libc::SYS_openat,
        libc::SYS_execve,
        libc::SYS_socket,
        libc::SYS_connect,
        libc::SYS_sendmsg,
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_ptrace,
        libc::SYS_mount,
        libc::SYS_memfd_create,
        libc::SYS_seccomp,
        libc::SYS_prctl,
    ] {
        assert!(!worker.contains(&call), "queue workers may call {call}");
    }
}

#[test]
fn threads_serving_memory_only_make_no_file_calls() {
    let file_calls = [
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_fdatasync,
        libc::SYS_fallocate,
        libc::SYS_lseek,
    ];
    for kind in [
        ThreadKind::Main,
        ThreadKind::QueueWorker,
        ThreadKind::Flusher,
        ThreadKind::PmemMapper,
    ] {
        let allowed = kind.allowed_with(RegionIo::MappingOnly);
        for call in file_calls {
            assert!(
                !allowed.contains(&call),
                "{} threads may make call {call}",
                kind.name()
            );
        }
        // Nothing else is taken away: eventfds are still read, log lines written.
        let with_files = kind.allowed();
        assert!(allowed.is_subset(&with_files));
        assert_eq!(
            with_files.difference(&allowed).count(),
            with_files
                .iter()
                .filter(|c| file_calls.contains(c) || **c == sys::SYS_cachestat)
                .count()
        );
        assert!(allowed.contains(&libc::SYS_write));
    }
    // A handler still sizes memory tables with lseek.
    assert!(ThreadKind::Handler
        .allowed_with(RegionIo::MappingOnly)
        .contains(&libc::SYS_lseek));
}

#[test]
fn every_filter_compiles() {
    for mismatch in [
        SeccompAction::KillProcess,
        SeccompAction::Log,
        SeccompAction::Trap,
    ] {
        for kind in ThreadKind::ALL {
            kind.program(mismatch.clone(), RegionIo::SystemCalls)
                .unwrap();
            kind.program(mismatch.clone(), RegionIo::MappingOnly)
                .unwrap();
        }
    }
}

const CHILD: &str = "DAXD_CONFINE_CHILD";

/// Runs [`child_queue_worker_calls_socket`] in a process of its own, in `mode`.
fn queue_worker_calls_socket(mode: &str) -> std::process::Output {
    child("tests::child_queue_worker_calls_socket", mode)
}

/// A confined queue worker that still does its work, then makes a
/// call outside its list: socket(2), as code run by a hostile guest would to reach out.
#[test]
#[ignore = "run by the tests that need it, in a process of its own"]
fn child_queue_worker_calls_socket() {
    let mode = match std::env::var(CHILD).as_deref() {
        Ok("kill") => Mode::Kill,
        Ok("trap") => Mode::Trap,
        Ok("log") => Mode::Log,
        _ => return,
    };
    init(mode, RegionIo::SystemCalls).unwrap();
    let worker = std::thread::spawn(|| {
        enter(ThreadKind::QueueWorker).unwrap();
        // Allowed: a write (this line), memory, time.
        let buffer = vec![0u8; 1 << 20];
        println!(
            "worker confined, still working: {} {:?}",
            buffer.len(),
            std::time::Instant::now()
                > std::time::Instant::now() - std::time::Duration::from_secs(1)
        );
        // SAFETY: socket(2) with constant arguments; the descriptor is closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        println!("socket returned {fd}");
        if fd >= 0 {
            // SAFETY: closes the descriptor just opened.
            unsafe { libc::close(fd) };
        }
    });
    worker.join().unwrap();
    println!("process survived");
}

#[test]
fn a_forbidden_call_from_a_queue_worker_ends_the_process() {
    let out = queue_worker_calls_socket("kill");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("worker confined, still working: 1048576 true"),
        "{stdout}"
    );
    assert!(!stdout.contains("socket returned"), "{stdout}");
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{:?}", out.status);
}

#[test]
fn trap_mode_names_the_forbidden_call_then_ends_the_process() {
    let out = queue_worker_calls_socket("trap");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stdout.contains("socket returned"), "{stdout}");
    assert!(
        stderr.contains(&format!(
            "made system call {} (socket), which its list does not allow",
            libc::SYS_socket
        )),
        "{stderr}"
    );
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGSYS),
        "{:?}",
        out.status
    );
}

#[test]
fn log_mode_lets_the_call_through() {
    let out = queue_worker_calls_socket("log");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("process survived"), "{stdout}");
    assert!(out.status.success(), "{:?}", out.status);
}

/// Runs the ignored child test `name` in a process of its own, with `mode` in [`CHILD`].
fn child(name: &str, mode: &str) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args([
            name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, mode)
        .output()
        .unwrap()
}

/// A confined queue worker allocates 4 MiB in blocks small enough to come from its
/// arena's heap, then frees them: the last free leaves megabytes at the top of the heap,
/// which glibc would shrink, reading /proc/sys/vm/overcommit_memory the first time.
#[test]
#[ignore = "run by the tests that need it, in a process of its own"]
fn child_queue_worker_shrinks_its_heap() {
    if std::env::var(CHILD).as_deref() != Ok("trap") {
        return;
    }
    init(Mode::Trap, RegionIo::SystemCalls).unwrap();
    let worker = std::thread::spawn(|| {
        enter(ThreadKind::QueueWorker).unwrap();
        for round in 0..4 {
            // Below malloc's mmap threshold (128 KiB): from the arena's heap.
            let blocks: Vec<Vec<u8>> = (0..40).map(|i| vec![i as u8; 100 << 10]).collect();
            let sum: u64 = blocks.iter().map(|b| u64::from(b[0])).sum();
            drop(blocks);
            println!("round {round}: {sum}");
        }
    });
    worker.join().unwrap();
    println!("process survived");
}

#[test]
fn a_confined_thread_can_free_what_shrinks_a_heap() {
    let out = child("tests::child_queue_worker_shrinks_its_heap", "trap");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("process survived") && out.status.success(),
        "{:?}\n{stdout}\n{stderr}",
        out.status
    );
}
