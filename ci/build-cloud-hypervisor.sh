#!/usr/bin/env bash
# Builds cloud-hypervisor (for tests/cloud_hypervisor.rs) from the source tarball in
# ../shared/cloud-hypervisor (v54.0.0; its one git dependency carried in the tarball, every
# other from the crates registry). Cached under .cache/cloud-hypervisor/<tarball name>;
# rebuilt only when the tarball changes. Prints the binary's path. CLOUD_HYPERVISOR_TARBALL
# names another tarball.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# The shared folder next to this checkout, or next to the local repository it was cloned
# from (a CI run in a fresh clone).
# The newest tarball in the first shared/ folder that has one. Nothing pipes into head:
# under pipefail the writer would die of SIGPIPE and fail the assignment below.
find_tarball() {
    origin=$(git -C "$root" config --get remote.origin.url 2>/dev/null || true)
    for shared in "$root/../shared" ${origin:+"$origin/../shared"}; do
        found=$( (find "$shared/cloud-hypervisor" -maxdepth 1 -name 'cloud-hypervisor-*.tar.xz' 2>/dev/null || true) \
            | sort | tail -n 1)
        if [ -n "$found" ]; then
            echo "$found"
            return
        fi
    done
}
tarball=${CLOUD_HYPERVISOR_TARBALL:-$(find_tarball)}
[ -n "$tarball" ] && [ -r "$tarball" ] || {
    echo "no cloud-hypervisor source tarball in ../shared/cloud-hypervisor: set CLOUD_HYPERVISOR_TARBALL" >&2
    exit 1
}
cache=$root/.cache/cloud-hypervisor
name=$(basename "$tarball" .tar.xz)
out=$cache/$name
if [ ! -x "$out/cloud-hypervisor" ]; then
    mkdir -p "$cache"
    src=$cache/src-$name
    if [ ! -d "$src" ]; then
        mkdir -p "$src.tmp"
        tar -xJf "$tarball" -C "$src.tmp" --strip-components=1
        mv "$src.tmp" "$src"
    fi
    # The 2-core machines build it in about 5 minutes; two jobs keep memory in check.
    (cd "$src" && cargo build --release --locked --jobs 2 --bin cloud-hypervisor >&2)
    mkdir -p "$out"
    cp "$src/target/release/cloud-hypervisor" "$out/cloud-hypervisor"
fi
ln -sfn "$name" "$cache/current"
echo "$out/cloud-hypervisor"
