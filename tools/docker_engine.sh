#!/usr/bin/env bash
# Placeholder: starts dockerd and builds the local base image (filled in by the sandbox work).
exit 0
