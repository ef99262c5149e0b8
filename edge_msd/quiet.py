"""Known-harmless third-party warnings and log lines, hidden at the CLI boundary (``-v`` shows them).

Each entry is precise: where it comes from (a logger name, or the module a Python warning is
attributed to), the warning category, and the start of the message. Anything not listed still shows.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Noise:
    source: str  # logger name ("root" for logging.warning), or the module regex of a Python warning
    message: str  # regex matched at the start of the message
    category: type[Warning] | None = None  # the Python warning's category; None: a log record


KNOWN_NOISE: tuple[Noise, ...] = (
    # torchao registers its enums as pytree constants on import; torch 2.14 logs that it no longer must
    Noise("torch.utils._pytree", r"<enum '\w+'> is an Enum subclass and is now natively supported"),
    # open_clip when the demo teacher is built: its towers are pre-trained, its heads new, as intended
    Noise("root", r"Model \S+ initialized partially\."),
    # coremltools names versions it was not tested with; conversion works with ours (docs/toolchain)
    Noise("coremltools", r"Torch version \S+ has not been tested with coremltools"),
    Noise("coremltools", r"scikit-learn version \S+ is not supported"),  # its sklearn converter
    # Core ML predicts only on macOS: elsewhere its runtime is absent, and edge-msd does not use it there
    Noise("coremltools", r"Failed to load _ML\w+Proxy: No module named 'coremltools\.libcoremlpython'"),
    # raised inside coremltools and modelopt, which still script a few helpers
    Noise(r"torch\.jit\._script$", r"`torch\.jit\.script` is deprecated", FutureWarning),
    # modelopt's quantizers see no transformers model here
    Noise(r"modelopt\.torch$", r"transformers \S+ is not tested with current version of modelopt",
          UserWarning),
)


class _MessageFilter(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(p.match(record.getMessage()) for p in self.patterns)


@contextlib.contextmanager
def known_noise_hidden(hide: bool = True, noise: tuple[Noise, ...] = KNOWN_NOISE) -> Iterator[None]:
    """Hide ``noise`` inside the block (nothing changes when ``hide`` is false); restored on exit."""
    if not hide:
        yield
        return
    by_logger: dict[str, list[str]] = {}
    for n in noise:
        if n.category is None:
            by_logger.setdefault(n.source, []).append(n.message)
    filters = [(logging.getLogger(None if name == "root" else name), _MessageFilter(patterns))
               for name, patterns in by_logger.items()]
    with warnings.catch_warnings():
        for n in noise:
            if n.category is not None:
                warnings.filterwarnings("ignore", message=n.message, category=n.category, module=n.source)
        for logger, f in filters:
            logger.addFilter(f)
        try:
            yield
        finally:
            for logger, f in filters:
                logger.removeFilter(f)
