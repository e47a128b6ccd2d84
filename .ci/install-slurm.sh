#!/usr/bin/env bash
# Install the Debian packages that tests/slurm/cluster.sh needs for its one-node
# Slurm 22.05 test cluster: slurm-wlm (slurmctld, slurmd, client commands), munge,
# slurmdbd and mariadb-server (slurmdbd stores accounting only into MySQL/MariaDB,
# and submitit reads job states only through sacct).
#
# Non-interactive, quiet and idempotent: when every package is already installed
# it returns at once without touching apt. Needs root (Debian 12).
#
# The packages' own services are not started: cluster.sh runs private daemons
# with every file under $GRIDRUNNER_SLURM_DIR. While installing, a policy-rc.d
# that refuses service starts is put in place unless one exists already.
set -euo pipefail

packages=(slurm-wlm munge slurmdbd mariadb-server)

missing=()
for package in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$package")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install-slurm: ${packages[*]} already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-slurm: must run as root to install: ${missing[*]}" >&2
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
echo "install-slurm: installing ${missing[*]}"
started=$SECONDS
if ! {
    apt-get update -qq &&
        apt-get install -y -qq --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            "${packages[@]}"
} >"$log" 2>&1; then
    cat "$log" >&2
    echo "install-slurm: apt-get failed (its output is above)" >&2
    exit 1
fi
echo "install-slurm: done in $((SECONDS - started)) s"
