#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ briefly (FUZZ_SECONDS each, default 10) from its
# committed corpus, so that the targets keep building and the corpus keeps passing; new
# inputs go to a scratch directory, not into the repository. Longer runs by hand:
#   cd fuzz && cargo +nightly fuzz run TARGET corpus/TARGET -- -max_total_time=600
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${FUZZ_SECONDS:-10}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
cargo +nightly fuzz build
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in $(cargo +nightly fuzz list); do
    mkdir -p "$scratch/$target"
    echo "fuzz: $target for ${seconds}s"
    log=$scratch/$target.log
    leaks=1
    # Its server threads keep allocations from one input to the next and at exit, which
    # LeakSanitizer would report as leaks.
    [ "$target" = vhost_user_messages ] && leaks=0
    if ! ASAN_OPTIONS="detect_leaks=$leaks" cargo +nightly fuzz run "$target" "$scratch/$target" \
        "corpus/$target" -- -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
        -detect_leaks="$leaks" > "$log" 2>&1; then
        tail -40 "$log"
        echo "fuzz: $target failed" >&2
        exit 1
    fi
    grep -E "^stat::(number_of_executed_units|new_units_added)|Done [0-9]+ runs" "$log" || true
done
