#!/usr/bin/env bash
# Installs what the tests need (scripts/setup.sh), builds once, and runs the whole suite
# in parallel with cargo-nextest. Integration tests start their own SeaweedFS servers.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# One clean build: incremental state would only add gigabytes of disk a CI run never reuses.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo nextest run --workspace --no-fail-fast "$@"
