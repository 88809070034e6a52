"""Training utilities shared by the experiment binaries.

Modules (import the one you need; `checkpoint` pulls in orbax):
  workdir: the workdir's JSON files, metrics log, params hash, environment info.
  checkpoint: state + privacy ledger saved together, atomically (orbax).
  seeds: 64-bit root keys; the secret seed (`--secret_seed`) that releases never show.
  resume: a run's start: config pinned, state + ledger restored, budget guard.
  preemption: SIGTERM in a training loop -> checkpoint that step, exit 143.
  progress: one-line progress reports with rate and ETA.
  run_clock: a run's wall time across the invocations it resumed through.
  divergence: NaN or inf in a run's parameters or losses, told once and summarised.
  cli: absl `run` and `check` that turn bad flags into exit code 2 and one line.
"""
