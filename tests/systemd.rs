//! daxd under systemd: socket activation with the real `systemd-socket-activate`, a socket
//! that outlives daxd restarts (as systemd keeps a `.socket` unit's socket), readiness and
//! stopping notifications on `NOTIFY_SOCKET`, and the unit files in resources/systemd
//! checked by `systemd-analyze verify`.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::guest::repo_root;
use crate::support::{pass_as_fd_3, pattern, test_dir, Backend, Client};

const DAXD: &str = env!("CARGO_BIN_EXE_daxd");

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "{what} within 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `systemd-socket-activate` creates the socket and starts daxd only when the first
/// frontend connects; daxd serves that frontend on the socket it was given.
#[test]
fn systemd_socket_activation_starts_daxd_on_the_first_connection() {
    let dir = test_dir("daxd-systemd-");
    let d = dir.path();
    let socket = d.join("blk.sock");
    let region = d.join("region.img");
    let mut command = Command::new("systemd-socket-activate");
    command
        .arg("--listen")
        .arg(&socket)
        .arg("--fdname=blk")
        .arg(DAXD)
        .arg("--region")
        .arg(&region)
        .arg("--size")
        .arg("4M")
        .stdin(Stdio::null());
    let daxd = Backend::spawn(command, socket.clone(), false);
    wait_for("systemd-socket-activate listens", || socket.exists());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !region.exists(),
        "daxd started (and created the region) before any frontend connected"
    );

    let mut client = Client::connect(&socket, 1, false).unwrap();
    client.q().write(8192, &pattern(7, 4096)).unwrap();
    assert_eq!(client.q().read(8192, 4096).unwrap(), pattern(7, 4096));
    drop(client);
    assert!(daxd.terminate().success());
    assert_eq!(
        &std::fs::read(&region).unwrap()[8192..12288],
        pattern(7, 4096).as_slice()
    );
}

/// Starts daxd as systemd would with the socket it keeps: fd 3, `LISTEN_FDS=1`,
/// `LISTEN_PID` = daxd's pid (the shell's, which execs daxd), optionally `NOTIFY_SOCKET`.
fn start_activated(
    listener: &UnixListener,
    socket: &Path,
    region: &Path,
    notify: Option<&Path>,
) -> Backend {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(DAXD)
        .arg("--region")
        .arg(region)
        .arg("--size")
        .arg("4M")
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "blk")
        .stdin(Stdio::null());
    if let Some(notify) = notify {
        command.env("NOTIFY_SOCKET", notify);
    }
    pass_as_fd_3(&mut command, listener.as_raw_fd());
    Backend::spawn(command, socket.to_owned(), false)
}

/// The socket belongs to its unit, not to daxd: daxd stopping (SIGTERM) leaves it
/// listening, a frontend connecting meanwhile waits, and the next daxd serves it the same
/// data. (daxd used to shut the listening socket down when it stopped, which would have
/// ended it for systemd too.)
#[test]
fn a_restart_keeps_the_socket_and_the_data() {
    let dir = test_dir("daxd-systemd-");
    let d = dir.path();
    let socket = d.join("blk.sock");
    let region = d.join("region.img");
    let listener = UnixListener::bind(&socket).unwrap();

    let first = start_activated(&listener, &socket, &region, None);
    let mut client = Client::connect(&socket, 1, false).unwrap();
    client.q().write(0, &pattern(3, 4096)).unwrap();
    drop(client);
    assert!(first.terminate().success());
    // Still listening: a connection is queued for the next daxd.
    let waiting = std::os::unix::net::UnixStream::connect(&socket);
    assert!(
        waiting.is_ok(),
        "the socket stopped listening with daxd: {waiting:?}"
    );
    drop(waiting);

    let second = start_activated(&listener, &socket, &region, None);
    let mut client = Client::connect(&socket, 1, false).unwrap();
    assert_eq!(client.q().read(0, 4096).unwrap(), pattern(3, 4096));
    drop(client);
    assert!(second.terminate().success());
}

/// `READY=1` once daxd accepts frontends (after the region is open), `STOPPING=1` when it
/// begins to stop.
#[test]
fn readiness_and_stopping_are_notified() {
    let dir = test_dir("daxd-systemd-");
    let d = dir.path();
    let socket = d.join("blk.sock");
    let region = d.join("region.img");
    let notify_path = d.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let listener = UnixListener::bind(&socket).unwrap();
    let daxd = start_activated(&listener, &socket, &region, Some(&notify_path));
    let mut buf = [0u8; 4096];
    let n = notify.recv(&mut buf).expect("no notification within 20 s");
    let message = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(message.lines().any(|l| l == "READY=1"), "{message:?}");
    assert!(message.contains("STATUS=serving"), "{message:?}");
    assert!(region.exists(), "READY=1 before the region was open");
    let mut client = Client::connect(&socket, 1, false).unwrap();
    client.q().write(0, &pattern(5, 512)).unwrap();
    drop(client);

    rustix::process::kill_process(
        rustix::process::Pid::from_raw(daxd.pid() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let n = notify.recv(&mut buf).expect("no STOPPING=1 within 20 s");
    let message = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(message.lines().any(|l| l == "STOPPING=1"), "{message:?}");
    assert!(daxd.terminate().success());
}

/// The unit files parse and name what exists, as `systemd-analyze verify` checks them
/// (with the binary path pointed at this build).
#[test]
fn the_unit_files_verify() {
    let dir = test_dir("daxd-systemd-");
    let d = dir.path();
    let units = repo_root().join("resources/systemd");
    for (template, instance) in [
        ("daxd@.socket", "daxd@disk0.socket"),
        ("daxd@.service", "daxd@disk0.service"),
    ] {
        let text = std::fs::read_to_string(units.join(template)).unwrap();
        assert!(
            text.contains("/usr/local/bin/daxd") || template.ends_with(".socket"),
            "{template} does not start /usr/local/bin/daxd (README's install step)"
        );
        std::fs::write(d.join(instance), text.replace("/usr/local/bin/daxd", DAXD)).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .args([
            "verify",
            "--man=no",
            "./daxd@disk0.socket",
            "./daxd@disk0.service",
        ])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
