"""Thin Ray actors over `pipeline/`: adaptation workers and the parameter server."""
