"""Dataset preparation for s4v: annotation parsers, PyAV transcoding and WebDataset shard writing.

- `python -m data_prep.shard`: one command per dataset (Kinetics-400, SSv1/v2, MSR-VTT, MSVD, VATEX,
  a class-per-folder tree or a manifest) -> `{split}-NNNNNN.tar` + `.idx` + `{split}-index.json`.
- `python -m data_prep.synthetic`: a small order-dependent synthetic video dataset in the same format.
"""
