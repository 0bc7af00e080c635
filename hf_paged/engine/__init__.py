"""Continuous-batching engine: scheduling, running, sampling and detokenizing requests."""
