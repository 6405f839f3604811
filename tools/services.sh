#!/usr/bin/env bash
# Install and start what the docker/slurm/sandbox tests need: Docker engine + a local base image,
# bubblewrap, and a one-node Slurm cluster. Idempotent; needs root on Debian/Ubuntu.
# Without root or apt it says so and returns 0: the matching tests then skip with that reason.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "services: not root or no apt-get; docker/slurm/bwrap tests will skip" >&2
    exit 0
fi
PKGS=(docker.io bubblewrap debootstrap slurm-wlm munge e2fsprogs chromium pandoc)  # chromium: klong-view page tests; pandoc: klong-factory LaTeX
# gVisor's runsc: an optional OCI runtime for the Docker sandboxes (sandbox.runtime=runsc); Debian has it.
apt-cache show runsc >/dev/null 2>&1 && PKGS+=(runsc)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "services: apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
bash tools/docker_engine.sh start
bash tools/docker_engine.sh second  # a second engine on its own socket: sandboxes placed on several engines
bash slurm/local_cluster.sh start
