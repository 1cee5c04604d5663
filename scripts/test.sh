#!/usr/bin/env bash
# Installs what the tests need (scripts/setup.sh), builds once, and runs the whole suite
# in parallel with cargo-nextest. Integration tests start their own SeaweedFS servers.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# One clean build: incremental state would only add gigabytes of disk a CI run never reuses.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo nextest run --workspace --no-fail-fast "$@"
# The main commands again with the chunk index built on disk, as on a repository too large
# for the index's memory budget (format.md 5.3), so both ways of reading it stay tested.
if [ $# -eq 0 ]; then
    CUSTOS_INDEX_MEMORY_MB=0 cargo nextest run -p custos-cli --no-fail-fast \
        --test files --test postgres_backup --test postgres_pitr --test postgres_wal --test s3 \
        --test retention --test errors --test security --test audit --test drill \
        --test format_compat
fi
