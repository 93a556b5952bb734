#!/usr/bin/env bash
# Build the Debian package of host-agent and hvmctl: release binaries and plugins, man
# pages and shell completions made by the built binaries (clap_mangen, clap_complete),
# then cargo-deb (host-agent/Cargo.toml [package.metadata.deb]). Prints the package's
# path and its file list. Install with `dpkg -i`; see README "Packaging".
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
cargo build --release -p hvm-host-agent -p hvmctl -p hvm-plugin-stateless -p hvm-plugin-mode-select \
    -p hvm-plugin-pre-update -p hvm-plugin-file -p hvm-plugin-nbd -p hvm-plugin-rbd
target="${CARGO_TARGET_DIR:-target}/release"
doc="$target/hvm-doc"
rm -rf "$doc"
mkdir -p "$doc/man" "$doc/completions"
"$target/hvmctl" man "$doc/man" >/dev/null
"$target/host-agent" man "$doc/man" >/dev/null
gzip -9n "$doc"/man/*.1
"$target/hvmctl" completions bash >"$doc/completions/hvmctl.bash"
"$target/hvmctl" completions zsh >"$doc/completions/_hvmctl"
"$target/hvmctl" completions fish >"$doc/completions/hvmctl.fish"
mkdir -p target/debian
# --strip: the release profile keeps line tables (debug = 1) for backtraces; the package
# ships stripped binaries.
deb=$(cargo deb -p hvm-host-agent --no-build --strip --output target/debian/ | tail -n 1)
echo "$deb"
dpkg-deb -c "$deb"
