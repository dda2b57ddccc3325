#!/usr/bin/env bash
# The project's test command (README "Testing"): unit tests, the blkio end-to-end suite
# against the real daxd binary, then the guest suite where it exists.
set -euo pipefail
cd "$(dirname "$0")/.."

"$(dirname "$0")/install-deps.sh"

cargo build --workspace --all-targets
cargo test --workspace
