#!/usr/bin/env bash
# The vendored crates are their registry releases plus the patch series in
# vendor/NAME/patches (vendor/NAME/PATCH.md says what each patch does). For each crate:
# fetch the release through cargo (so from whatever registry or mirror this machine's
# cargo uses; its checksum checked again here), trim the packaging files that name
# package hosts (this repository names none: tests/ci_scripts.rs), apply the series in
# order, check that the result is exactly the tree the workspace builds, and run the
# crate's own tests on it (vhost-user-backend's against the patched vhost). A patch that
# no longer applies, a change made to vendor/ outside the series, or a failing crate test
# fails the run.
#
# ci/vendor.sh --update writes the rebuilt trees into vendor/ instead of comparing (after
# a change to a series; PATCH.md and patches/ are kept).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
cache=$root/.cache/vendor
mkdir -p "$cache"
export CARGO_TARGET_DIR=$cache/target
update=
if [ "${1:-}" = --update ]; then
    update=1
fi

# fetch NAME VERSION: prints the path of the release's .crate in cargo's cache.
fetch() {
    local name=$1 version=$2
    local probe=$cache/fetch-$name
    mkdir -p "$probe/src"
    : >"$probe/src/lib.rs"
    cat >"$probe/Cargo.toml" <<EOF
[package]
name = "fetch-$name"
version = "0.0.0"
edition = "2021"

[dependencies]
$name = "=$version"

[workspace]
EOF
    (cd "$probe" && cargo fetch --quiet)
    local crate
    for crate in "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$name-$version.crate"; do
        if [ -f "$crate" ]; then
            echo "$crate"
            return 0
        fi
    done
    echo "ci/vendor.sh: cargo fetched $name $version but its .crate is not in cargo's cache" >&2
    return 1
}

# rebuild NAME VERSION SHA256 [FILE...]: leaves the release, without FILEs and without the
# packaging metadata that names hosts, plus the series in $cache/NAME.
rebuild() {
    local name=$1 version=$2 sha=$3
    shift 3
    local crate
    crate=$(fetch "$name" "$version")
    if ! echo "$sha  $crate" | sha256sum --check --status; then
        echo "ci/vendor.sh: $crate does not have the checksum of $name $version ($sha)" >&2
        return 1
    fi
    local work=$cache/$name
    rm -rf "$work"
    mkdir -p "$work"
    tar -xzf "$crate" -C "$work" --strip-components=1
    # cargo's own files (a path dependency needs neither), and what the caller names.
    local file
    for file in .cargo_vcs_info.json Cargo.lock "$@"; do
        rm -rf "${work:?}/$file"
    done
    sed -i -e '/^documentation = /d' \
        -e 's/^# to registry (e\.g\., [^)]*) dependencies/# to registry dependencies/' \
        "$work/Cargo.toml" "$work/Cargo.toml.orig"
    if [ ! -e "$work/README.md" ]; then
        sed -i '/^readme = /d' "$work/Cargo.toml" "$work/Cargo.toml.orig"
    fi
    # A repository of its own, so that git apply takes paths from the crate's root
    # (.cache sits inside this project's checkout).
    git -C "$work" init -q
    local patch
    for patch in "vendor/$name"/patches/*.patch; do
        if ! git -C "$work" apply "$root/$patch"; then
            echo "ci/vendor.sh: $patch does not apply to $name $version" >&2
            return 1
        fi
    done
    rm -rf "$work/.git"
    if [ -n "$update" ]; then
        find "vendor/$name" -mindepth 1 -maxdepth 1 ! -name PATCH.md ! -name patches \
            -exec rm -rf {} +
        cp -r "$work/." "vendor/$name/"
    elif ! diff -r -x PATCH.md -x patches "$work" "vendor/$name"; then
        echo "ci/vendor.sh: vendor/$name is not $name $version plus vendor/$name/patches" \
            "(see the differences above): make each change a patch in the series" >&2
        return 1
    fi
}

# vhost's README and the drawing in docs/ it shows are badges and links to package hosts.
rebuild vhost 0.18.0 65ecafe06ea725636dad0b617c5258e079c061d0d38fd9966af93e0ecd9d07e7 \
    README.md docs
rebuild vhost-user-backend 0.24.0 \
    65345e6a9b7c53b97c0225b2cf7ddb42bc7732a44904856f1b88351aed569362

# The workspace's lock as a start, so that the tests build with the versions daxd uses.
cp Cargo.lock "$cache/vhost/"
cp Cargo.lock "$cache/vhost-user-backend/"
(cd "$cache/vhost" && cargo test --quiet --features vhost-user-frontend,vhost-user-backend)
(cd "$cache/vhost-user-backend" &&
    cargo test --quiet --config "patch.crates-io.vhost.path=\"$cache/vhost\"")
