"""Helpers shared by the family modules: the Family interface, quantizers, PT2E."""
