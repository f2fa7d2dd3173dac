#!/usr/bin/env bash
# Installs what Warden needs beyond the Rust toolchain: nats-server (nodes and tests talk to
# it), iptables and iproute2 (the chaos harness cuts links with them), and promtool (Debian
# package prometheus: the tests check every node's metrics exposition with it). Uses apt-get when run
# as root on Debian/Ubuntu; otherwise says what to install.
set -euo pipefail
need=()
command -v nats-server >/dev/null 2>&1 || need+=(nats-server)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Packages only, no services: the prometheus package would start a Prometheus server.
  no_start=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    no_start=1
  fi
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  if [ "$no_start" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
else
  echo "missing: ${need[*]}. Install them (Debian/Ubuntu: sudo apt-get install ${need[*]};" \
       "macOS: brew install nats-server) and run this again." >&2
  exit 1
fi
