#!/usr/bin/env bash
# The test command: install what the tests need, build Tern (compiled hot paths in place), run
# the tests (failing, not skipping, if the compiled twins did not build), then lint. Extra arguments go to pytest (e.g. ci/test.sh -k spool).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install-system-packages.sh
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
TERN_REQUIRE_COMPILED=1 python3 -m pytest "$@"
python3 -m ruff check engine tests bench
