"""Command line: ``--check`` and the ``scripts/yate-sipgen`` entry point Yate executes."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from yate_sipgen import config
from yate_sipgen.features import schema

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "sipgen.conf"
SCRIPT = ROOT / "scripts" / "yate-sipgen"


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run(args: list[str], cwd: Path | str = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=clean_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)


def check_module(conf: str, cwd: Path | str = ROOT) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "yate_sipgen", "--check", conf], cwd=cwd)


def snippet_part(stdout: str) -> str:
    marker = "; Yate-side configuration this needs:"
    assert marker in stdout
    return stdout.split(marker, 1)[1]


# -- python -m yate_sipgen --check -------------------------------------------------------------

def test_check_example_prints_effective_settings() -> None:
    r = check_module("examples/sipgen.conf")
    assert r.returncode == 0, r.stderr
    cfg = config.load(str(EXAMPLE), schema())
    out_lines = r.stdout.splitlines()
    for line in cfg.effective():
        if line:
            assert line in out_lines, f"{line!r} missing from --check output"
    assert f"state_dir={EXAMPLE.parent / 'state'}" in out_lines  # resolved, absolute
    assert "configuration is valid" in r.stderr
    assert "warning" not in r.stderr


def test_check_example_prints_yate_snippets() -> None:
    r = check_module("examples/sipgen.conf")
    assert r.returncode == 0, r.stderr
    snippets = snippet_part(r.stdout)
    lines = [ln.strip() for ln in snippets.splitlines()]
    # extmodule.conf: the [scripts] line, absolute script path = absolute config path
    assert "extmodule.conf" in snippets
    assert "[scripts]" in lines
    assert f"{SCRIPT}={EXAMPLE}" in lines
    # ysipchan.conf: generate and async_generic in [general]
    assert "ysipchan.conf" in snippets
    general = lines.index("[general]")
    assert general > lines.index("[scripts]")
    settings = {ln.partition("=")[0]: ln.partition("=")[2].split(";")[0].strip()
                for ln in lines[general + 1:] if "=" in ln and not ln.startswith(";")}
    assert settings.get("generate") == "true"
    assert settings.get("async_generic") == "true"


def test_check_snippets_are_valid_yate_conf_lines() -> None:
    r = check_module("examples/sipgen.conf")
    assert r.returncode == 0, r.stderr
    for line in snippet_part(r.stdout).splitlines():
        s = line.strip()
        if not s or s.startswith(";") or (s.startswith("[") and s.endswith("]")):
            continue
        assert "=" in s, line
        assert ";" not in s.partition("=")[2], f"end-of-line comment in {line!r}"


def test_check_socket_mode_prints_a_listener(tmp_path: Path) -> None:
    conf = tmp_path / "sipgen.conf"
    conf.write_text("[connection]\nmode=tcp\naddress=127.0.0.1:5040\n", encoding="utf-8")
    r = check_module(str(conf))
    assert r.returncode == 0, r.stderr
    lines = [ln.strip() for ln in snippet_part(r.stdout).splitlines()]
    assert "[listener sipgen]" in lines
    assert {"type=tcp", "addr=127.0.0.1", "port=5040"} <= set(lines)
    assert "[scripts]" not in lines


def test_check_bad_file_fails_with_the_error_on_stderr(tmp_path: Path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("[general]\ntimeout=soon\n[connection]\nmode=carrier-pigeon\n",
                    encoding="utf-8")
    r = check_module(str(conf))
    assert r.returncode != 0
    assert f"{conf}:2" in r.stderr and "timeout" in r.stderr and "soon" in r.stderr
    assert f"{conf}:4" in r.stderr and "mode" in r.stderr and "carrier-pigeon" in r.stderr
    assert "INVALID" in r.stderr
    assert "timeout=" not in r.stdout  # no effective settings for an invalid file


def test_check_missing_file_fails(tmp_path: Path) -> None:
    conf = tmp_path / "missing.conf"
    r = check_module(str(conf))
    assert r.returncode != 0
    assert str(conf) in r.stderr and "cannot read" in r.stderr


def test_check_warnings_go_to_stderr(tmp_path: Path) -> None:
    conf = tmp_path / "warn.conf"
    conf.write_text("[general]\ntimout=3000\n", encoding="utf-8")
    r = check_module(str(conf))
    assert r.returncode == 0, r.stderr
    assert "warning" in r.stderr and "timout" in r.stderr
    assert "timout" not in r.stdout


# -- scripts/yate-sipgen (what Yate executes) --------------------------------------------------

def test_script_is_executable_with_env_python3_shebang() -> None:
    mode = SCRIPT.stat().st_mode
    assert mode & stat.S_IXUSR and mode & stat.S_IXGRP and mode & stat.S_IXOTH
    assert os.access(SCRIPT, os.X_OK)
    with SCRIPT.open("rb") as f:
        assert f.readline() == b"#!/usr/bin/env python3\n"


def _python3_on_path_is_new_enough() -> bool:
    exe = shutil.which("python3")
    if exe is None:
        return False
    r = subprocess.run([exe, "-c", "import sys; print(sys.version_info >= (3, 11))"],
                       capture_output=True, text=True, env=clean_env())
    return r.stdout.strip() == "True"


needs_python3 = pytest.mark.skipif(not _python3_on_path_is_new_enough(),
                                   reason="python3 on PATH is missing or older than 3.11")


@needs_python3
def test_script_check_works_from_another_cwd() -> None:
    # As Yate runs it: executed directly (shebang), Yate's cwd, no PYTHONPATH.
    r = run([str(SCRIPT), "--check", str(EXAMPLE)], cwd="/tmp")
    assert r.returncode == 0, r.stderr
    assert f"{SCRIPT}={EXAMPLE}" in r.stdout.splitlines()
    assert f"state_dir={EXAMPLE.parent / 'state'}" in r.stdout.splitlines()


def test_script_does_not_need_the_package_installed() -> None:
    # -S: no site-packages at all, so nothing installed can be imported.
    r = run([sys.executable, "-S", str(SCRIPT), "--check", str(EXAMPLE)], cwd="/tmp")
    assert r.returncode == 0, r.stderr
    assert f"{SCRIPT}={EXAMPLE}" in r.stdout.splitlines()


@needs_python3
def test_script_works_through_a_symlink(tmp_path: Path) -> None:
    link = tmp_path / "bin" / "yate-sipgen"
    link.parent.mkdir()
    link.symlink_to(SCRIPT)
    r = run([str(link), "--check", str(EXAMPLE)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr


@needs_python3
def test_script_takes_a_path_with_spaces_as_one_argument(tmp_path: Path) -> None:
    # Yate passes the [scripts] value as a single argv entry, spaces included.
    conf = tmp_path / "my yate" / "sip gen.conf"
    conf.parent.mkdir()
    shutil.copy(EXAMPLE, conf)
    r = run([str(SCRIPT), "--check", str(conf)], cwd="/tmp")
    assert r.returncode == 0, r.stderr
    assert f"{SCRIPT}={conf}" in r.stdout.splitlines()
    assert f"state_dir={conf.parent / 'state'}" in r.stdout.splitlines()


@needs_python3
def test_script_check_bad_file_fails(tmp_path: Path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("[general]\nrestart=1\n", encoding="utf-8")
    r = run([str(SCRIPT), "--check", str(conf)], cwd="/tmp")
    assert r.returncode != 0
    assert f"{conf}:2" in r.stderr and "restart" in r.stderr


def test_check_prints_yate_engine_settings_a_delivery_needs() -> None:
    """Workers (each xsip.generate wait=true holds one) and idlemsec (Yate's polling
    interval, waited on three times per delivery), in a yate.conf [general] part that
    matches examples/yate.conf."""
    r = check_module("examples/sipgen.conf")
    assert r.returncode == 0, r.stderr
    part = r.stdout.split("; --- yate.conf ---", 1)[1].split("; ---", 1)[0]
    settings = {ln.partition("=")[0]: ln.partition("=")[2] for ln in part.splitlines()
                if "=" in ln and not ln.startswith(";")}
    assert settings["idlemsec"] == "1"
    assert int(settings["maxworkers"]) >= 200 and int(settings["minworkers"]) >= 20
    example = (EXAMPLE.parent / "yate.conf").read_text()
    for k, v in settings.items():
        assert f"\n{k}={v}\n" in example, f"examples/yate.conf lacks {k}={v}"
