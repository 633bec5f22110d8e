#!/usr/bin/env bash
# Idempotent: installs etcd 3.4 (.tools/bin/etcd and .tools/bin/etcdctl) for the tests of kvgate's
# etcd discovery (crates/kvgate-runtime/tests/etcd.rs), which run a real etcd next to the real
# Dynamo mocker started with `--discovery-backend etcd`.
#
# The binaries come from Debian's packages `etcd-server` (usr/bin/etcd) and `etcd-client`
# (usr/bin/etcdctl), both linked only to libc: we unpack the .debs with dpkg-deb and take those
# two files (no system-wide install, no service, no user). Debian's revision of 3.4.23 changes
# with point releases (-4+b4, ...), so we take the candidate and check the binaries' versions.
# `grep >/dev/null`, not `grep -q`: grep reads all of --version's lines, so the binary never gets
# SIGPIPE (a failure under pipefail).
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="$PWD/.tools"

ETCD_VERSION=3.4.23

etcd_ok() {
  "$TOOLS/bin/etcd" --version 2>/dev/null | grep -F "etcd Version: $ETCD_VERSION" >/dev/null \
    && "$TOOLS/bin/etcdctl" version 2>/dev/null | grep -F "etcdctl version: $ETCD_VERSION" >/dev/null
}

if etcd_ok; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
  echo "setup-etcd: apt-get and dpkg-deb are needed to fetch etcd (Debian packages etcd-server, etcd-client)" >&2
  exit 1
fi

echo "setup-etcd: installing etcd $ETCD_VERSION into $TOOLS/bin (Debian packages etcd-server, etcd-client)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The package lists may be missing or stale on a fresh machine: update them once and retry.
if ! (cd "$tmp" && apt-get download -q etcd-server etcd-client >/dev/null 2>&1) \
   && ! { apt-get update -q >/dev/null && (cd "$tmp" && apt-get download -q etcd-server etcd-client >/dev/null); }; then
  echo "setup-etcd: could not download the Debian packages etcd-server and etcd-client (apt-get download failed, also after apt-get update)" >&2
  exit 1
fi
for deb in "$tmp"/etcd-server_*.deb "$tmp"/etcd-client_*.deb; do
  if [ ! -s "$deb" ] || ! dpkg-deb -x "$deb" "$tmp/x"; then
    echo "setup-etcd: could not unpack $deb" >&2
    exit 1
  fi
done
for bin in etcd etcdctl; do
  if [ ! -s "$tmp/x/usr/bin/$bin" ]; then
    echo "setup-etcd: the Debian packages etcd-server/etcd-client have no usr/bin/$bin" >&2
    exit 1
  fi
done
mkdir -p "$TOOLS/bin"
for bin in etcd etcdctl; do
  install -m 0755 "$tmp/x/usr/bin/$bin" "$TOOLS/bin/$bin.tmp" && mv -f "$TOOLS/bin/$bin.tmp" "$TOOLS/bin/$bin"
done

if ! etcd_ok; then
  echo "setup-etcd: $TOOLS/bin/etcd (Debian's $(apt-cache policy etcd-server | awk '/Candidate:/ {print $2}')) does not report version $ETCD_VERSION: $("$TOOLS/bin/etcd" --version 2>&1 | awk 'NR==1'); $("$TOOLS/bin/etcdctl" version 2>&1 | awk 'NR==1')" >&2
  exit 1
fi
echo "setup-etcd: ok ($("$TOOLS/bin/etcd" --version | awk 'NR==1'))"
