#!/usr/bin/env bash
# One device call of the GPU proof (tools/gpu_proof/README.md), run in the repository root there:
#
#   bash tools/gpu_proof/call.sh INDEX COUNT BUDGET_S [STEPS]
#
# Installs the carried wheels (.whl/) into /tmp/site once per machine, takes in .gpu_data/c<INDEX>,
# runs proof.py for BUDGET_S seconds (its steps: STEPS, else chosen by what data is there), then
# writes the results to $OUT whatever happened. State lives in /tmp/proof (kept while the machine is
# warm). Locally (emulation): PROOF_PYTHON=/work/jaxenv/bin/python PROOF_NO_INSTALL=1 JAX_PLATFORMS=cpu
# OUT=/tmp/out PROOF_ARGS="--tiny ..." bash tools/gpu_proof/call.sh 1 3 120
set -u
cd "$(dirname "$0")/../.." || exit 2
I=$1 N=$2 B=$3 STEPS=${4:-auto}
PY=${PROOF_PYTHON:-python3}
W=${PROOF_WORK:-/tmp/proof}
: "${OUT:?OUT is not set}"
mkdir -p "$W" "$OUT"
if [ -z "${PROOF_NO_INSTALL:-}" ]; then
    stamp=$(ls .whl/*.whl 2>/dev/null | xargs -r -n1 basename | sort | md5sum | cut -c1-12)
    if [ -d .whl ] && [ "$(cat /tmp/site/.proof-stamp 2>/dev/null)" != "$stamp" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || { echo "wheel install failed"; exit 2; }
        echo "$stamp" > /tmp/site/.proof-stamp
    fi
    if [ ! -d /tmp/site/keras ]; then
        echo "COLD MACHINE: /tmp/site has no keras (this machine did not run call 1: it was given back after"
        echo "more than 30 s idle, or call 1 was skipped). The chunks sent before are gone too: run call 1 again."
        ls -la /tmp/proof/chunks 2>/dev/null
        exit 3
    fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
# shellcheck disable=SC2086
timeout -k 10 $((B + 20)) "$PY" tools/gpu_proof/proof.py --work "$W" --out "$OUT" call --index "$I" --count "$N" \
    --chunk ".gpu_data/c$I" --budget "$B" --steps "$STEPS" ${PROOF_ARGS:-}
rc=$?
"$PY" tools/gpu_proof/proof.py --work "$W" --out "$OUT" pack --rc "$rc"
echo "call $I/$N: proof.py exit $rc; results in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
