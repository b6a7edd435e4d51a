#!/usr/bin/env bash
# Training run for profile-guided optimization (`make pgo`, used by the `make bench*`
# targets): runs an instrumented kairos binary over the work the benchmarks measure,
# at a smaller size and on its own generated traffic (never the benchmark's files), so
# the optimized build learns which paths are hot.
#
# usage: deploy/pgo/train.sh INSTRUMENTED_KAIROS WORK_DIR
set -euo pipefail
kairos="$1"
work="$2"
config="$(dirname "$0")/../../config/kairos.toml"

rm -rf "$work"
mkdir -p "$work"
events="$work/events.jsonl"
# The benchmarks' traffic: no catalog changes (see BENCH_GENERATE in the Makefile).
KAIROS__GENERATOR__CATALOG_CHANGE_SHARE=0 "$kairos" --config "$config" generate --to-file "$events" \
  --count 400000 --customers 40000 --span-days 90

# The whole replay (identity, profile, catalog join, arbiter), as production commits.
KAIROS__STATE__MAX_BATCH_RECORDS=10000 "$kairos" --config "$config" replay \
  --state-dir "$work/full" --output /dev/null "$events"
# The profile benchmark's shape: profile and catalog only, large batches.
KAIROS__IDENTITY__ENABLED=false KAIROS__STATE__MAX_BATCH_RECORDS=100000 \
  "$kairos" --config "$config" replay --no-arbiter \
  --state-dir "$work/profile" --output /dev/null "$events"
# The arbiter benchmark, both of its usual scenarios.
for scenario in browse_abandonment abandoned_cart; do
  KAIROS__STATE__MAX_BATCH_RECORDS=100000 "$kairos" --config "$config" bench-arbiter \
    --count 200000 --customers 100000 --scenario "$scenario" \
    --state-dir "$work/arbiter-$scenario"
done
# The identity and delivery benchmarks.
KAIROS__STATE__MAX_BATCH_RECORDS=10000 "$kairos" --config "$config" bench-identity \
  --state-dir "$work/identity" "$events"
"$kairos" --config "$config" bench-delivery --channel email --count 50000 \
  --state-dir "$work/delivery"
rm -rf "$work"
