"""edge-msd: distil a CLIP-style teacher into a small student and ship it to edge devices."""

__version__ = "0.1.0"
