"""Video data: the shard format (shared with data_prep and tests) and the input pipelines."""
