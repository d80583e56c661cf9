#!/usr/bin/env bash
# System tools that Ferry's tests and benchmark run for real: redis-server (cache tests), promtool and
# prometheus (rule tests, scrape test), wrk (benchmark), chromium (the /docs page, headless). Installs
# what is missing from Debian's packages when run as root with apt-get; otherwise says exactly what is
# missing and how to get it.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v amtool >/dev/null 2>&1 || need+=(prometheus-alertmanager)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
((${#need[@]})) || exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "tools.sh: installing ${need[*]} from Debian's packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  # policy-rc.d keeps the packages from starting their own daemons on install.
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
else
  echo "tools.sh: missing ${need[*]}: install them (Debian/Ubuntu: sudo apt-get install ${need[*]})" >&2
  exit 1
fi
