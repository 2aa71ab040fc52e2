"""Data layer: WebDataset shards on any fsspec URL, written by ``python -m data.write_shards`` and streamed back.

- :mod:`data.write_shards` / :mod:`data.writer` / :mod:`data.sources`: convert an image folder, a list file,
  Fashion-MNIST or a COCO set into tar shards plus ``manifest.json`` (:mod:`data.manifest`).
- :mod:`data.loader`: ``build_loader(...)``, a rank-balanced, resumable streaming loader
  (slot assignment in :mod:`data.sampling`, tar reading in :mod:`data.reader`, URLs in :mod:`data.storage`).
- :mod:`data.transforms`: the recipe's pretraining, fine-tuning and evaluation transforms and seeded Mixup/CutMix.
- :mod:`data.synthetic`: ``synthetic://N`` batches without I/O, for benchmarks and engine tests.
"""
