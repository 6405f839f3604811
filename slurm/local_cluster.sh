#!/usr/bin/env bash
# Placeholder: starts a one-node Slurm cluster for tests (filled in by the SFT trainer work).
exit 0
