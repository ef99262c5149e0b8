"""The ``edge-msd`` command line: one verb per pipeline stage; each parses, then calls one function.

Heavy imports (torch, open_clip, converters) happen inside the verbs so that ``--help`` is fast.
"""

from __future__ import annotations

import sys

import click

from edge_msd import __version__
from edge_msd.errors import EdgeMSDError


class _Group(click.Group):
    """Turns EdgeMSDError into one clear line on stderr and exit status 2 (no traceback)."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except EdgeMSDError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="edge-msd")
def main() -> None:
    """Distil a CLIP-style teacher into a small student, quantize and export it per device, and
    benchmark it on the device.

    \b
    teacher ─▶ features ─▶ distill ─▶ qat ─▶ export ─▶ bundle ─▶ bench on device
    """


# ==== data, teachers, feature cache (issue 2) ==============================================

# ==== students, distillation, evaluation (issue 3) =========================================

# ==== quantization, calibration (issue 5) ==================================================

# ==== targets, export, bundles, engines (issue 4) ==========================================

# ==== on-device benchmark and reports (issue 6) ============================================

# ==== the whole pipeline on the embedded demo ==============================================


if __name__ == "__main__":
    main()
