#!/usr/bin/env bash
# Run every test of the workspace: builds the guest image if needed (scripts/build-guest.sh),
# builds all targets, then `cargo test --workspace`. Extra arguments go to `cargo test`, e.g.
#   scripts/test-all.sh                      # everything
#   scripts/test-all.sh -- --nocapture       # show the tests' stderr
#   scripts/test-all.sh --test guest_boot    # one test file
# Every test binary runs even after a failure (--no-fail-fast); exits non-zero when anything
# failed, after listing the failures.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

step() { echo "=== test-all: $* ($(date -u +%H:%M:%S))" >&2; }
start=$SECONDS

step "guest image (scripts/build-guest.sh)"
scripts/build-guest.sh

step "cargo build --workspace --all-targets"
cargo build --workspace --all-targets

# --no-fail-fast: run every test binary even after a failure; cargo still exits non-zero.
step "cargo test --workspace --no-fail-fast $*"
cargo test --workspace --no-fail-fast "$@"

step "all tests passed in $((SECONDS - start)) s"
