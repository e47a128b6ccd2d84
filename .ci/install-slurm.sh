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
exec bash "$(dirname "$0")/install-packages.sh" slurm-wlm munge slurmdbd mariadb-server
