#!/usr/bin/env bash
# Installs what tests/slurm_cluster.py needs for a one-node SLURM cluster: slurmctld, slurmd, the
# client commands (srun, sbatch, scontrol) and munge, from the system's packages (Debian/Ubuntu apt).
#
# Idempotent: it does nothing when they are installed already. It needs root and apt-get; without them
# it exits 3 and says so (the tests then skip). Concurrent callers are serialized by a lock, since
# pytest-xdist workers may call it together. It never starts a daemon: the test fixture does that, with
# its own configuration.
set -euo pipefail

installed() {
  command -v slurmctld && command -v slurmd && command -v srun && command -v munged
} >/dev/null

installed && exit 0
if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
  echo "install_slurm.sh: SLURM is not installed, and installing it needs root and apt-get" >&2
  exit 3
fi
exec 9>/tmp/jaxlm-install-slurm.lock
flock 9
installed && exit 0 # another caller installed them while this one waited

# Debian's maintainer scripts would start the daemons with the default configuration; keep them down.
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; then
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
installed || {
  echo "install_slurm.sh: apt-get finished, but slurmctld, slurmd, srun or munged is still missing" >&2
  exit 1
}
