#!/usr/bin/env bash
# The whole test suite: formatting, lints (warnings are errors), unit and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo nextest run --workspace --profile ci
