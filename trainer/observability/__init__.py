"""What an operator sees of a run: every number it reports and where it goes.

- :mod:`.tracking`: the MLflow run (parameters, tags, metrics, artifacts) a requeued job continues.
- :mod:`.logger`: one call per log interval fans the numbers out to the console (its line is formatted here),
  ``metrics.jsonl`` and MLflow.
- :mod:`.metrics`: throughput, data wait, memory, MFU from counted FLOPs, ETA.
- :mod:`.probes`: the pretraining probes (kNN top-1, effective rank, feature cosine distance).
- :mod:`.profiling`: profiler traces over a step range and system metrics.
"""
