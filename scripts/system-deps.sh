#!/usr/bin/env bash
# Installs the Debian packages the test suite runs for real, only when one is missing.
set -euo pipefail
declare -A needs=(
  [redis-server]=redis-server
  [promtool]=prometheus
  [docker-compose]=docker-compose
  [nginx]=nginx-light
)
missing=()
for cmd in "${!needs[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${needs[$cmd]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
