#!/usr/bin/env bash
# Installs what the test suites need on a fresh Debian bookworm machine. Idempotent: does
# nothing when everything is present.
set -euo pipefail

need=()
command -v cc >/dev/null || need+=(gcc)
command -v qemu-storage-daemon >/dev/null || need+=(qemu-utils)

if ((${#need[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o Acquire::Check-Valid-Until=false update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
