#!/usr/bin/env bash
# The whole test suite: formatting, lints (warnings are errors), unit and integration tests,
# then a short chaos run (real faults against real node processes, guarantees checked).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo nextest run --workspace --profile ci
# The embedding example: a node with a kind of its own, driven through the Rust client.
cargo run --quiet --example embedded_kind
cargo build --quiet --bin warden -p warden
cargo build --quiet --bin warden-chaos -p warden-chaos
bin="${CARGO_TARGET_DIR:-target}/debug"
"$bin/warden-chaos" --scenario chaos/scenarios/ci.toml --warden "$bin/warden"
# Every fuzz target for a bounded time from the kept corpus (cluster/fuzz.sh; needs cargo-fuzz).
bash cluster/fuzz.sh "${FUZZ_SECONDS:-10}"
