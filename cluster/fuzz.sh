#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for a bounded time, from the corpus kept in
# fuzz/corpus; new finds go to a scratch directory, a crash fails the run and leaves its input
# in fuzz/artifacts. Usage: cluster/fuzz.sh [seconds per target, default 15] [target...]
# For hours: cluster/fuzz.sh 3600 registry_apply (or cargo fuzz run -s none -O <target>).
# Needs cargo-fuzz (cargo install cargo-fuzz); builds on stable Rust without a sanitizer.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-15}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(command forward_batch raft_rpc log_entry snapshot registry_apply)
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
# Sixteen codegen units (cargo-fuzz uses one unless told) and fuzz/Cargo.toml's opt-level 1 keep
# the instrumented build of every dependency near six minutes on two cores (ten before); the
# runs lose little (registry_apply: 13,800 inputs in 15 s against 14,900).
flags=(-s none -O --codegen-units 16)
cargo fuzz build "${flags[@]}"
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t"
  echo "fuzz: $t for ${seconds}s"
  status=0
  cargo fuzz run "${flags[@]}" "$t" "$scratch/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -max_len=65536 -print_final_stats=1 >"$scratch/$t.log" 2>&1 \
    || status=$?
  grep -E "^stat::(number_of_executed_units|new_units_added)" "$scratch/$t.log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 40 "$scratch/$t.log" >&2
    echo "fuzz: $t failed; its input is in fuzz/artifacts/$t" >&2
    exit 1
  fi
done
