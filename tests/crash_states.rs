//! Crash states of a recorded disk (`daxd --record`, `daxd crash-states`), driven by a
//! real vhost-user client (the `blkio` crate): which states a recording gives, what each
//! holds, that a checker's failure is reported with a way to make the state again, and
//! that a lost write (a drop rule) shows in the states a checker sees.

use std::path::Path;

use crate::support::{daxd_command, daxd_fault as fault, pattern, Backend, Client};

const SECTOR: u64 = 512;

/// A checker that notes each state's kind and marks with its image's first 12 KiB, and
/// fails the state whose number is in `fail` (if any).
fn noting_checker(notes: &Path, fail: Option<u64>) -> String {
    format!(
        "printf '%s %s ' \"$DAXD_STATE_KIND\" \"$(echo $DAXD_MARKS)\" >> {n}; \
         od -An -tx1 -v -N 12288 {{}} | tr -d ' \\n' | sha256sum | cut -c1-16 >> {n}; \
         [ \"$DAXD_STATE\" != '{f}' ]",
        n = notes.display(),
        f = fail.map_or(String::from("none"), |f| f.to_string())
    )
}

/// The first 12 KiB of an image as the checker notes them.
fn digest(image: &[u8]) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let hex: String = image[..12288].iter().map(|b| format!("{b:02x}")).collect();
    let mut sha = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    sha.stdin.take().unwrap().write_all(hex.as_bytes()).unwrap();
    let out = sha.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)[..16].to_owned()
}

/// Records: A at block 0, FLUSH, mark a-durable, B at block 1, C over bytes 1024..1536
/// of block 0, FLUSH, D at block 2 (after the last FLUSH), with `extra` daxd options;
/// returns the recording's directory.
fn record(dir: &Path, extra: &[&str]) -> std::path::PathBuf {
    let control = dir.join("control.sock");
    let rec = dir.join("rec");
    let mut args = vec![
        "--size",
        "16M",
        "--control-socket",
        control.to_str().unwrap(),
        "--record",
        rec.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let daxd = Backend::start_daxd(dir, &dir.join("region.img"), &args);
    let mut client = Client::connect(&daxd.socket, 1, false).unwrap();
    let q = client.q();
    q.write(0, &pattern(1, 4096)).unwrap();
    q.flush().unwrap();
    fault(&control, &["list"]);
    let (ok, _, err) = daxd_command(&[
        "mark",
        "--control-socket",
        control.to_str().unwrap(),
        "a-durable",
    ]);
    assert!(ok, "{err}");
    q.write(8 * SECTOR, &pattern(2, 4096)).unwrap();
    q.write(2 * SECTOR, &pattern(3, 512)).unwrap();
    q.flush().unwrap();
    q.write(16 * SECTOR, &pattern(4, 4096)).unwrap();
    drop(client);
    assert!(daxd.terminate().success());
    rec
}

fn crash_states(rec: &Path, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec!["crash-states", "--record", rec.to_str().unwrap()];
    args.extend_from_slice(extra);
    daxd_command(&args)
}

/// Each noted state: (kind, marks, digest).
fn notes(path: &Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut parts = l.split(' ');
            let kind = parts.next().unwrap().to_owned();
            let rest: Vec<&str> = parts.collect();
            let digest = rest.last().unwrap().to_string();
            (
                kind,
                rest[..rest.len() - 1].join(" ").trim().to_owned(),
                digest,
            )
        })
        .collect()
}

#[test]
fn a_recording_gives_each_flush_point_and_samples_between_them() {
    let dir = tempfile::tempdir().unwrap();
    let rec = record(dir.path(), &[]);
    let notes_path = dir.path().join("notes");
    let (ok, out, err) = crash_states(
        &rec,
        &[
            "--samples",
            "6",
            "--check",
            &noting_checker(&notes_path, None),
        ],
    );
    assert!(ok, "crash-states failed: {out}{err}");
    assert!(out.contains("state(s) checked"), "{out}");
    let seen = notes(&notes_path);
    let kinds: Vec<&str> = seen.iter().map(|(k, _, _)| k.as_str()).collect();
    let expected: Vec<String> = ["start"]
        .into_iter()
        .map(String::from)
        .chain((0..6).map(|s| format!("sample:0:{s}")))
        .chain(["flush:1".into()])
        .chain((0..6).map(|s| format!("sample:1:{s}")))
        .chain(["flush:2".into()])
        .chain((0..6).map(|s| format!("sample:2:{s}")))
        .collect();
    assert_eq!(kinds, expected);

    // What each FLUSH point holds: everything before it, nothing after.
    let zero = vec![0u8; 12288];
    let mut one = zero.clone();
    one[..4096].copy_from_slice(&pattern(1, 4096));
    let mut two = one.clone();
    two[4096..8192].copy_from_slice(&pattern(2, 4096));
    two[1024..1536].copy_from_slice(&pattern(3, 512));
    let flush = |kind: &str| seen.iter().find(|(k, _, _)| k == kind).unwrap().2.clone();
    assert_eq!(flush("start"), digest(&zero));
    assert_eq!(flush("flush:1"), digest(&one));
    assert_eq!(flush("flush:2"), digest(&two));
    // The mark set after the first FLUSH binds every state from FLUSH point 1 on.
    for (kind, marks, _) in &seen {
        let bound = kind != "start" && !kind.starts_with("sample:0:");
        assert_eq!(marks == "a-durable", bound, "{kind}: marks {marks:?}");
    }
    // Samples between the FLUSH points: block 0 A or A with C, block 1 old or B.
    let mut a_c = one.clone();
    a_c[1024..1536].copy_from_slice(&pattern(3, 512));
    let mut b = one.clone();
    b[4096..8192].copy_from_slice(&pattern(2, 4096));
    let allowed = [digest(&one), digest(&a_c), digest(&b), digest(&two)];
    for (kind, _, d) in seen.iter().filter(|(k, _, _)| k.starts_with("sample:1:")) {
        assert!(
            allowed.contains(d),
            "{kind} is no state a power cut can leave"
        );
    }
    // The tail's samples have D or not, on top of FLUSH point 2.
    let mut d = two.clone();
    d[8192..12288].copy_from_slice(&pattern(4, 4096));
    for (kind, _, digest_seen) in seen.iter().filter(|(k, _, _)| k.starts_with("sample:2:")) {
        assert!(
            [digest(&two), digest(&d)].contains(digest_seen),
            "{kind} is no state a power cut can leave"
        );
    }
}

#[test]
fn a_failing_state_is_reported_with_how_to_make_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let rec = record(dir.path(), &[]);
    let notes_path = dir.path().join("notes");
    let (ok, out, err) = crash_states(
        &rec,
        &[
            "--samples",
            "3",
            "--check",
            &noting_checker(&notes_path, Some(5)),
        ],
    );
    assert!(!ok, "a failing checker passed: {out}");
    assert!(out.contains("state 5 ("), "{out}");
    assert!(out.contains("FAILED"), "{out}");
    assert_eq!(notes(&notes_path).len(), 6, "stopped at the first failure");
    let again = err
        .split("again: ")
        .nth(1)
        .unwrap_or_else(|| panic!("no way to make the state again in: {err}"))
        .trim();
    assert!(again.contains("--state 5"), "{again}");
    let image = dir.path().join("state-5.img");
    let (ok, _, err) = crash_states(
        &rec,
        &[
            "--samples",
            "3",
            "--state",
            "5",
            "--out",
            image.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    let digest_again = digest(&std::fs::read(&image).unwrap());
    assert_eq!(
        digest_again,
        notes(&notes_path)[5].2,
        "the same state again"
    );
}

#[test]
fn a_dropped_write_is_missing_from_the_states_a_checker_sees() {
    // The checker: every state bound by the mark holds A at block 0 (as it must, the
    // FLUSH before the mark made it durable). A drop rule loses A: daxd acknowledged it
    // and stored nothing, so the recording has no A and the checker fails.
    let check = "[ -z \"$DAXD_MARKS\" ] || [ \"$(od -An -tx1 -N 1 {})\" != ' 00' ]";
    let dir = tempfile::tempdir().unwrap();
    let rec = record(dir.path(), &[]);
    let (ok, out, err) = crash_states(&rec, &["--check", check]);
    assert!(ok, "states of a sound disk failed: {out}{err}");

    let dir = tempfile::tempdir().unwrap();
    let rec = record(
        dir.path(),
        &["--fault", "op=write,sectors=0..8,when=once,action=drop"],
    );
    let (ok, out, _) = crash_states(&rec, &["--check", check]);
    assert!(!ok, "the lost write went unnoticed: {out}");
    assert!(
        out.contains("FLUSH point 1") && out.contains("FAILED"),
        "{out}"
    );
}

#[test]
fn recording_refuses_a_directory_it_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let (ok, _, err) = daxd_command(&[
        "--region",
        dir.path().join("r.img").to_str().unwrap(),
        "--size",
        "16M",
        "--socket-path",
        dir.path().join("s.sock").to_str().unwrap(),
        "--record",
        file.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("--record") && err.contains("writable directory"),
        "{err}"
    );
}
