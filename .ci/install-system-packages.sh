#!/usr/bin/env bash
# Install the Debian packages listed in .ci/system-packages.txt (if any are missing).
set -euo pipefail
cd "$(dirname "$0")"
mapfile -t pkgs < <(grep -v '^\s*#' system-packages.txt | tr -s ' \t' '\n' | grep -v '^$' || true)
[ "${#pkgs[@]}" -eq 0 ] && exit 0
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ "${#missing[@]}" -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
