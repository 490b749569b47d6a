"""The whole of orderflow on one machine, for development: `make run` (`python -m devstack`), and
the stack that the end-to-end tests and the benchmarks start. Not a deployable service."""
