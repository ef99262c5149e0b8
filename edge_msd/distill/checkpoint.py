"""The run folder: checkpoints (read back safely), random state, the config a resume must share.

Layout: ``config.json`` / ``config.toml``, ``metrics.jsonl``, ``losses.png``, ``checkpoints/last.pt``
(everything a resume needs) and ``checkpoints/best.pt`` (best validation weights). Checkpoints are
read with ``torch.load(weights_only=True)`` only; a damaged, hostile or ill-fitting one is an
ArtifactError that names the file and what to do.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from edge_msd.artifacts import atomic_write_bytes, atomic_write_json, atomic_write_text
from edge_msd.config import config_to_dict, save_config
from edge_msd.distill.config import DistillConfig
from edge_msd.errors import ArtifactError, ConfigError

CKPT_DIR = "checkpoints"
LAST, BEST = "last.pt", "best.pt"
METRICS, PLOT = "metrics.jsonl", "losses.png"


def save_torch(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # Per device, for the devices both runs see: a resume with fewer (or more) visible GPUs than the
        # run that saved it restores the generators it has; the others keep their seeds.
        for i, gen_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gen_state, i)


@contextlib.contextmanager
def own_rng(seed: int) -> Iterator[None]:
    """Run the block on the CPU torch RNG seeded with ``seed``; the global RNG is left as it was.

    What ran before (e.g. building a missing feature cache) therefore cannot change what the block draws.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def bad_checkpoint(path: Path, why: str) -> ArtifactError:
    return ArtifactError(f"{path}: {why}; restore an intact copy, or start afresh with --force (no --resume)")


def _first_line(e: BaseException | str) -> str:
    """The first sentence of an error's text: torch's messages go on for paragraphs."""
    line = next((x.strip() for x in str(e).splitlines() if x.strip()), type(e).__name__)
    return line.split(". ")[0].rstrip(".")[:160]


def load_checkpoint(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """A checkpoint this trainer wrote, read with ``weights_only=True``; anything else is an ArtifactError."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        names_code = [line for line in str(e).splitlines() if "GLOBAL" in line]  # a function to call
        if names_code:
            why = f"refused, it could run code ({_first_line(names_code[0])})"
            raise bad_checkpoint(path, why) from None
        detail = _first_line(str(e).rpartition("WeightsUnpickler error:")[2])
        raise bad_checkpoint(path, f"not a readable checkpoint (damaged: {detail})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise bad_checkpoint(path, f"not a readable checkpoint (damaged: {_first_line(e)})") from None
    missing = [k for k in keys if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise bad_checkpoint(path, f"not a checkpoint of this trainer (no {', '.join(missing)})")
    return ck


def _key_mismatch(own: dict[str, Any], saved: dict[str, Any]) -> str:
    """'missing a, b; unexpected c; other shape d' between two state dicts, or '' when they fit."""
    shapes = [k for k in own.keys() & saved.keys() if isinstance(own[k], Tensor)
              and (not isinstance(saved[k], Tensor) or saved[k].shape != own[k].shape)]
    groups = (("missing", own.keys() - saved.keys()), ("unexpected", saved.keys() - own.keys()),
              ("other shape", shapes))
    return "; ".join(f"{name} {', '.join(sorted(keys)[:3])}{' …' if len(keys) > 3 else ''}"
                     for name, keys in groups if keys)


def load_state(module: Any, state: Any, path: Path, what: str) -> None:
    """``module.load_state_dict(state)``; a state that does not fit is an ArtifactError naming the keys."""
    if isinstance(module, nn.Module) and isinstance(state, dict):
        mismatch = _key_mismatch(module.state_dict(), state)
        if mismatch:
            raise bad_checkpoint(path, f"its {what} does not fit this run's model ({mismatch})")
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise bad_checkpoint(path, f"its {what} does not fit this run ({_first_line(e)})") from None


def check_out(cfg: DistillConfig, out: Path, rank: int) -> None:
    """Refuse, before anything is opened or built, a run that cannot start in ``out``; changes nothing.

    A resume needs a checkpoint made with the same settings; a fresh run needs --force where a run is.
    """
    ckpt = out / CKPT_DIR / LAST
    saved_cfg = out / "config.json"
    if rank != 0:
        return
    if cfg.resume:
        if not ckpt.is_file():
            raise ArtifactError(f"--resume: no checkpoint at {ckpt}")
        before = json.loads(saved_cfg.read_text(encoding="utf-8")) if saved_cfg.is_file() else None
        now = run_identity(cfg)
        if before is not None and before != now:
            diff = sorted(k for k in now if before.get(k) != now[k])
            raise ConfigError(
                f"--resume: {out} was trained with other settings ({', '.join(diff)}); "
                "resume with the same config, or start afresh with --force"
            )
        return
    if ckpt.is_file() and not cfg.force:
        raise ArtifactError(
            f"{out} already holds a run ({ckpt}); pass --resume to continue it or --force to start afresh"
        )


def start_afresh(cfg: DistillConfig, out: Path) -> None:
    """Clear the previous run's checkpoints and metrics and save this run's config (rank 0).

    Called only once the new run has everything it needs to train, so a run that fails to start
    leaves the previous one (checkpoints, metrics and the config they were made with) as it was.
    """
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / CKPT_DIR / LAST, out / CKPT_DIR / BEST, out / METRICS):
        stale.unlink(missing_ok=True)
    atomic_write_json(out / "config.json", run_identity(cfg))
    save_config(cfg, out / "config.toml")


def run_identity(cfg: DistillConfig) -> dict[str, Any]:
    """The settings a resumed run must share (not resume/force/workers/progress-only knobs)."""
    d = config_to_dict(cfg)
    for k in ("resume", "force", "num_workers", "predecode_mb", "verify_cache", "out"):
        d.pop(k)
    return json.loads(json.dumps(d))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records written after the checkpoint a run resumes from, so the log reads as one run."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


LAST_KEYS = ("model", "adaptor", "balancer", "queue", "optimizer", "rng", "state")


def save_last(path: Path, parts: dict[str, Any], state: dict[str, Any]) -> None:
    """``last.pt``: every part's state (None: a part this run lacks), the global RNG and ``state``."""
    saved = {name: part.state_dict() if part is not None else {} for name, part in parts.items()}
    save_torch(path, {**saved, "rng": rng_state(), "state": dict(state)})


def restore(path: Path, parts: dict[str, Any], state: dict[str, Any]) -> None:
    """Load ``last.pt`` into ``parts``, the global RNG and ``state``, exactly where the run stopped."""
    ck = load_checkpoint(path, LAST_KEYS)
    for name, part in parts.items():
        if part is not None:
            load_state(part, ck[name], path, name)
    try:
        set_rng_state(ck["rng"])
        state.update(ck["state"])
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        raise bad_checkpoint(path, f"its random state does not fit ({_first_line(e)})") from None
