"""Known-harmless third-party warnings and log lines, hidden at the CLI boundary (``-v`` shows them).

Each entry is precise: where it comes from (a logger name, or the module a Python warning is
attributed to), the warning category, and the start of the message. Anything not listed still shows.

Converters and runtimes also print from C++ (progress lines, glog/absl logs, "Created TensorFlow Lite
XNNPACK delegate"), past Python's ``sys.stdout``: ``third_party_output_hidden`` captures file
descriptors 1 and 2 around those calls and shows the text only under ``-v`` or when the call fails.
Standard library only: the benchmark binary ships it.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import re
import sys
import tempfile
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


_show_output = False  # set inside ``known_noise_hidden(hide=False)``, i.e. under ``-v``


class _MessageFilter(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(p.match(record.getMessage()) for p in self.patterns)


@contextlib.contextmanager
def known_noise_hidden(hide: bool = True, noise: tuple[Noise, ...] = KNOWN_NOISE) -> Iterator[None]:
    """Hide ``noise`` inside the block; restored on exit. With ``hide`` false nothing is filtered and
    ``third_party_output_hidden`` lets the libraries' own output through as it comes."""
    global _show_output
    if not hide:
        shown, _show_output = _show_output, True
        try:
            yield
        finally:
            _show_output = shown
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


def _flush_all() -> None:
    """Flush Python's streams and C's stdio buffers, so that text lands on the fd it was written for."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or odd stream must not break the caller
            stream.flush()
    with contextlib.suppress(Exception):  # no libc (Windows): nothing buffered there to flush
        ctypes.CDLL(None).fflush(None)


def _fd_stream(fd: int) -> io.TextIOWrapper:
    """A text stream on ``fd`` itself: while fd is redirected it lands in the capture, and a library
    that keeps it past the block writes to the restored fd, never to a closed or reused one."""
    return io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), errors="replace", write_through=True)


@contextlib.contextmanager
def third_party_output_hidden() -> Iterator[None]:
    """Capture what the block writes to stdout and stderr, at the file-descriptor level (C++ libraries)
    and at Python's ``sys.stdout``/``sys.stderr`` (which may not be those fds: a test runner's buffers).
    The text is written to stderr if the block raises; under ``-v`` nothing is captured."""
    if _show_output:
        yield
        return
    _flush_all()
    with tempfile.TemporaryFile() as tmp:
        saved = [os.dup(1), os.dup(2)]
        failed = True
        try:
            os.dup2(tmp.fileno(), 1)
            os.dup2(tmp.fileno(), 2)
            with contextlib.redirect_stdout(_fd_stream(1)), contextlib.redirect_stderr(_fd_stream(2)):
                yield
            failed = False
        finally:
            _flush_all()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if failed:  # what the library said may explain the error
                tmp.seek(0)
                sys.stderr.write(tmp.read().decode(errors="replace"))
                sys.stderr.flush()
