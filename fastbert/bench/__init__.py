"""``fastbert bench``: what fastbert buys on this machine, measured against transformers in the same run."""

from fastbert.bench.runner import run

__all__ = ["run"]
