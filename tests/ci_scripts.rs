//! The CI scripts fetch from Debian only through the mirror the machine's apt sources name
//! (ci/debian-mirror.sh), and the repository names no package host of its own.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::guest::repo_root;
use crate::support::test_dir;

/// Runs ci/debian-mirror.sh against the apt configuration in `etc`.
fn debian_mirror(etc: &Path) -> Output {
    Command::new(repo_root().join("ci/debian-mirror.sh"))
        .env("APT_SOURCES_DIR", etc)
        .output()
        .expect("run ci/debian-mirror.sh")
}

fn write(etc: &Path, name: &str, text: &str) {
    let path = etc.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn mirror_of(etc: &Path) -> String {
    let out = debian_mirror(etc);
    assert!(
        out.status.success(),
        "ci/debian-mirror.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim_end().to_owned()
}

#[test]
fn debian_mirror_comes_from_the_machines_deb822_sources() {
    let dir = test_dir("daxd-mirror-");
    let etc = dir.path();
    // As Debian's cloud images ship it: a snapshot address in a comment, the security
    // archive in a stanza of its own, third-party archives next to it.
    write(
        etc,
        "sources.list.d/debian.sources",
        "Types: deb\n\
         # http://snapshot.example/archive/debian/20250520T000000Z\n\
         URIs: http://mirror.example/debian/\n\
         Suites: bookworm bookworm-updates\n\
         Components: main\n\
         \n\
         Types: deb\n\
         URIs: http://mirror.example/debian-security\n\
         Suites: bookworm-security\n",
    );
    write(
        etc,
        "sources.list.d/node.sources",
        "Types: deb\nURIs: https://node.example/node_20.x\nSuites: nodistro\n",
    );
    // The entry ci/install-deps.sh writes is never read back as the machine's mirror.
    write(
        etc,
        "sources.list.d/daxd-bookworm-backports.sources",
        "Types: deb\nURIs: http://stale.example/debian\nSuites: bookworm-backports\n",
    );
    // apt reads only *.list and *.sources.
    write(
        etc,
        "sources.list.d/old.list.disabled",
        "deb http://disabled.example/debian bookworm main\n",
    );
    assert_eq!(mirror_of(etc), "http://mirror.example/debian");
}

#[test]
fn debian_mirror_comes_from_one_line_sources_skipping_security_snapshot_and_disabled() {
    let dir = test_dir("daxd-mirror-");
    let etc = dir.path();
    write(
        etc,
        "sources.list",
        "# deb http://commented.example/debian bookworm main\n\
         deb [signed-by=/k.gpg] http://mirror.example/debian-security bookworm-security main\n\
         deb http://snapshot.example/archive/debian/20250520T000000Z bookworm main\n\
         deb-src http://source.example/debian bookworm main\n\
         deb [ arch=amd64 ] http://one.example/debian bookworm main contrib # comment\n",
    );
    write(
        etc,
        "sources.list.d/off.sources",
        "Types: deb\nEnabled: no\nURIs: http://off.example/debian\nSuites: trixie\n",
    );
    assert_eq!(mirror_of(etc), "http://one.example/debian");
}

#[test]
fn without_a_debian_mirror_the_scripts_say_what_to_add() {
    let dir = test_dir("daxd-mirror-");
    let etc = dir.path();
    write(
        etc,
        "sources.list.d/debian.sources",
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n",
    );
    let out = debian_mirror(etc);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "no mirror, yet it printed {:?}",
        out.stdout
    );
    assert!(
        stderr.contains("no Debian mirror found") && stderr.contains("URIs: <your Debian mirror"),
        "the error does not say what to add: {stderr}"
    );
}

/// Addresses the repository may hold: none of them hosts packages.
const ALLOWED_HOSTS: &[&str] = &[
    // The SVG namespace of the benchmark charts: a name, never fetched.
    "www.w3.org",
    // The vendored crates' upstream repository, and their changelogs' links.
    "github.com",
    // QEMU's vhost-user protocol documentation, cited by the vendored crates.
    "qemu-project.gitlab.io",
    "www.qemu.org",
    "qemu.readthedocs.io",
    // The license the vendored crate's README links to.
    "www.apache.org",
];

/// Package hosts that must not appear even without a scheme in front of them.
const PACKAGE_HOSTS: &[&str] = &[
    "debian.org",
    "ubuntu.com",
    "crates.io",
    "rust-lang.org",
    "pypi.org",
    "pythonhosted.org",
    "npmjs.org",
    "npmjs.com",
    "golang.org",
];

#[test]
fn the_repository_names_no_package_host() {
    let root = repo_root();
    let files = Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["ls-files", "-z"])
        .output()
        .expect("run git ls-files");
    assert!(
        files.status.success(),
        "git ls-files failed in {}",
        root.display()
    );
    let mut found = Vec::new();
    for name in files.stdout.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name);
        // Cargo writes its lock files itself, registry addresses included; this file
        // names the hosts it looks for.
        if name.ends_with("Cargo.lock") || name == "tests/ci_scripts.rs" {
            continue;
        }
        let Ok(bytes) = std::fs::read(root.join(&*name)) else {
            continue; // a file deleted in the working tree
        };
        let text = String::from_utf8_lossy(&bytes).to_lowercase();
        for host in url_hosts(&text) {
            // RFC 2606 reserves .example for examples such as the fixtures above.
            if !ALLOWED_HOSTS.contains(&host) && !host.ends_with(".example") {
                found.push(format!("{name}: an address on {host}"));
            }
        }
        for host in PACKAGE_HOSTS {
            if text.contains(host) {
                found.push(format!("{name}: {host}"));
            }
        }
    }
    assert!(
        found.is_empty(),
        "package hosts named in the repository (take the address from the machine's \
         configuration instead, as ci/debian-mirror.sh does):\n{}",
        found.join("\n")
    );
}

/// The host of every `scheme://host/...` address in `text`.
fn url_hosts(text: &str) -> Vec<&str> {
    text.match_indices("://")
        .map(|(at, _)| {
            let rest = &text[at + 3..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .filter(|host| host.contains('.'))
        .collect()
}
