#!/usr/bin/env bash
# Install Debian's SLURM + munge for the local one-node test cluster (tests/slurm_cluster.py).
# Idempotent and fast when already installed. Always exits 0: when SLURM cannot be installed
# the SLURM tests skip, printing tests/slurm_cluster.py's reason.
set -u

packages=(slurmctld slurmd slurm-client munge)
binaries=(slurmctld slurmd sbatch munged)

have_all_binaries() {
    local b
    for b in "${binaries[@]}"; do
        command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || return 1
    done
}

if have_all_binaries; then
    echo "slurm-install: already installed (${binaries[*]}), nothing to do"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "slurm-install: apt-get not found; cannot install SLURM, the SLURM tests will skip"
    exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        echo "slurm-install: not root and no password-less sudo; cannot install SLURM, the SLURM tests will skip"
        exit 0
    fi
fi

start=$(date +%s)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
echo "slurm-install: installing ${missing[*]:-${packages[*]}}"

export DEBIAN_FRONTEND=noninteractive
# Only refresh the package lists when apt does not know the packages yet (or the install fails).
if ! apt-cache show slurmctld >/dev/null 2>&1; then
    echo "slurm-install: apt-get update"
    "${sudo[@]}" apt-get update -qq -o DPkg::Lock::Timeout=300 || echo "slurm-install: apt-get update failed"
fi
# wait for a concurrent apt/dpkg run rather than failing on its lock
install() {
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 \
        "${packages[@]}" >/tmp/slurm-install.log 2>&1
}
if ! install; then
    echo "slurm-install: install failed; retrying after apt-get update"
    "${sudo[@]}" apt-get update -qq -o DPkg::Lock::Timeout=300 || true
    if ! install; then
        tail -n 20 /tmp/slurm-install.log
        echo "slurm-install: apt-get install failed; the SLURM tests will skip"
        exit 0
    fi
fi

# The Debian packages try to start the services; the test harness runs its own daemons with its
# own config, so stop any the package scripts started (no-op without systemd).
for svc in slurmctld slurmd; do
    command -v systemctl >/dev/null 2>&1 && "${sudo[@]}" systemctl disable --now "$svc" >/dev/null 2>&1 || true
done

if have_all_binaries; then
    echo "slurm-install: installed ${packages[*]} in $(( $(date +%s) - start )) s"
else
    echo "slurm-install: packages installed but binaries missing (${binaries[*]}); the SLURM tests will skip"
fi
exit 0
