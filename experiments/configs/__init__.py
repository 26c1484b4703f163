"""ml_collections configs for `experiments.run_suite` (``--config path.py[:key=value,...]``)."""
