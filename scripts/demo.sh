#!/usr/bin/env bash
# The main job of the README on a fresh Debian machine: install the C libraries the
# workspace's drivers link against (libiscsi for the iSCSI transport, librbd and
# librados for the rbd plugin), build everything, and run `hvmctl demo` (an online
# backup on the embedded default arrays). Arguments go to `hvmctl demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/install.sh
install_packages libiscsi-dev librbd-dev librados-dev
command -v cargo >/dev/null || { echo "cargo is required (rustup)"; exit 1; }
cargo build --release --workspace --locked
# Where cargo put it: CARGO_TARGET_DIR if set, as scripts/package.sh reads it.
exec "${CARGO_TARGET_DIR:-target}/release/hvmctl" demo "$@"
