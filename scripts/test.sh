#!/usr/bin/env bash
# The test command of the README: installs what the tests need on a fresh Debian
# machine, then runs the whole workspace's tests. Used by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use: real NBD clients for the NBD server's tests (qemu-io,
# qemu-img; nbdinfo, nbdfuse; fio's nbd engine), nbdkit and qemu-nbd as the servers of
# NBD legs, systemd-analyze for the unit file, and
# for the backup tests a real PostgreSQL with pgbench on ext4 on a loop device (mkfs.ext4,
# losetup, mount, fsfreeze, runuser, pgrep), and for the RBD tests a throwaway Ceph
# cluster (ceph-mon, ceph-osd, ceph, rbd) and librbd/librados to link the rbd plugin, and
# for the S3 backup tests radosgw on that cluster (buckets made with curl's SigV4) and
# boto3, the S3 benchmark's peer, and jq, zstd and b3sum for the README's restore of a backup
# without hvm (tests/tests/backup_product.rs).
# A test that needs a tool fails
# loudly when it is missing; this list is how a fresh machine gets them.
PACKAGES=(qemu-utils libnbd-bin nbdkit fio systemd postgresql e2fsprogs util-linux mount procps ceph-mon ceph-osd ceph-common librbd-dev librados-dev tgt libiscsi-dev libiscsi-bin iproute2 radosgw curl python3-boto3 jq zstd b3sum)

. scripts/install.sh
# the packaging tests render man pages with man(1) and fake journald in a mount namespace
# (unshare, in util-linux)
PACKAGES+=(man-db)
install_packages "${PACKAGES[@]}"

command -v cargo >/dev/null || { echo "cargo is required (rustup)"; exit 1; }

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log" || status=$?
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
