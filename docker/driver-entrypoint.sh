#!/bin/sh
# Entry point of the `kdplatform` compose service: join the Ray cluster at $1 as a node with no CPUs and
# no GPUs (a Ray driver must run on a node of its cluster; trials still go to the workers), then run
# `kdplatform` with the remaining arguments, e.g. `sweep sweeps/quickstart.yaml --address ray-head:6379`.
set -eu
head_address="$1"
shift
ray start --address="$head_address" --num-cpus=0 --num-gpus=0 --disable-usage-stats >&2
exec kdplatform "$@"
