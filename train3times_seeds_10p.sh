#!/usr/bin/env bash
# Three seeds of one method with 10 % labeled data, then test and 3-fold evaluation.
# Example: bash train3times_seeds_10p.sh -c 0 -t synapse -m dhc -e '' -l 3e-2 -w 0.1
exec bash "$(dirname "$0")/scripts/train3times.sh" 10 "$@"
