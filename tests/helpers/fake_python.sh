#!/bin/bash
# Stand-in interpreter for tests/test_slurm_scripts.py: `-m ccmega.cli ARG...` runs tests/fake_ccmega.py,
# anything else the real interpreter $FAKE_REAL_PYTHON (the scripts also read status.json with it).
if [ "${1:-}" = -m ] && [ "${2:-}" = ccmega.cli ]; then
    shift 2
    exec "$FAKE_REAL_PYTHON" "$(dirname "${BASH_SOURCE[0]}")/fake_ccmega.py" "$@"
fi
exec "$FAKE_REAL_PYTHON" "$@"
