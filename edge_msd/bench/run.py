"""Benchmark a bundle on this machine: latency, throughput, memory, power, recall and parity → a report.

``run_bench(options)`` is the one function behind both ``edge-msd bench`` (host) and the benchmark
binary (``python edge-msd-bench.pyz``, device). Standard library + numpy + the runtime in use.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_msd import __version__
from edge_msd.artifacts import atomic_write_json
from edge_msd.bench import sysinfo, vendor
from edge_msd.bench.coldstart import cold_start
from edge_msd.bench.options import BenchOptions, ProfileBench
from edge_msd.bench.placement import unavailable
from edge_msd.bench.query import check_storage, query_report
from edge_msd.bench.raw import compare_raw, raw_inputs
from edge_msd.bench.report import SCHEMA, batch1_p50, format_table
from edge_msd.bench.runtimes import Backend, Session, model_files, select_backend
from edge_msd.bench.sustained import sustained
from edge_msd.bench.timing import Deadline, Stop, Timing, time_loop
from edge_msd.contract.format import EVALSET, PROBE
from edge_msd.contract.numerics import cosine_summary, run_batched
from edge_msd.contract.raw import first_files, has_files
from edge_msd.contract.reading import Bundle, open_bundle, tower_inputs
from edge_msd.errors import ConfigError, EdgeMSDError
from edge_msd.eval.retrieval import first_images, retrieval_metrics
from edge_msd.quiet import third_party_output_hidden

MAX_SAMPLES_KEPT = 20000  # raw latencies kept in the report for distribution plots
PLACEMENT_CALLS = 10  # profiled calls for per-op times


def profile_defaults(target: dict[str, Any]) -> dict[str, Any]:
    """Benchmark defaults (named as the options) from the bundle's target profile: its ``batch_sizes``
    and its typed ``[bench]`` table (``ProfileBench``: runtime, warmup, iterations, duration, threads
    with 0 = runtime default)."""
    bench = ProfileBench.from_manifest(target.get("bench") or {}, "bundle manifest")
    out: dict[str, Any] = {}
    for name, value in (("runtime", bench.runtime), ("warmup", bench.warmup), ("iters", bench.iterations),
                        ("duration", bench.duration), ("threads", bench.threads or None)):
        if value is not None:
            out[name] = value
    if target.get("batch_sizes"):
        out["batch"] = sorted({int(b) for b in target["batch_sizes"]})
    return out


def _pool(x: np.ndarray, batch: int, size: int, session: Session) -> list[Any]:
    """``size`` distinct batches of consecutive rows (wrapping round), prepared for the runtime."""
    n = len(x)
    feeds = []
    for k in range(max(1, min(size, -(-n // batch)))):
        idx = (np.arange(batch) + k * batch) % n
        feeds.append(session.prepare(x[idx]))
    return feeds


def embed(session: Session, x: np.ndarray, batch: int, deadline: Deadline) -> np.ndarray:
    """Embeddings of all rows with a session of fixed batch: the last chunk is padded, then cut."""

    def step(chunk: np.ndarray) -> np.ndarray:
        if deadline.passed():
            raise Stop
        return np.asarray(session.run(session.prepare(chunk)), dtype=np.float32).reshape(batch, -1)

    return run_batched(step, x, batch)


def parity(device: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Per-row cosine similarity between embeddings made here and the PyTorch student's."""
    return cosine_summary(device, reference)


def eval_subset(
    evalset: dict[str, np.ndarray], limit: int | None
) -> tuple[dict[str, np.ndarray], dict | None]:
    """The first ``limit`` images of the eval set with all their captions, and what was kept of how many
    (None: the whole set). Captions index images, so the subset keeps recall's definition."""
    cap = evalset["caption_image_index"]
    n_all = len(evalset["images"])
    if limit is None or limit >= n_all:
        return evalset, None
    n, caps = first_images(cap, n_all, limit)
    per_image = {"images": evalset["images"][:n], **(first_files(evalset, n) if has_files(evalset) else {})}
    # the rest: per caption
    subset = {k: per_image[k] if k in per_image else v[caps] for k, v in evalset.items()}
    return subset, {"n_images": n, "of_images": n_all, "n_texts": len(caps), "of_texts": len(cap)}


class _Run:
    """State of one benchmark run; ``report`` is complete enough to write at any moment."""

    def __init__(
        self,
        opts: BenchOptions,
        bundle: Bundle,
        backend: type[Backend],
        files: dict,
        out: Path,
        echo: Callable[[str], None],
    ):
        self.opts, self.bundle, self.backend = opts, bundle, backend
        self.files, self.out, self.echo = files, out, echo
        defaults = profile_defaults(bundle.target)
        self.thread_choice = sysinfo.choose_threads(opts.threads, defaults.get("threads"))
        self.threads = self.thread_choice["threads"]
        self.batches = opts.batch or defaults.get("batch") or [1]
        self.iters = opts.iters
        self.duration = opts.duration
        if self.iters is None and self.duration is None:
            self.iters, self.duration = defaults.get("iters"), defaults.get("duration")
            if self.iters is None and self.duration is None:
                self.iters = 100
        self.warmup = opts.warmup if opts.warmup is not None else defaults.get("warmup", 10)
        self.query_sessions: dict[str, Session] = {}  # batch-1 sessions kept for the end-to-end query
        self.options = {
            "provider": opts.provider,
            "compute_units": opts.compute_units,
            "xnnpack": opts.xnnpack,
        }
        versions = {backend.name: backend.version()}
        self.report: dict[str, Any] = {
            "schema": SCHEMA,
            "partial": True,  # until the run ends normally
            "interrupted": None,
            "created_unix": round(time.time(), 3),
            "tool": {"edge_msd": __version__},
            "device": {"label": opts.label or platform.node(), "host": platform.node()},
            "bundle": self._bundle_entry(),
            "runtime": {"name": backend.name, "version": versions[backend.name], **self.options},
            "settings": self._settings(),
            "environment": sysinfo.environment(versions, self.threads),
            "towers": {t: {"measurements": []} for t in self.towers},
            "parity": {},
            "recall": None,
        }

    def _bundle_entry(self) -> dict[str, Any]:
        bundle, man = self.bundle, self.bundle.manifest
        return {
            "path": str(bundle.root),
            "digest": bundle.digest,  # sha256 of the canonical manifest (docs/bundle.md)
            "signature": bundle.signature,  # {algorithm, key_id, digest} when --public-key verified it
            "target": bundle.target.get("name"),
            "student": (man.get("student") or {}).get("name"),
            "models": {
                t: {
                    "file": self._relpath(t),
                    "format": self._format(t),
                    "precision": bundle.model(t).get("precision"),
                }
                for t in self.towers
            },
            "export_parity": man.get("parity"),
            "delegate_warnings": man.get("delegate_warnings") or [],  # export-time, see delegation.py
            # int8 bundles: how they were quantized (qat | ptq) and on which calibration set
            "quantization": (man.get("quantization") or {}).get("method"),
            "calibration": (man.get("calibration") or {}).get("name"),
        }

    def _settings(self) -> dict[str, Any]:
        opts = self.opts
        return {
            "threads": self.threads,
            "threads_choice": self.thread_choice,
            "batches": self.batches,
            "iters": self.iters,
            "duration_s": self.duration,
            "warmup": self.warmup,
            "pool": opts.pool,
            "time_limit_s": opts.time_limit,
            "eval_limit": opts.eval_limit,
            "query": {"on": opts.query, "gallery": opts.gallery, "gallery_storage": opts.gallery_storage},
            "towers": list(self.towers),
        }

    @property
    def towers(self) -> list[str]:
        return [t for t in self.opts.towers if t in self.bundle.towers]

    def _format(self, tower: str) -> str:
        return next(f for f in self.files[tower] if f in self.backend.formats)

    def _relpath(self, tower: str) -> str:
        path = self.files[tower][self._format(tower)]
        return str(path.relative_to(self.bundle.root)) if path.is_relative_to(self.bundle.root) else str(path)

    def save(self) -> None:
        atomic_write_json(self.out, self.report)

    def load(self, tower: str, batch: int) -> tuple[Session, float]:
        path = self.files[tower][self._format(tower)]
        with third_party_output_hidden():  # runtimes log from C++ as they build (XNNPACK, TensorRT)
            t0 = time.perf_counter_ns()
            session = self.backend().load(self.bundle.model(tower), path, self.threads, batch, self.options)
            load_ms = (time.perf_counter_ns() - t0) / 1e6
        return session, load_ms

    def measure(self, tower: str, x: np.ndarray, batch: int, deadline: Deadline) -> Session:
        """One (tower, batch) measurement; its entry is in the report even if cut short."""
        sysinfo.reset_peak_rss()
        entry: dict[str, Any] = {"batch": batch, "rss_before_mb": sysinfo.rss_mb()}
        self.report["towers"][tower]["measurements"].append(entry)
        session, entry["load_ms"] = self.load(tower, batch)
        entry["session"] = session.describe()
        pool = _pool(x, batch, self.opts.pool, session)
        entry["pool_batches"] = len(pool)
        sampler = sysinfo.PowerSampler() if sysinfo.PowerSampler.available() else None
        timing = Timing()
        try:
            if sampler:
                sampler.start()
            time_loop(
                session.run,
                pool,
                warmup=self.warmup,
                iters=self.iters,
                duration_s=self.duration,
                deadline=deadline,
                timing=timing,
            )
        finally:  # on Ctrl-C too: keep what the loop measured
            power = sampler.stop() if sampler else None
            entry.update(timing.summary(batch))
            entry["peak_rss_mb"] = sysinfo.peak_rss_mb()
            entry["power"] = power
            entry["energy"] = sysinfo.energy_per_inference(
                power, timing.wall_ns, len(timing.samples_ns), batch
            )
            step = max(1, -(-len(timing.samples_ns) // MAX_SAMPLES_KEPT))
            entry["samples_ms"] = [round(s / 1e6, 5) for s in timing.samples_ns[::step]]
        if timing.stopped:
            session.close()
            raise Stop
        return session

    def tower(self, tower: str, sets: dict[str, dict | None], deadline: Deadline) -> dict:
        """Time every batch size, then embed every set (eval, probe and their raw-input versions) with
        the last session."""
        data = sets.get("eval") or sets.get("probe")
        if data is None:
            raise EdgeMSDError(f"{self.bundle.root}: neither {EVALSET} nor {PROBE}: no inputs to time")
        x = tower_inputs(self.bundle, tower, data)
        emb: dict[str, np.ndarray] = {}
        session = None
        for batch in self.batches:
            if deadline.passed():
                raise Stop
            self._close(tower, session)
            self.echo(f"  {tower} tower, batch {batch} …")
            session = self.measure(tower, x, batch, deadline)
            if batch == 1 and self.opts.query:  # the end-to-end query reuses this session
                self.query_sessions[tower] = session
            self.save()
        if session is not None:
            self.report["towers"][tower].update(self.device_report(tower, session, x, deadline))
            self.save()
        if self.opts.recall and session is not None:
            batch = self.batches[-1]
            t0 = time.perf_counter()
            for name, d in sets.items():
                if d is not None:
                    emb[name] = embed(
                        session, x if d is data else tower_inputs(self.bundle, tower, d), batch, deadline
                    )
            self.report["towers"][tower]["embed_s"] = time.perf_counter() - t0
        self._close(tower, session)
        return emb

    def _close(self, tower: str, session: Session | None) -> None:
        """Close a session unless the end-to-end query still needs it."""
        if session is not None and session is not self.query_sessions.get(tower):
            session.close()

    def query(self, sets: dict[str, dict | None], embs: dict[str, dict], deadline: Deadline) -> None:
        """The end-to-end query table (edge_msd.bench.query), then the sessions kept for it are closed."""
        try:
            if self.opts.query:
                self.echo("  end-to-end queries: decode/tokenize → model → search, one query at a time …")
                model_alone = {t: batch1_p50(self.report, t) for t in self.towers}
                self.report["query"] = query_report(
                    self.bundle, sets, embs, self.query_sessions, model_alone, self.opts.recall,
                    self.opts.gallery, self.opts.gallery_storage, deadline)
        finally:
            self.close_query_sessions()

    def close_query_sessions(self) -> None:
        for session in self.query_sessions.values():
            session.close()
        self.query_sessions.clear()

    def device_report(self, tower: str, session: Session, x: np.ndarray, deadline: Deadline) -> dict:
        """Op placement, cold start in a fresh process, the vendor tool beside us, the sustained run."""
        batch = self.batches[-1]
        pool = _pool(x, batch, self.opts.pool, session)
        out: dict[str, Any] = {}
        try:
            out["placement"] = session.placement(pool[0], PLACEMENT_CALLS)
        except Exception as e:  # a runtime's introspection API failing must not cost the benchmark
            out["placement"] = unavailable(f"{type(e).__name__}: {e}")
        if self.opts.cold:
            out["cold"] = cold_start({
                "bundle": str(self.bundle.root), "tower": tower, "batch": self.batches[0],
                "runtime": self.backend.name, "format": self._format(tower), "threads": self.threads,
                "options": self.options, "engine_dir": self.opts.engine_dir,
            })
        timed = self.report["towers"][tower]["measurements"][-1].get("latency_ms") or {}
        if self.opts.vendor and tower == "image" and timed.get("n"):  # the tools' random ints are no tokens
            path = self.files[tower][self._format(tower)]
            out["vendor"] = vendor.compare(
                self.backend.name, path, batch, self.threads, timed["n"], timed,
                self.bundle.model(tower).get("inputs") or [], self.options,
            )
        if self.opts.sustained:
            self.echo(f"  {tower} tower, sustained {self.opts.sustained:g} s …")
            power_mode = (self.report["environment"].get("jetson") or {}).get("power_mode")
            out["sustained"] = sustained(session.run, pool, self.opts.sustained, deadline, power_mode)
        return out

    def execute(self, deadline: Deadline) -> None:
        evalset = self.bundle.load_npz(EVALSET) if self.opts.recall else None
        subset = None
        if evalset is not None:
            evalset, subset = eval_subset(evalset, self.opts.eval_limit)
        probe = self.bundle.load_npz(PROBE)
        sets: dict[str, dict | None] = {"eval": evalset, "probe": probe}
        if self.opts.recall:
            self.echo("  raw inputs: decoding the sets' image files, tokenizing their captions …")
            self.report["raw_inputs"] = raw_inputs(self.bundle, sets)  # adds eval_raw, probe_raw
        embs = {}
        for tower in self.towers:
            embs[tower] = self.tower(tower, sets, deadline)
            if probe is not None and "probe" in embs[tower]:
                self.report["parity"][tower] = parity(embs[tower]["probe"], probe[f"{tower}_emb"])
            self.save()
        if self.opts.recall and {"image", "text"} <= set(embs):
            recall: dict[str, Any] = {}
            for name, d in sets.items():
                if d is not None and name in embs["image"] and name in embs["text"]:
                    recall[name] = retrieval_metrics(
                        embs["image"][name], embs["text"][name], d["caption_image_index"]
                    )
            if subset and "eval" in recall:
                recall["eval"]["subset"] = subset  # recall of the first images only: not the set's recall
            if probe is not None and "image_emb" in probe:
                ref = retrieval_metrics(probe["image_emb"], probe["text_emb"], probe["caption_image_index"])
                recall["probe_reference"] = ref
                if "probe" in recall:
                    recall["probe_delta_mean_R@1"] = recall["probe"]["mean_R@1"] - ref["mean_R@1"]
            self.report["recall"] = recall
            compare_raw(self.report["raw_inputs"], sets, embs, recall)
        self.query(sets, embs, deadline)


def default_out(opts: BenchOptions, bundle: Bundle, backend: type[Backend]) -> Path:
    target = bundle.target.get("name") or bundle.root.name
    return Path(f"bench-{target}-{backend.name}-{platform.node() or 'host'}.json")


def bundle_backend(bundle: Bundle, towers: list[str], runtime: str | None, engine_dir: str | None
                   ) -> tuple[dict, type[Backend]]:
    """The towers' model files and the backend that runs them: ``runtime``, else the one the target
    profile names, else the first installed one that fits (bench and the gallery index alike)."""
    models = {t: bundle.model(t) for t in towers}
    files = model_files(bundle.root, models, Path(engine_dir) if engine_dir else None)
    profile_runtime = None if runtime else profile_defaults(bundle.target).get("runtime")
    try:
        return files, select_backend(runtime or profile_runtime or "auto", files)
    except EdgeMSDError as e:
        if profile_runtime is None:
            raise
        raise type(e)(f"{e} ({profile_runtime} is the target profile's [bench] runtime; --runtime chooses "
                      "another)") from e


def run_bench(opts: BenchOptions, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark and write its report; Ctrl-C or ``time_limit`` → a report marked partial.

    Returns the report; the caller prints it (``format_table``) and sets the exit status.
    """
    opts.validate()
    check_storage(opts.gallery_storage)
    deadline = Deadline.after(opts.time_limit)
    # the bundle rules first (digest, signature, checksums): a tampered bundle is refused, file named
    bundle = open_bundle(opts.bundle, opts.expect_digest, opts.public_key)
    missing = sorted(set(opts.towers) - set(bundle.towers))
    if missing:
        raise ConfigError(
            f"{bundle.root}: no {', '.join(missing)} tower in this bundle (it has {', '.join(bundle.towers)})"
        )
    files, backend = bundle_backend(bundle, opts.towers, opts.runtime, opts.engine_dir)
    out = Path(opts.out) if opts.out else default_out(opts, bundle, backend)
    run = _Run(opts, bundle, backend, files, out, echo)
    echo(f"edge-msd bench: {bundle.root} with {backend.name} {run.report['runtime']['version']} → {out}")
    if run.thread_choice["warning"]:
        echo(f"warning: {run.thread_choice['warning']}")
    run.save()  # from now on the report file exists, marked partial until the run ends
    try:
        run.execute(deadline)
        run.report["partial"] = False
    except Stop:
        run.report["interrupted"] = "time limit"
    except KeyboardInterrupt:
        run.report["interrupted"] = "Ctrl-C"
    except Exception as e:  # the report keeps what was measured, and says why it stopped
        run.report["interrupted"] = f"error: {e}"
        raise
    finally:
        run.close_query_sessions()  # a run cut short before its query table
        run.report["finished_unix"] = round(time.time(), 3)
        run.save()
    return run.report


def print_report(report: dict[str, Any], echo: Callable[[str], None] = print) -> None:
    echo(format_table(report))
