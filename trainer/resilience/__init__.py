"""Keeping a run alive and its state sound: what the guarantees of ``docs/fault-tolerance.md`` rest on.

- :mod:`.checkpoint`: complete, verified checkpoints and the policy of when to save (steps, minutes, a stop request,
  the preemption window); :mod:`.mirror` copies them to an fsspec URL in the background; :mod:`.integrity` hashes.
- :mod:`.recovery`: spike detection, the skip guard for non-finite steps and the rollback that undoes a spike;
  ``rollbacks.jsonl`` and ``segments.jsonl``. :mod:`.ledger`: the sample keys of every step.
- :mod:`.preemption`: signals become a flag that all ranks agree on at a step boundary.
- :mod:`.run_lock`: at most one live run per run directory. :mod:`.watchdog`: a rank that stops stepping.
- :mod:`.failure`: how a failed rank is recorded and summarised. :mod:`.faults`: test-only fault injection.
"""
