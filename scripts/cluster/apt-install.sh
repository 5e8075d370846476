#!/usr/bin/env bash
# `apt-get install` of the named Debian packages for the cluster scripts, as a fresh machine needs it:
# waits for the package manager's lock (a freshly booted machine's daily apt jobs hold it for minutes),
# retries downloads, and updates the package lists only when the first try fails (they may be empty or stale).
set -euo pipefail
apt() {
    DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3 "$@" >/dev/null
}
apt install -y --no-install-recommends "$@" || { apt update && apt install -y --no-install-recommends "$@"; }
