#!/bin/bash
# Times a leader failover as a client sees it: starts a fresh `warden up` cluster in a
# temporary directory, SIGKILLs the leader, and polls `warden ctl status` (every 20 ms, at most
# 500 times) until another node answers as leader. Prints the time; kills what it started.
# Usage: cluster/leader-failover.sh [path/to/warden]   (default: target/release/warden)
set -u
BIN=$(realpath "${1:-target/release/warden}")
D=$(mktemp -d)
cd "$D" || exit 1
"$BIN" up --dir "$D/.warden/up" --fresh > "$D/up.log" 2>&1 &
UP=$!
trap 'kill $UP 2>/dev/null; wait $UP 2>/dev/null; cd /; rm -rf "$D"' EXIT
for _ in $(seq 1 150); do "$BIN" ctl status >/dev/null 2>&1 && break; sleep 0.2; done
sleep 3
leader_of() {
  timeout 2 "$BIN" ctl --json status 2>/dev/null |
    python3 -c 'import sys,json; d=json.load(sys.stdin); print(d.get("leader") or "")' 2>/dev/null
}
L=$(leader_of)
PID=$(pgrep -f " node --id $L --cluster.*$D" | head -1)
[ -n "$PID" ] || { echo "no leader process found"; exit 1; }
T0=$(date +%s%N)
kill -9 "$PID"
NL=""
for _ in $(seq 1 500); do
  NL=$(leader_of)
  [ -n "$NL" ] && [ "$NL" != "$L" ] && break
  sleep 0.02
done
T1=$(date +%s%N)
echo "leader $L killed; node $NL answers as leader after $(( (T1 - T0) / 1000000 )) ms"
