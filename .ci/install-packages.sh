#!/usr/bin/env bash
# Install Debian packages for the tests, non-interactively, quietly and idempotently:
#   bash .ci/install-packages.sh PACKAGE...
# When every package is already installed it returns at once without touching apt. Needs root
# (Debian 12). The packages' own services are not started: while installing, a policy-rc.d that
# refuses service starts is put in place unless one exists already.
set -euo pipefail

packages=("$@")

missing=()
for package in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$package")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install-packages: ${packages[*]} already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-packages: must run as root to install: ${missing[*]}" >&2
    exit 1
fi

# apt's and dpkg's chatter goes to a log that is shown only if something fails.
log=$(mktemp)
policy=/usr/sbin/policy-rc.d
cleanup=(rm -f "$log")
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    cleanup+=("$policy")
fi
trap '"${cleanup[@]}"' EXIT

export DEBIAN_FRONTEND=noninteractive
echo "install-packages: installing ${missing[*]}"
started=$SECONDS
if ! {
    apt-get update -qq &&
        apt-get install -y -qq --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            "${packages[@]}"
} >"$log" 2>&1; then
    cat "$log" >&2
    echo "install-packages: apt-get failed (its output is above)" >&2
    exit 1
fi
echo "install-packages: done in $((SECONDS - started)) s"
