#!/usr/bin/env bash
# Installs what the test suite needs beyond Rust: redis-server, the psql
# client (Debian package postgresql-client), and the Python
# packages the e2e tests drive (ocpp with its 1.6/2.0.1/2.1 modules,
# websockets, deltalake, moto[server], aiosmtpd, pytest, psycopg[binary], and
# nbclient, nbformat, ipykernel, pandas, matplotlib for the notebooks). Idempotent and
# quiet when everything is present: a stamp keyed by this script's hash makes
# reruns instant. Works when executed and when sourced (scripts/test does).

csms_install_test_deps() {
    local script="${BASH_SOURCE[0]}"
    local hash stamp_dir stamp python
    python="${PYTHON:-python3}"
    hash="$(sha256sum "$script" | cut -c1-16)"
    stamp_dir="${XDG_CACHE_HOME:-$HOME/.cache}/csms-test-deps"
    stamp="$stamp_dir/$hash.stamp"

    # Cheap checks even with a stamp: a machine can lose packages.
    if [[ -f "$stamp" ]] && command -v redis-server >/dev/null 2>&1 \
        && command -v redis-cli >/dev/null 2>&1 \
        && command -v psql >/dev/null 2>&1 \
        && "$python" -c 'import ocpp.v16, ocpp.v201, ocpp.v21, websockets, deltalake, psycopg, nbclient, pandas, matplotlib' >/dev/null 2>&1; then
        return 0
    fi

    if ! command -v "$python" >/dev/null 2>&1; then
        echo "install-test-deps: $python not found" >&2
        return 1
    fi

    # redis-cli (redis-tools, a dependency of redis-server) reads keys in e2e tests.
    if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
        echo "install-test-deps: installing redis-server and redis-cli" >&2
        local sudo=""
        [[ "$(id -u)" -ne 0 ]] && sudo="sudo"
        $sudo apt-get update -qq >/dev/null || return 1
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server redis-tools >/dev/null || return 1
    fi

    # psql: the real client of the PostgreSQL wire protocol tests.
    if ! command -v psql >/dev/null 2>&1; then
        echo "install-test-deps: installing postgresql-client (psql)" >&2
        local sudo=""
        [[ "$(id -u)" -ne 0 ]] && sudo="sudo"
        $sudo apt-get update -qq >/dev/null || return 1
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql-client >/dev/null || return 1
    fi

    # websockets>=14 for `additional_headers`; ocpp>=2.1 for ocpp.v21;
    # deltalake>=1.0 for QueryBuilder without pyarrow; the notebooks read SQL
    # results as JSON into pandas, so they need no pyarrow either.
    local pkgs=("ocpp>=2.1" "websockets>=14" "deltalake>=1.0" "moto[server]>=5" "aiosmtpd>=1.4" "pytest>=8" "psycopg[binary]>=3.1"
        "nbclient>=0.10" "nbformat>=5.9" "ipykernel>=6.29" "pandas>=2.0" "matplotlib>=3.8")
    if ! "$python" - "${pkgs[@]}" >/dev/null 2>&1 <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
import re
for spec in sys.argv[1:]:
    name, minimum = re.match(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?>=(.+)", spec).groups()
    try:
        have = version(name)
    except PackageNotFoundError:
        sys.exit(1)
    def key(v):
        return [int(x) for x in re.findall(r"\d+", v)[:3]]
    if key(have) < key(minimum):
        sys.exit(1)
PY
    then
        echo "install-test-deps: installing Python packages: ${pkgs[*]}" >&2
        "$python" -m pip install --quiet --disable-pip-version-check "${pkgs[@]}" \
            || "$python" -m pip install --quiet --disable-pip-version-check --user "${pkgs[@]}" \
            || return 1
    fi

    if ! "$python" -c 'import ocpp.v16, ocpp.v201, ocpp.v21, websockets, deltalake, moto, aiosmtpd, psycopg, nbclient, ipykernel, pandas, matplotlib' >/dev/null 2>&1; then
        echo "install-test-deps: Python packages still missing after install (need ocpp with v16, v201 and v21)" >&2
        return 1
    fi

    if ! command -v cargo-nextest >/dev/null 2>&1; then
        echo "install-test-deps: cargo-nextest not found; scripts/test falls back to cargo test" >&2
    fi

    mkdir -p "$stamp_dir" && rm -f "$stamp_dir"/*.stamp && touch "$stamp"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    csms_install_test_deps
else
    csms_install_test_deps || { echo "install-test-deps: failed" >&2; return 1; }
fi
