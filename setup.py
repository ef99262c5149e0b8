"""Ship the device profiles and the demo calibration manifest inside the package.

They are edited where they are (targets/*.toml, calibration/*.json); a built wheel carries copies in
edge_msd/shipped/, where ``edge_msd.paths.shipped`` finds them from any working folder. An editable
install reads the top-level folders themselves. Everything else is in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = {"targets": "*.toml", "calibration": "*.json"}


class BuildPyWithShipped(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for folder, pattern in SHIPPED.items():
            dest = Path(self.build_lib, "edge_msd", "shipped", folder)
            dest.mkdir(parents=True, exist_ok=True)
            for src in sorted(Path(folder).glob(pattern)):
                self.copy_file(str(src), str(dest / src.name))


setup(cmdclass={"build_py": BuildPyWithShipped})
