#!/usr/bin/env bash
# Install what infogap needs on a fresh Debian/Ubuntu machine; safe to run again.
#   - redis-server and redis-tools (redis-cli) (apt, only if missing; needs root or sudo)
#   - chromium and chromium-driver (apt, only if missing): the console's browser tests
#   - the infogap package with its test extras, editable, from this checkout
#   - the Apache Kafka jars of deploy/pom.xml, copied by Maven into $INFOGAP_LOCAL_DIR/kafka-libs (~/.infogap)
# Java 17+ and Maven are prerequisites (apt-get install -y openjdk-17-jre-headless maven).
# Environment: PYTHON (default python3), INFOGAP_LOCAL_DIR, INFOGAP_MAVEN_REPO, PIP_ARGS (extra pip arguments).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

say() { printf '[install] %s\n' "$*" >&2; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root for: $* (run as root, or install sudo)"
    fi
}

# --- prerequisites: Java 17+ and Maven
command -v java >/dev/null 2>&1 \
    || die "java not found; Kafka 4.3 needs Java 17+: apt-get install -y openjdk-17-jre-headless"
java_major="$(java -XshowSettings:properties -version 2>&1 \
    | awk -F'= ' '/java.specification.version/ {print $2}' | cut -d. -f1)"
[ -n "$java_major" ] && [ "$java_major" -ge 17 ] 2>/dev/null \
    || die "java ${java_major:-unknown} found; Kafka 4.3 needs Java 17+: apt-get install -y openjdk-17-jre-headless"
command -v mvn >/dev/null 2>&1 || die "mvn not found; the Kafka jars are fetched with Maven: apt-get install -y maven"
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; infogap needs Python 3.11+"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$("$PYTHON" --version 2>&1) found; infogap needs Python 3.11+ (set PYTHON=python3.11)"
say "java $java_major, $(mvn -v 2>/dev/null | head -1 | sed 's/\x1b\[[0-9;]*m//g'), $("$PYTHON" --version 2>&1)"

# --- redis-server, and redis-cli (redis-tools) that `infogap up --redis-cluster N` uses to create the cluster
if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
    say "redis-server present: $(redis-server --version | cut -d' ' -f1-3)"
else
    say "installing redis-server and redis-tools (apt)"
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server redis-tools
    command -v redis-server >/dev/null 2>&1 || die "redis-server still not on PATH after apt-get install"
    command -v redis-cli >/dev/null 2>&1 || die "redis-cli still not on PATH after apt-get install"
fi

# --- Chromium and its driver (Debian's packages) for the console's browser tests (tests/integration/test_console.py)
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    say "chromium present: $(chromium --version 2>/dev/null | head -1)"
else
    say "installing chromium and chromium-driver (apt)"
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver
    command -v chromedriver >/dev/null 2>&1 || die "chromedriver still not on PATH after apt-get install chromium-driver"
fi

# --- the Python package
"$PYTHON" -m pip --version >/dev/null 2>&1 \
    || die "pip is missing for $PYTHON: apt-get install -y python3-pip (or use a virtualenv)"
say "pip install -e '.[test]' in $ROOT"
# shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
if ! (cd "$ROOT" && "$PYTHON" -m pip install ${PIP_ARGS:-} -e '.[test]'); then
    die "pip install failed; on a Debian system Python (externally managed) activate a virtualenv first:
    python3 -m venv .venv && . .venv/bin/activate && deploy/install.sh"
fi

# --- Kafka jars (no-op when deploy/pom.xml has not changed since the last fetch)
say "fetching the Kafka jars (deploy/pom.xml)"
(cd "$ROOT" && "$PYTHON" -c '
import logging
logging.basicConfig(level=logging.INFO, format="[install] %(message)s")
from infogap.stream.tools.local import fetch_kafka_jars
from infogap.stream.settings import load
fetch_kafka_jars(load())
')
say "done; start the local servers with: infogap up"
