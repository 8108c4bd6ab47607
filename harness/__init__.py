"""What the tests and the benchmark share to drive real processes: starting and stopping them
(:mod:`harness.processes`) and reading a turn's server-sent events (:mod:`harness.sse`).

Not part of the product: it is not shipped in the wheel (pyproject.toml's ``packages.find``
takes ``hosting`` and ``research_agent`` only) and imports nothing of ``hosting``.
"""
