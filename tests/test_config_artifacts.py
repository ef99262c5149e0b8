import dataclasses
import json

import click
import pytest
from click.testing import CliRunner

from edge_msd.artifacts import atomic_dir, read_manifest, verify_files, write_manifest
from edge_msd.config import build_config, config_command, field
from edge_msd.errors import ArtifactError, ConfigError


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
