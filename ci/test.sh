#!/usr/bin/env bash
# The project's test command (README "Test"): installs what is missing, checks formatting,
# lints and documentation (warnings are errors), runs the unit tests and the blkio
# end-to-end suite (cargo test --workspace), builds the test guest and a Debian sid root
# with QEMU 11.1, and runs the real-guest suites: the disk against daxd and
# qemu-storage-daemon, persistent memory with QEMU 10.0 and 11.1, power cuts and restarts,
# libvirt, and cloud-hypervisor nested in the test guest (built by
# ci/build-cloud-hypervisor.sh);
# then QEMU's own vhost-user-blk qtests against daxd (ci/qtest.sh). After the unit tests,
# the vendored crates' patch series is checked and their own tests run (ci/vendor.sh), and
# the fuzz targets run briefly (ci/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

ci/install-deps.sh
cargo fmt --all --check
# Every shell script: those with a shebang (its dialect), and the guest's case files,
# which busybox's sh sources.
scripts=()
while IFS= read -r -d '' file; do
    first=
    read -r first < "$file" || true
    if [[ $first =~ ^#!.*[/\ ](ba|da)?sh$ ]]; then
        scripts+=("$file")
    fi
done < <(git ls-files -z)
shellcheck -S warning "${scripts[@]}"
shellcheck -S warning -s sh resources/guest/*-cases.sh
cargo clippy --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
# daxd builds for aarch64 too (cloud-hypervisor and rust-vmm ship there): everything
# type-checks, the seccomp lists included (they name each architecture's calls).
cargo check --workspace --all-targets --target aarch64-unknown-linux-gnu --quiet
cargo build --workspace --all-targets
cargo test --workspace
# The vendored crates: rebuilt from their releases and patch series, their own tests run.
ci/vendor.sh
ci/fuzz.sh
ci/build-guest.sh >/dev/null
ci/build-sid-root.sh >/dev/null
# cloud-hypervisor is built from the source in ../shared; without it its suite cannot run:
# outside CI that is said here and the other suites run.
# With CI set, a suite that cannot run is a failure, not a skip.
skip=()
if ! ci/build-cloud-hypervisor.sh >/dev/null; then
    if [ -n "${CI:-}" ]; then
        echo "ci/test.sh: cloud-hypervisor could not be built (see above); CI is set, so that fails the run" >&2
        exit 1
    fi
    echo "ci/test.sh: cloud-hypervisor could not be built (see above); SKIPPING tests/cloud_hypervisor.rs" >&2
    skip=(--skip cloud_hypervisor)
fi
cargo test -p daxd --test e2e -- --ignored --test-threads=1 --skip soak_ "${skip[@]}"
ci/qtest.sh
