#!/usr/bin/env bash
# Runs a local three-node Warden cluster with its own nats-server, and a small demo tree.
# Extra arguments go to `warden up` (for example --fresh, --nodes 5, --dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash cluster/install-deps.sh
cargo build --release --quiet
exec target/release/warden up "$@"
