"""What the tests and the benchmarks both use to run the real thing: processes on loopback, tiny checkpoints.

Neither shipped (the wheel packages ``model`` and ``service`` only) nor part of ``bench/``, so a test never
imports a benchmark to start a server.
"""
