#!/usr/bin/env bash
# The project's test command (README "Test"): installs what is missing, runs the unit
# tests and the blkio end-to-end suite (cargo test --workspace), builds the test guest
# and runs the real-guest suite under QEMU against daxd and against qemu-storage-daemon.
set -euo pipefail
cd "$(dirname "$0")/.."

ci/install-deps.sh
cargo build --workspace --all-targets
cargo test --workspace
ci/build-guest.sh >/dev/null
cargo test -p daxd --test guest_blk --test guest_pmem -- --ignored --test-threads=1
