"""Training: one loop (:mod:`trainer.trainer`) for every stage, with a component per concern.

At the top, the loop and its plumbing: :mod:`.trainer` (the :class:`~trainer.trainer.Trainer`, which reads as the
algorithm), :mod:`.worker` (one rank's entry point), :mod:`.config` (the one config schema), :mod:`.run_dir` (every
path of a run), :mod:`.loaders` (a run's loaders), :mod:`.step` (the optimizer step), :mod:`.evaluation` (the
evaluation loop), :mod:`.optim` (AdamW and the schedule), :mod:`.distributed`, :mod:`.rendezvous` (a free port),
:mod:`.engine` (DeepSpeed), :mod:`.zero`, :mod:`.export` (atomic writes).

The local launcher imports only what needs no torch (``config``, ``run_dir``, ``export``, ``rendezvous``, the
``resilience`` protocol modules, ``observability.tracking`` and ``.logger``): its start-up stays under a second.

- :mod:`trainer.stages`: the stage contract and the stages (FCMAE pretraining, fine-tuning, detection).
- :mod:`trainer.resilience`: checkpoints, preemption, rollbacks, locks, failures (what fault tolerance rests on).
- :mod:`trainer.observability`: MLflow, metrics, logging, probes, profiling.

Dependencies point one way: the loop -> stages, resilience, observability -> the plumbing -> ``models``, ``data``.
"""
