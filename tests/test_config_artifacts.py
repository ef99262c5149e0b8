import dataclasses
import errno
import json
import logging
import os
import re
import stat
import tempfile
import warnings
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edge_msd.artifacts import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    read_manifest,
    sha256_file,
    verify_files,
    write_manifest,
)
from edge_msd.cli import main
from edge_msd.config import build_config, config_command, field
from edge_msd.errors import ArtifactError, ConfigError, StorageError

SMALL = "demo-scenes?n_train=48&n_val=8&n_test=8&size=32"


@dataclasses.dataclass
class _Cfg:
    steps: int = field(10, help="steps")
    lr: float = field(1e-3, help="learning rate")
    name: str = field("a", help="name")
    losses: list[str] = field(["x", "y"], help="losses")
    bf16: bool = field(False, help="bf16")


def test_build_config_names_bad_field():
    with pytest.raises(ConfigError, match="field 'steps'.*expected int"):
        build_config(_Cfg, {"steps": "ten"}, "f.toml")
    with pytest.raises(ConfigError, match="unknown field.*stepz"):
        build_config(_Cfg, {"stepz": 1}, "f.toml")
    assert build_config(_Cfg, {"lr": 1}).lr == 1.0


def test_config_command_file_then_cli(tmp_path):
    seen = {}

    @click.command()
    @config_command(_Cfg, section="train")
    def cmd(cfg):
        seen["cfg"] = cfg

    f = tmp_path / "c.toml"
    f.write_text('[train]\nsteps = 5\nname = "b"\nlosses = ["z"]\n')
    r = CliRunner().invoke(cmd, ["--config", str(f), "--steps", "7", "--bf16"])
    assert r.exit_code == 0, r.output
    assert seen["cfg"] == _Cfg(steps=7, lr=1e-3, name="b", losses=["z"], bf16=True)
    r = CliRunner().invoke(cmd, ["--losses", "p,q"])
    assert seen["cfg"].losses == ["p", "q"]


def test_atomic_dir_keeps_old_on_failure_and_manifest_catches_tamper(tmp_path):
    out = tmp_path / "art"
    with atomic_dir(out) as d:
        (d / "a.bin").write_bytes(b"hello")
        write_manifest(d, "test", config={"x": 1})
    with pytest.raises(ArtifactError, match="already exists"), atomic_dir(out):
        pass
    with pytest.raises(RuntimeError), atomic_dir(out, force=True) as d:
        (d / "a.bin").write_bytes(b"new")
        raise RuntimeError("boom")
    assert (out / "a.bin").read_bytes() == b"hello"
    m = read_manifest(out, "test")
    assert json.loads((out / "manifest.json").read_text())["config"] == {"x": 1}
    verify_files(out, m)
    (out / "a.bin").write_bytes(b"hellp")
    with pytest.raises(ArtifactError, match="a.bin: sha256"):
        verify_files(out)


# ---- file modes, I/O failures, quiet terminals -----------------------------------------------------


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_artifacts_respect_the_umask(tmp_path, umask_022):
    atomic_write_json(tmp_path / "r.json", {"a": 1})
    with atomic_dir(tmp_path / "art") as d:
        atomic_write_bytes(d / "w.bin", b"x")
    expected = {"r.json": 0o644, "art": 0o755, "art/w.bin": 0o644}
    for rel, mode in expected.items():
        path = tmp_path / rel
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    os.umask(0o077)
    atomic_write_json(tmp_path / "private.json", {})
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600


def _raise(err: int, filename: str | None = None):
    def fail(*args, **kwargs):
        raise OSError(err, os.strerror(err), filename)

    return fail


def test_write_failures_name_the_path_and_keep_what_was_there(tmp_path, monkeypatch):
    target = tmp_path / "out" / "r.json"
    atomic_write_json(target, {"v": 1})
    # a read-only folder (root ignores chmod, so the error is injected where the OS raises it)
    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkstemp", _raise(errno.EROFS, str(target.parent / ".r.json.x.tmp")))
        with pytest.raises(StorageError, match=rf"^{re.escape(str(target))}: read-only file system; choose"):
            atomic_write_json(target, {"v": 2})
    # the disk fills up while writing
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", _raise(errno.ENOSPC))
        with pytest.raises(StorageError, match=rf"^{re.escape(str(target))}: no space left on the device"):
            atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1} and os.listdir(target.parent) == ["r.json"]
    # a file where a folder is needed
    with pytest.raises(StorageError, match=rf"^{re.escape(str(target))}: already exists; remove it or"):
        atomic_write_json(target / "x.json", {})


def test_atomic_dir_failures_keep_the_old_folder(tmp_path, monkeypatch):
    out = tmp_path / "art"
    with atomic_dir(out) as d:
        (d / "a.bin").write_bytes(b"old")
    full = rf"^{re.escape(str(out / 'b.bin'))}: no space left on the device"
    with pytest.raises(StorageError, match=full), atomic_dir(out, force=True) as d:
        raise OSError(errno.ENOSPC, "No space left on device", str(d / "b.bin"))
    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkdtemp", _raise(errno.EACCES, str(tmp_path / ".art.x1.tmp")))
        denied = rf"^{re.escape(str(out))}: permission denied; fix its permissions"
        with pytest.raises(StorageError, match=denied), atomic_dir(out, force=True):
            pass
    real_replace = os.replace

    def replace(src, dst):  # the second rename (new folder into place) fails
        if Path(src).name.endswith(".tmp"):
            raise OSError(errno.EACCES, "Permission denied", str(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(StorageError, match="permission denied"), atomic_dir(out, force=True) as d:
        (d / "a.bin").write_bytes(b"new")
    assert (out / "a.bin").read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    (tmp_path / "file").write_text("keep")
    for force in (False, True):
        with pytest.raises(ArtifactError, match="file is a file, expected a folder"), atomic_dir(
            tmp_path / "file", force=force
        ):
            pass
    assert (tmp_path / "file").read_text() == "keep"


def test_verify_files_refuses_paths_outside_the_artifact(tmp_path):
    (tmp_path / "outside.bin").write_bytes(b"x")
    art = tmp_path / "art"
    art.mkdir()
    (art / "link.bin").symlink_to(tmp_path / "outside.bin")
    digest = sha256_file(tmp_path / "outside.bin")
    for rel in ("../outside.bin", str(tmp_path / "outside.bin"), "link.bin"):
        with pytest.raises(ArtifactError, match=f"file {re.escape(repr(rel))} lies outside the artifact"):
            verify_files(art, {"files": {rel: digest}})


def test_cli_turns_storage_errors_and_bad_config_into_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'[data]\nspec = "caf\xe9"\n')
    res = CliRunner().invoke(main, ["data", "--config", str(bad)])
    assert res.exit_code == 2 and f"error: {bad}:2: not UTF-8 (byte 0xe9)" in res.output

    (tmp_path / "file").write_text("")
    out = str(tmp_path / "file" / "c.json")
    res = CliRunner().invoke(main, ["calibrate", "--data", SMALL, "--n", "32", "--out", out])
    assert res.exit_code == 2 and f"error: {tmp_path / 'file'}: already exists" in res.output

    @click.command("fail")
    @click.argument("err", type=int)
    def fail(err: int) -> None:
        raise OSError(err, os.strerror(err), "/data/out")

    main.add_command(fail)
    try:
        res = CliRunner().invoke(main, ["fail", str(errno.EROFS)])
        assert res.exit_code == 2
        assert res.output == "error: /data/out: read-only file system; choose a path on a writable disk\n"
        res = CliRunner().invoke(main, ["fail", str(errno.ECONNREFUSED)])  # not the user's to fix: traceback
        assert res.exit_code == 1 and isinstance(res.exception, ConnectionRefusedError)
    finally:
        del main.commands["fail"]


def test_known_third_party_noise_is_hidden_unless_verbose(caplog):
    @click.command("noisy")
    def noisy() -> None:
        logging.getLogger("torch.utils._pytree").warning(
            "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile"
        )
        logging.getLogger("torch.utils._pytree").warning("something else")
        logging.warning("Model edge-msd-demo-teacher initialized partially.")
        warnings.warn_explicit("`torch.jit.script` is deprecated.", FutureWarning, "_script.py", 1,
                               module="torch.jit._script")
        warnings.warn("our own warning", UserWarning, stacklevel=1)

    main.add_command(noisy)
    try:
        seen = {}
        for args in (["noisy"], ["-v", "noisy"]):
            caplog.clear()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assert CliRunner().invoke(main, args).exit_code == 0
            logged = {r.getMessage()[:20] for r in caplog.records}
            seen[args[0]] = logged | {str(w.message)[:20] for w in caught}
    finally:
        del main.commands["noisy"]
    assert seen["noisy"] == {"something else", "our own warning"}
    hidden = {"<enum 'KernelPrefere", "Model edge-msd-demo-", "`torch.jit.script` i"}
    assert seen["-v"] == seen["noisy"] | hidden
