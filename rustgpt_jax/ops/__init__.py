"""Attention operators: the reference, the blocked XLA path and the dispatch."""
