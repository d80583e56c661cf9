"""``ferry check``: the promotion gate. A candidate version is loaded exactly as ``ferry serve`` loads it
(``ModelSet``: the registry's resolution and download, the flavor allow-list, the device, the batcher and
the warm-up), run beside the version it would replace on the same inputs, measured, and judged by a
small policy file.

- ``data.py``: the inputs: the model's input example, or a reference data set (CSV, Parquet, JSON lines)
  decoded to the signature as a request is, and its labels.
- ``measure.py``: the numbers: output agreement, accuracy, latency quantiles, throughput.
- ``policy.py``: the thresholds (TOML, documented defaults) and the checks they make.
- ``report.py``: ``report.md``, ``report.json``, ``latency.svg`` and the printed summary.
- ``command.py``: the command itself: load, run, measure, judge, report; its exit status.
"""
