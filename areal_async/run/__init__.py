"""The composition root: the run (trainer, Ray cluster, CLI, SFT) builds the parts.

The only package of areal_async that imports `actors`, `learners` and `evaluation`; the rest of the core imports
none of them (tests/test_layering.py checks it).
"""
