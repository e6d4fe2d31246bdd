"""Reproducible benchmarks of the chest X-ray bundle: data pipeline, training throughput, central AUC.

Run them with ``python -m benchmarks.run NAME [NAME ...] | all`` from the repository root; results go
to ``benchmarks/results/<name>.{json,md}`` and ``docs/benchmarks.md`` is regenerated from them.
"""
