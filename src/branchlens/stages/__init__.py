"""Stages: each reads a run folder through Run, calls the libraries, writes its own files."""
