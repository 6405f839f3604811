#!/usr/bin/env bash
# The README's main job on the embedded default (CPU, ~10 minutes): data stats of the bundled
# trajectories, then klong-rl experiment=rl_demo: a tiny Megatron GPT -> trajectory-splitting SFT on
# scripted-expert trajectories -> two progressive RL stages with a dev server, bubblewrap sandboxes and
# check-command rubrics; it prints the held-out judge score after each phase (outputs under outputs/).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v bwrap >/dev/null; then   # the agent's sandboxes (sandbox=bwrap)
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null
    else
        echo "demo: needs bubblewrap (apt-get install bubblewrap), or run with sandbox=docker" >&2
        exit 1
    fi
fi
.venv/bin/klong-data stats
.venv/bin/klong-rl experiment=rl_demo "$@"
