#!/usr/bin/env bash
# Put promtool at $1 (make install-dev: .venv/bin/promtool). It checks and unit-tests the
# alert rules, and is the one file taken from Debian's `prometheus` package: installing the
# package would set up and start a Prometheus service. `apt-get download` needs no root but
# needs the package lists; on a fresh machine (no lists, or lists older than the mirror's
# package) root refreshes them once and retries. The binary is checked to run before it is
# moved into place, so a failure leaves nothing behind and the next `make` tries again.
set -euo pipefail

target=$1
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
  echo "promtool: needs apt-get and dpkg-deb (Debian, Ubuntu); or put promtool 2.x at $target" >&2
  exit 1
fi

tmp=$(mktemp -d "$(dirname "$target")/.promtool.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

download() {
  (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User="$(id -un)" prometheus)
}

if ! download; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "promtool: apt-get download prometheus failed: run 'sudo apt-get update', then make" >&2
    exit 1
  fi
  echo "promtool: apt-get update, then downloading again"
  if ! { apt-get update -qq && download; }; then
    echo "promtool: apt-get download prometheus failed after an update (mirror unreachable?)" >&2
    exit 1
  fi
fi

dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
if ! version=$("$tmp/usr/bin/promtool" --version 2>&1); then
  echo "promtool: the extracted binary does not run: $version" >&2
  exit 1
fi
mv "$tmp/usr/bin/promtool" "$target"
touch "$target"  # newer than this script: make does not fetch it again
echo "$version" | head -n 1
