#!/usr/bin/env python3
"""The benchmark binary on an emulated Debian 12 arm64 userland, compared with this host.

Builds (or reuses) a cached Debian bookworm arm64 root, installs each device runtime there with pip as a
user of a Debian / Raspberry Pi OS board would, runs ``edge-msd-bench.pyz`` on the bundles given, runs the
same command on the host, and prints recall and parity side by side. Exit status: 0 every check matched,
1 a mismatch (or a run that failed), 2 bad input, 3 not run (no root, no binfmt_misc, no qemu): a check
that did not run is never reported as passed. Timings under emulation are not device timings.

Needs root (mount, chroot, apt-get) and an x86 host with apt; see docs/arm64.md.
Standard library only: it runs before any venv exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

EXIT_MISMATCH, EXIT_USAGE, EXIT_NOT_RUN = 1, 2, 3
ROOT = Path(__file__).resolve().parents[1]
RELEASE = "bookworm"  # Debian 12: the base of Raspberry Pi OS bookworm
MIRRORS = [
    f"deb http://deb.debian.org/debian {RELEASE} main",
    f"deb http://deb.debian.org/debian {RELEASE}-updates main",
    f"deb http://deb.debian.org/debian-security {RELEASE}-security main",
]
ROOT_PACKAGES = ["python3", "python3-venv", "ca-certificates"]
QEMU_MIN = 10  # Debian 12's qemu 7.2 segfaults in ai-edge-litert's and onnxruntime's extension modules
BACKPORTS = Path("/etc/apt/sources.list.d/edge-msd-bookworm-backports.sources")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
# ELF64 little-endian, e_machine 183 (AArch64): the kernel hands such files to qemu ("F": opened now,
# so the interpreter need not exist inside the chroot)
AARCH64_MAGIC = r"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
AARCH64_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
# One venv per runtime, the requirements a user types; the same on the host and in the root.
VENVS = {
    "litert": ["ai-edge-litert", "numpy"],
    "onnxruntime": ["onnxruntime", "numpy"],
    "tflite-runtime": ["tflite-runtime", "numpy<2"],  # built against numpy 1.x
}
IN_ROOT = Path("/opt/edge-msd")  # venvs, the binary, bundles and reports inside the root


class NotRun(Exception):
    """A prerequisite is missing: the check did not run (never reported as passed)."""


class BadInput(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Check:
    bundle: Path
    venv: str  # key of VENVS
    runtime: str  # the binary's --runtime
    exact: bool  # same kernels on both sides: recall equal, parity within 1e-5


@dataclasses.dataclass
class Outcome:
    check: Check
    host: dict | None
    arm: dict | None
    arm_wall_s: float
    problems: list[str]


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, text=True, capture_output=True, **kw)


def last_line(p: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"error|Error|ERROR", ln)]
    return (errors or lines or [f"exit status {p.returncode}"])[-1].strip()


# ---- the host side: root, binfmt_misc, qemu, mmdebstrap ---------------------------------------------


def need_root() -> None:
    if os.geteuid() != 0:
        raise NotRun("needs root (mount, chroot, apt-get); run it with sudo")


def apt_install(packages: list[str], backports: bool = False) -> None:
    if not shutil.which("apt-get"):
        raise NotRun(f"no apt-get to install {' '.join(packages)}")
    if backports and not BACKPORTS.exists():
        BACKPORTS.write_text(
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        )
    if backports or not hasattr(apt_install, "updated"):
        p = sh(["apt-get", "update", "-q"])
        if p.returncode:
            raise NotRun(f"apt-get update failed: {last_line(p)}")
        apt_install.updated = True  # type: ignore[attr-defined]
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends"]
    cmd += ["-t", "bookworm-backports"] if backports else []
    p = sh(cmd + packages, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if p.returncode:
        raise NotRun(f"apt-get install {' '.join(packages)} failed: {last_line(p)}")


def qemu_major(path: str) -> int:
    p = sh([path, "--version"])
    m = re.search(r"version (\d+)\.", p.stdout)
    return int(m.group(1)) if m else 0


def ensure_qemu() -> str:
    """qemu-aarch64-static ≥ QEMU_MIN (bookworm-backports), installed if missing or older."""
    path = shutil.which("qemu-aarch64-static") or "/usr/bin/qemu-aarch64-static"
    if not Path(path).exists() or qemu_major(path) < QEMU_MIN:
        apt_install(["qemu-user-static"], backports=True)
        path = shutil.which("qemu-aarch64-static") or path
    if not Path(path).exists() or qemu_major(path) < QEMU_MIN:
        raise NotRun(
            f"qemu-aarch64-static ≥ {QEMU_MIN} is needed (bookworm-backports), found "
            f"{qemu_major(path) or 'none'} at {path}"
        )
    return path


def ensure_binfmt(qemu: str) -> None:
    """binfmt_misc mounted and aarch64 ELF files registered to ``qemu`` (re-registered if another)."""
    if not (BINFMT / "register").exists():
        p = sh(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)])
        if p.returncode:
            raise NotRun(f"no binfmt_misc: {BINFMT} is not mounted and mounting it failed ({last_line(p)})")
    entry = BINFMT / "qemu-aarch64"
    if entry.exists():
        m = re.search(r"interpreter (\S+)", entry.read_text())
        if m and Path(m.group(1)).exists() and qemu_major(m.group(1)) >= QEMU_MIN:
            return
        entry.write_text("-1")  # an older qemu's registration: replace it
    try:
        (BINFMT / "register").write_text(f":qemu-aarch64:M::{AARCH64_MAGIC}:{AARCH64_MASK}:{qemu}:F")
    except OSError as e:
        raise NotRun(f"no binfmt support: registering {qemu} for aarch64 ELF files failed ({e})") from e


# ---- the arm64 root ------------------------------------------------------------------------------


def cache_dir() -> Path:
    home = os.environ.get("EDGE_MSD_HOME") or Path.home() / ".cache" / "edge-msd"
    return Path(home) / "arm64"


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    return [
        ln.split()[1]
        for ln in Path("/proc/mounts").read_text().splitlines()
        if (ln.split()[1] + "/").startswith(prefix)
    ]


def remove_root(root: Path) -> None:
    """Delete an unpacked root, never while something (the host's /dev) is mounted inside it."""
    busy = mounts_under(root)
    if busy:
        raise BadInput(f"{root}: still mounted inside ({', '.join(busy)}); unmount before rebuilding")
    shutil.rmtree(root, ignore_errors=False)


def codename(root: Path) -> str | None:
    m = (
        re.search(r"^VERSION_CODENAME=(\S+)", (root / "etc/os-release").read_text(), re.M)
        if (root / "etc/os-release").is_file()
        else None
    )
    return m.group(1) if m else None


def ensure_root(cache: Path, echo) -> Path:
    """The unpacked Debian 12 arm64 root: from the cached tarball, built with mmdebstrap when missing;
    a cache of another release or package set is rebuilt."""
    tarball, meta_path, root = cache / f"debian-{RELEASE}-arm64.tar", cache / "rootfs.json", cache / "root"
    meta = {"release": RELEASE, "arch": "arm64", "packages": ROOT_PACKAGES, "mirrors": MIRRORS}
    recorded = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if recorded != meta or not tarball.is_file():
        if recorded is not None and recorded != meta:
            echo(f"cached root is {recorded.get('release')} {recorded.get('packages')}: rebuilding")
        if not (shutil.which("mmdebstrap") and shutil.which("arch-test")):
            apt_install(["mmdebstrap", "arch-test"])  # arch-test: mmdebstrap's check of foreign arches
        cache.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        tmp = tarball.with_suffix(".tmp.tar")
        p = sh(
            [
                "mmdebstrap",
                "--arch=arm64",
                "--variant=apt",
                f"--include={','.join(ROOT_PACKAGES)}",
                RELEASE,
                str(tmp),
                *MIRRORS,
            ]
        )
        if p.returncode:
            raise NotRun(f"mmdebstrap --arch=arm64 {RELEASE} failed: {last_line(p)}")
        tmp.replace(tarball)
        meta_path.write_text(json.dumps(meta))
        echo(f"built {tarball} in {time.perf_counter() - t0:.0f} s")
        if root.exists():
            remove_root(root)
    if root.exists() and codename(root) != RELEASE:
        echo(f"{root} is {codename(root)}, not {RELEASE}: unpacking again")
        remove_root(root)
    if not root.exists():
        tmp = root.with_name("root.tmp")
        if tmp.exists():
            remove_root(tmp)
        tmp.mkdir()
        p = sh(["tar", "-xf", str(tarball), "-C", str(tmp)])
        if p.returncode:
            raise BadInput(f"{tarball}: cannot unpack ({last_line(p)}); delete it to rebuild")
        tmp.rename(root)
    if codename(root) != RELEASE:
        raise BadInput(f"{tarball}: not a Debian {RELEASE} root; delete it to rebuild")
    return root


class Chroot:
    """/proc, /sys and /dev mounted inside ``root`` for the duration; the host's CA certificates copied
    in (pip there verifies TLS with them, as on the host)."""

    def __init__(self, root: Path):
        self.root = root
        self.mounted: list[Path] = []

    def __enter__(self) -> Chroot:
        for args, target in (
            (["-t", "proc", "proc"], "proc"),
            (["-t", "sysfs", "sysfs"], "sys"),
            (["--bind", "/dev"], "dev"),
        ):
            path = self.root / target
            p = sh(["mount", *args, str(path)])
            if p.returncode:
                self.__exit__()
                raise NotRun(f"mount {' '.join(args)} {path} failed: {last_line(p)}")
            self.mounted.append(path)
        ca = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")
        shutil.copyfile(ca, self.root / "etc/ssl/certs/edge-msd-host-ca.crt")
        shutil.copyfile("/etc/resolv.conf", self.root / "etc/resolv.conf")
        return self

    def __exit__(self, *exc) -> None:
        for path in reversed(self.mounted):
            sh(["umount", "-l", str(path)])
        self.mounted.clear()

    def run(self, cmd: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            # the default "max" CPU makes numpy's matmul raise false divide/overflow warnings
            "QEMU_CPU": "cortex-a76",
            "PIP_CERT": "/etc/ssl/certs/edge-msd-host-ca.crt",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_DEFAULT_TIMEOUT": "180",
        }
        env.update({k: v for k, v in os.environ.items() if k in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL")})
        chroot = shutil.which("chroot") or "/usr/sbin/chroot"  # found on the host's PATH, not the root's
        return sh([chroot, str(self.root), *cmd], env=env, timeout=timeout)


# ---- venvs and runs, the same on both sides ----------------------------------------------------------


def ensure_venv(run, venv: str, reqs: list[str], fresh: bool) -> str | None:
    """A venv with ``reqs`` at ``venv`` (a path as ``run`` sees it); None, or pip's error line."""
    stamp = f"{venv}/edge-msd-requirements.txt"
    if not fresh and run(["cat", stamp]).stdout == "\n".join(reqs):
        return None
    run(["rm", "-rf", venv])
    p = run(["python3", "-m", "venv", venv])
    if p.returncode == 0:
        p = run([f"{venv}/bin/pip", "install", "-q", *reqs])
    if p.returncode:
        return f"pip install {' '.join(reqs)}: {last_line(p)}"
    run(["sh", "-c", f"printf '%s' '{chr(10).join(reqs)}' > {stamp}"])
    return None


def bench_args(bundle: str, runtime: str, out: str, label: str, eval_limit: int | None) -> list[str]:
    args = [
        "--bundle",
        bundle,
        "--runtime",
        runtime,
        "--out",
        out,
        "--label",
        label,
        "--iters",
        "5",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--no-cold",
        "--no-vendor",
    ]
    return args + (["--eval-limit", str(eval_limit)] if eval_limit else [])


def run_side(
    run, python: str, pyz: str, bundle: str, check: Check, out: str, read, label: str, eval_limit: int | None
) -> tuple[dict | None, float, str | None]:
    """One bench run: (report, wall seconds, the error line when it failed)."""
    t0 = time.perf_counter()
    p = run([python, pyz, *bench_args(bundle, check.runtime, out, label, eval_limit)])
    wall = time.perf_counter() - t0
    if p.returncode:
        return None, wall, f"{label}: the binary exited {p.returncode}: {last_line(p)}"
    return json.loads(read(out)), wall, None


# ---- comparison ----------------------------------------------------------------------------------------

R_KEYS = [("i2t", "R@1"), ("i2t", "R@5"), ("i2t", "R@10"), ("t2i", "R@1"), ("t2i", "R@5"), ("t2i", "R@10")]


def target_min_cos(manifest: dict, precision: str) -> float | None:
    return ((manifest.get("target") or {}).get("parity") or {}).get(precision, {}).get("min_cos")


def compare(check: Check, host: dict, arm: dict, manifest: dict) -> list[str]:
    """What differs beyond the thresholds: recall equal and parity within 1e-5 for the same kernels;
    mean R@1 within 0.5 pt and the target's parity threshold for another runtime's kernels."""
    problems = [
        f"{side} report is partial ({r.get('interrupted')})"
        for side, r in (("host", host), ("aarch64", arm))
        if r.get("partial")
    ]
    h, a = (host.get("recall") or {}).get("eval"), (arm.get("recall") or {}).get("eval")
    if not h or not a:
        return problems + ["no eval recall in a report"]
    if check.exact:
        problems += [f"{d} {k} {h[d][k]:.2f} → {a[d][k]:.2f}" for d, k in R_KEYS if h[d][k] != a[d][k]]
    elif abs(h["mean_R@1"] - a["mean_R@1"]) > 0.5:
        problems.append(f"mean R@1 {h['mean_R@1']:.2f} → {a['mean_R@1']:.2f} (more than 0.5 pt)")
    precision = next(iter(arm["bundle"]["models"].values()))["precision"]
    floor = target_min_cos(manifest, precision)
    for tower, hp in host.get("parity", {}).items():
        ap = arm.get("parity", {}).get(tower)
        if ap is None:
            problems.append(f"no {tower} parity on aarch64")
        elif check.exact and max(abs(hp[k] - ap[k]) for k in ("min_cos", "mean_cos")) > 1e-5:
            problems.append(f"{tower} min cos {hp['min_cos']:.6f} → {ap['min_cos']:.6f} (more than 1e-5)")
        elif not check.exact and (floor is None or ap["min_cos"] < floor):
            problems.append(f"{tower} min cos {ap['min_cos']:.5f} below the target's {floor} ({precision})")
    return problems


def table(outcomes: list[Outcome]) -> str:
    sys.path.insert(0, str(ROOT))
    from edge_msd.bench.tables import render

    def rec(r: dict | None, d: str, k: str = "R@1") -> str:
        ev = ((r or {}).get("recall") or {}).get("eval")
        return "–" if not ev else f"{ev[d][k] if d != 'mean' else ev['mean_R@1']:.2f}"

    def cos(r: dict | None, tower: str) -> str:
        p = ((r or {}).get("parity") or {}).get(tower)
        return "–" if not p else f"{p['min_cos']:.6f}"

    def version(r: dict | None) -> str:
        env = ((r or {}).get("environment") or {}).get("runtimes") or {}
        return ", ".join(f"{k} {v}" for k, v in env.items()) or "–"

    head = [
        "bundle",
        "venv",
        "host runtime",
        "aarch64 runtime",
        "eval set",
        "mean R@1 host → aarch64",
        "i2t R@1",
        "t2i R@1",
        "image min cos",
        "text min cos",
        "aarch64 run s (emulated)",
        "result",
    ]
    body = []
    for o in outcomes:
        ev = ((o.host or o.arm or {}).get("recall") or {}).get("eval") or {}
        sub = ev.get("subset")
        body.append(
            [
                o.check.bundle.name,
                o.check.venv,
                version(o.host),
                version(o.arm),
                f"first {sub['n_images']} of {sub['of_images']} images"
                if sub
                else f"{ev.get('n_images')} images",
                *(f"{rec(o.host, d)} → {rec(o.arm, d)}" for d in ("mean", "i2t", "t2i")),
                *(f"{cos(o.host, t)} → {cos(o.arm, t)}" for t in ("image", "text")),
                f"{o.arm_wall_s:.0f}",
                "match" if not o.problems else "MISMATCH: " + "; ".join(o.problems),
            ]
        )
    return render(head, body, "markdown")


# ---- the check --------------------------------------------------------------------------------------


def plan(bundles: list[Path], reduced: bool) -> list[Check]:
    """The runs per bundle: LiteRT on every .tflite bundle and tflite-runtime on int8 ones, ONNX Runtime
    on .onnx bundles; the reduced form (CI) keeps int8 LiteRT and fp32 ONNX only."""
    checks = []
    for b in bundles:
        path = b / "manifest.json"
        if not path.is_file():
            raise BadInput(f"{b}: not a bundle (no manifest.json); give the folders `edge-msd export` wrote")
        image = (json.loads(path.read_text()).get("models") or {}).get("image") or {}
        fmt, precision = Path(image.get("file", "")).suffix, image.get("precision")
        if fmt == ".tflite" and (precision == "int8" or not reduced):
            checks.append(Check(b, "litert", "litert", True))
            if precision == "int8" and not reduced:
                checks.append(Check(b, "tflite-runtime", "litert", False))
        elif fmt == ".onnx" and (precision == "fp32" or not reduced):
            checks.append(Check(b, "onnxruntime", "onnxruntime", True))
    if not checks:
        raise BadInput(
            "no bundle to check: give .tflite and .onnx bundles"
            + (" (the reduced form runs int8 LiteRT and fp32 ONNX)" if reduced else "")
        )
    return checks


def host_side(checks: list[Check], cache: Path, pyz: Path, eval_limit: int | None, fresh: bool) -> dict:
    reports: dict[Check, tuple[dict | None, str | None]] = {}
    errors = {
        v: ensure_venv(sh, str(cache / f"host-venv-{v}"), VENVS[v], fresh) for v in {c.venv for c in checks}
    }
    for c in checks:
        out = cache / "out" / f"host-{c.bundle.name}-{c.venv}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        if errors[c.venv]:
            reports[c] = (None, f"host {errors[c.venv]}")
            continue
        r, _, err = run_side(
            sh,
            str(cache / f"host-venv-{c.venv}/bin/python"),
            str(pyz),
            str(c.bundle),
            c,
            str(out),
            lambda p: Path(p).read_text(),
            "host",
            eval_limit,
        )
        reports[c] = (r, err)
    return reports


def arm_side(checks: list[Check], root: Path, pyz: Path, eval_limit: int | None, fresh: bool, echo) -> dict:
    reports: dict[Check, tuple[dict | None, float, str | None]] = {}
    work = root / IN_ROOT.relative_to("/")
    (work / "out").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(pyz, work / pyz.name)
    with Chroot(root) as chroot:
        errors = {}
        for v in sorted({c.venv for c in checks}):
            t0 = time.perf_counter()
            errors[v] = ensure_venv(chroot.run, str(IN_ROOT / f"venv-{v}"), VENVS[v], fresh)
            state = errors[v] or "ready"
            echo(f"aarch64 venv {v}: {state} ({time.perf_counter() - t0:.0f} s)")
        for c in checks:
            dest = work / "bundles" / c.bundle.name
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(c.bundle, dest)
            if errors[c.venv]:
                reports[c] = (None, 0.0, f"aarch64 {errors[c.venv]}")
                continue
            out = IN_ROOT / "out" / f"{c.bundle.name}-{c.venv}.json"
            r, wall, err = run_side(
                chroot.run,
                str(IN_ROOT / f"venv-{c.venv}/bin/python"),
                str(IN_ROOT / pyz.name),
                str(IN_ROOT / "bundles" / c.bundle.name),
                c,
                str(out),
                lambda p: (root / Path(p).relative_to("/")).read_text(),
                "aarch64-emulated",
                eval_limit,
            )
            echo(f"aarch64 {c.bundle.name} {c.venv}: {wall:.0f} s (emulated)")
            reports[c] = (r, wall, err)
    return reports


def check(args: argparse.Namespace, echo=print) -> int:
    t_start = time.perf_counter()
    checks = plan([Path(b) for b in args.bundles], args.reduced)
    need_root()
    qemu = ensure_qemu()
    ensure_binfmt(qemu)
    cache = Path(args.cache) if args.cache else cache_dir()
    t0 = time.perf_counter()
    root = ensure_root(cache, echo)
    t_root = time.perf_counter() - t0
    pyz = cache / "edge-msd-bench.pyz"
    p = sh([sys.executable, str(ROOT / "tools" / "build_bench.py"), "--out", str(pyz)])
    if p.returncode:
        raise BadInput(f"building the benchmark binary failed: {last_line(p)}")
    eval_limit = args.eval_limit
    host = host_side(checks, cache, pyz, eval_limit, args.fresh)
    t0 = time.perf_counter()
    arm = arm_side(checks, root, pyz, eval_limit, args.fresh, echo)
    t_arm = time.perf_counter() - t0
    outcomes = []
    for c in checks:
        (h, herr), (a, wall, aerr) = host[c], arm[c]
        problems = [e for e in (herr, aerr) if e]
        if h and a:
            problems += compare(c, h, a, json.loads((c.bundle / "manifest.json").read_text()))
        outcomes.append(Outcome(c, h, a, wall, problems))
    echo(table(outcomes))
    echo(
        f"root {t_root:.0f} s, aarch64 venvs and runs {t_arm:.0f} s (emulated: not device timings), "
        f"total {time.perf_counter() - t_start:.0f} s"
    )
    failed = [o for o in outcomes if o.problems]
    echo(
        f"arm64 check: {len(outcomes) - len(failed)} of {len(outcomes)} match"
        + (
            ""
            if not failed
            else f"; MISMATCH in {', '.join(f'{o.check.bundle.name}/{o.check.venv}' for o in failed)}"
        )
    )
    return EXIT_MISMATCH if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Exit status: 0 match, 1 mismatch, 2 bad input, 3 not run (what is missing is printed).",
    )
    p.add_argument("bundles", nargs="+", help="bundle folders (edge-msd export): .tflite fp32/int8, .onnx")
    p.add_argument("--reduced", action="store_true", help="int8 LiteRT and fp32 ONNX only (the CI form)")
    p.add_argument(
        "--eval-limit",
        type=int,
        default=None,
        help="bench recall on the first N eval images only (the reduced form's default: 100)",
    )
    p.add_argument(
        "--cache", help="cache folder (default: $EDGE_MSD_HOME/arm64, else ~/.cache/edge-msd/arm64)"
    )
    p.add_argument("--fresh", action="store_true", help="recreate every venv (as a first install would)")
    args = p.parse_args(argv)
    if args.reduced and args.eval_limit is None:
        args.eval_limit = 100
    try:
        return check(args)
    except NotRun as e:
        print(f"arm64 check not run: {e}", file=sys.stderr)
        return EXIT_NOT_RUN
    except BadInput as e:
        print(f"arm64 check: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
