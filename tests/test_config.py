"""sipgen.conf loader (yate_sipgen.config) and the example file examples/sipgen.conf."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from yate_sipgen import config
from yate_sipgen.features import feature_classes, schema
from yate_sipgen.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "sipgen.conf"


#: The schema the tests load with (the app's; ``test_section`` adds a private section).
CURRENT: dict[str, config.Schema] = {"schema": schema()}


def full_schema() -> list[config.Key]:
    """Every key of the schema in use: the engine's and every feature's."""
    return list(CURRENT["schema"].keys)


def load(path: str) -> config.Config:
    return config.load(path, CURRENT["schema"])


def write(tmp_path: Path, text: str, name: str = "sipgen.conf") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str) -> config.Config:
    return load(str(write(tmp_path, text)))


def load_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        load_text(tmp_path, text)
    return str(exc.value)


# A private section with one key of each kind, added for the duration of a test.
TEST_KEYS = [
    config.Key("t", "count", "int", 5, "an int", minimum=1, maximum=10),
    config.Key("t", "ratio", "float", 0.5, "a float", minimum=0.0, maximum=2.0),
    config.Key("t", "flag", "bool", False, "a bool"),
    config.Key("t", "color", "choice", "red", "a choice", choices=("red", "green")),
    config.Key("t", "label", "str", "x", "a string"),
    config.Key("t", "items", "list", ("a",), "a list"),
    config.Key("t", "where", "path", "data", "a path"),
]


@pytest.fixture
def test_section(monkeypatch: pytest.MonkeyPatch) -> None:
    parts = [config.CORE] + [cls.config for cls in feature_classes()]
    monkeypatch.setitem(CURRENT, "schema",
                        config.Schema(parts + [config.Declarations(keys=list(TEST_KEYS))]))


# -- values and types --------------------------------------------------------------------------

def test_values_are_typed(tmp_path: Path, test_section: None) -> None:
    cfg = load_text(tmp_path, "[t]\ncount=7\nratio=1.25\nflag=yes\ncolor=green\nlabel=hello\n"
                              "items= a , b,,c \nwhere=/abs/dir\n")
    t = cfg["t"]
    assert t["count"] == 7 and type(t["count"]) is int
    assert t["ratio"] == 1.25 and isinstance(t["ratio"], float)
    assert t["flag"] is True
    assert t["color"] == "green"
    assert t["label"] == "hello"
    assert t["items"] == ("a", "b", "c")
    assert t["where"] == "/abs/dir"


def test_defaults_fill_missing_keys(tmp_path: Path, test_section: None) -> None:
    cfg = load_text(tmp_path, "[t]\ncount=3\n")
    assert cfg["t"]["count"] == 3
    assert cfg["t"]["ratio"] == 0.5 and cfg["t"]["color"] == "red" and cfg["t"]["items"] == ("a",)
    for k in full_schema():
        if k.kind != "path" and k.section != "t":
            assert cfg[k.section][k.name] == k.default, k.name


def test_integer_typed_schema_values(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "[general]\ntimeout=12000\nrestart=off\n[connection]\n"
                              "reconnect_min=0.5\n")
    assert cfg["general"]["timeout"] == 12000
    assert cfg["general"]["restart"] is False
    assert cfg["connection"]["reconnect_min"] == 0.5


@pytest.mark.parametrize("word", ["true", "yes", "on", "enable"])
def test_yate_true_words(tmp_path: Path, word: str) -> None:
    cfg = load_text(tmp_path, f"[general]\nrestart=false\n[connection]\nsend_connect={word}\n")
    assert cfg["connection"]["send_connect"] is True


@pytest.mark.parametrize("word", ["false", "no", "off", "disable"])
def test_yate_false_words(tmp_path: Path, word: str) -> None:
    cfg = load_text(tmp_path, f"[general]\nrestart={word}\n")
    assert cfg["general"]["restart"] is False


@pytest.mark.parametrize("word", ["1", "0", "maybe", ""])
def test_non_yate_booleans_are_rejected(tmp_path: Path, word: str) -> None:
    # Yate's own parser does not take 1/0 as booleans; neither do we.
    err = load_error(tmp_path, f"[general]\nrestart={word}\n")
    assert "restart" in err and "true or false" in err


# -- syntax ------------------------------------------------------------------------------------

def test_comments_and_blank_lines(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "; a comment\n# another one\n\n   ; indented comment\n"
                              "[general]\n;timeout=abc\n#timeout=abc\n\ttimeout=2000\n")
    assert cfg["general"]["timeout"] == 2000
    assert cfg.warnings == []


def test_no_end_of_line_comments(tmp_path: Path) -> None:
    # As in Yate's .conf files, ';' after a value is part of the value.
    cfg = load_text(tmp_path, "[general]\nname=sipgen ; not a comment\n")
    assert cfg["general"]["name"] == "sipgen ; not a comment"
    err = load_error(tmp_path, "[general]\ntimeout=2000 ; ms\n")
    assert "timeout" in err and "2000 ; ms" in err


def test_split_at_first_equals_and_trim(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "  [ general ]  \n   name   =  a=b = c  \n"
                              "[connection]\naddress= 127.0.0.1:5040\t\n")
    assert cfg["general"]["name"] == "a=b = c"
    assert cfg["connection"]["address"] == "127.0.0.1:5040"


def test_empty_value(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "[connection]\naddress=\n")
    assert cfg["connection"]["address"] == ""


def test_line_without_equals_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[general]\n\ntimeout\n")
    with pytest.raises(ConfigError) as exc:
        load(str(path))
    assert f"{path}:3" in str(exc.value) and "timeout" in str(exc.value)


def test_key_before_any_section_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "timeout=2000\n[general]\n")
    with pytest.raises(ConfigError) as exc:
        load(str(path))
    assert f"{path}:1" in str(exc.value) and "timeout" in str(exc.value)


# -- paths -------------------------------------------------------------------------------------

def test_relative_paths_resolve_against_the_file_not_the_cwd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = write(tmp_path, "[general]\nstate_dir=st/../var/state\n", name="etc/sipgen.conf")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for given in (str(conf), os.path.relpath(conf, elsewhere)):
        cfg = load(given)
        assert cfg["general"]["state_dir"] == str(tmp_path / "etc" / "var" / "state")


def test_default_path_resolves_against_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = write(tmp_path, "[general]\n", name="etc/sipgen.conf")
    monkeypatch.chdir(tmp_path)
    default = next(k for k in full_schema() if k.section == "general" and k.name == "state_dir")
    cfg = load(str(conf))
    assert cfg["general"]["state_dir"] == str(tmp_path / "etc" / default.default)


def test_absolute_path_is_kept(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "[general]\nstate_dir=/var/lib/yate-sipgen\n")
    assert cfg["general"]["state_dir"] == "/var/lib/yate-sipgen"


def test_path_kind_resolves_relative_to_the_file(tmp_path: Path, test_section: None) -> None:
    cfg = load(str(write(tmp_path, "[t]\nwhere=sub/dir\n", name="a/b.conf")))
    assert cfg["t"]["where"] == str(tmp_path / "a" / "sub" / "dir")
    assert cfg.base_dir == str(tmp_path / "a")


# -- unknown keys and sections: warnings -------------------------------------------------------

def test_unknown_key_is_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, "[general]\ntimeout=2000\ntimout=3000\n")
    cfg = load(str(path))
    assert cfg["general"]["timeout"] == 2000
    assert len(cfg.warnings) == 1
    w = cfg.warnings[0]
    assert f"{path}:3" in w and "timout" in w and "[general]" in w
    assert "timeout" in w  # lists the known keys


def test_unknown_section_is_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, "[genral]\ntimeout=abc\n[general]\nname=x\n")
    cfg = load(str(path))  # keys of an unknown section are not checked
    assert cfg["general"]["name"] == "x"
    assert len(cfg.warnings) == 1
    assert f"{path}:1" in cfg.warnings[0] and "genral" in cfg.warnings[0]
    assert "genral" not in cfg.values


def test_duplicate_key_last_wins(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "[general]\ntimeout=2000\n[connection]\n[general]\ntimeout=3000\n")
    assert cfg["general"]["timeout"] == 3000


# -- invalid values: errors --------------------------------------------------------------------

@pytest.mark.parametrize("section,key,bad,allowed", [
    ("general", "timeout", "abc", "an integer >= 1000 and <= 30000"),
    ("general", "timeout", "999", "an integer >= 1000 and <= 30000"),
    ("general", "timeout", "30001", "an integer >= 1000 and <= 30000"),
    ("general", "timeout", "2.5", "an integer"),
    ("general", "maxqueue", "-1", "an integer >= 0 and <= 10000"),
    ("general", "restart", "sometimes", "true or false"),
    ("connection", "mode", "udp", "one of pipe, tcp, unix"),
    ("connection", "mode", "PIPE", "one of pipe, tcp, unix"),
    ("connection", "reconnect_max", "fast", "a number >= 0.1 and <= 600"),
    ("connection", "reconnect_min", "0.01", "a number >= 0.05 and <= 60"),
])
def test_invalid_value_error_names_everything(
        tmp_path: Path, section: str, key: str, bad: str, allowed: str) -> None:
    path = write(tmp_path, f"; header\n[{section}]\n\n{key}={bad}\n")
    with pytest.raises(ConfigError) as exc:
        load(str(path))
    text = str(exc.value)
    assert f"{path}:4" in text          # file:line
    assert f"[{section}]" in text       # section
    assert key in text                  # key
    assert bad in text                  # the bad value
    assert allowed in text              # what is allowed


def test_several_errors_are_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, "[general]\ntimeout=abc\nrestart=maybe\n[connection]\nmode=udp\n"
                           "garbage line\n")
    with pytest.raises(ConfigError) as exc:
        load(str(path))
    text = str(exc.value)
    for line, what in ((2, "timeout"), (3, "restart"), (5, "mode"), (6, "garbage line")):
        assert f"{path}:{line}" in text and what in text
    assert len(text.splitlines()) >= 4


def test_cross_key_checks(tmp_path: Path) -> None:
    err = load_error(tmp_path, "[general]\ntimeout=2000\nanswer_margin=2000\n")
    assert "answer_margin" in err and "timeout" in err
    err = load_error(tmp_path, "[connection]\nmode=tcp\n")
    assert "mode=tcp" in err and "address" in err
    err = load_error(tmp_path, "[connection]\nmode=tcp\naddress=localhost\n")
    assert "host:port" in err
    cfg = load_text(tmp_path, "[connection]\nmode=unix\naddress=/run/yate/sipgen.sock\n")
    assert cfg["connection"]["mode"] == "unix"


def test_parse_text_without_a_file() -> None:
    cfg = config.parse_text("[general]\ntimeout=4000\n", CURRENT["schema"])
    assert cfg["general"]["timeout"] == 4000
    with pytest.raises(ConfigError) as exc:
        config.parse_text("[general]\ntimeout=x\n", CURRENT["schema"])
    assert "<text>:2" in str(exc.value)


# -- no file, unreadable file ------------------------------------------------------------------

def test_empty_path_gives_defaults_with_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load("")
    assert len(cfg.warnings) == 1 and "default" in cfg.warnings[0]
    for k in full_schema():
        if k.kind == "path":
            # an empty path stays empty (it means "the feature's own default place")
            want = str(tmp_path / k.default) if k.default else ""
            assert cfg[k.section][k.name] == want, k.name
        else:
            assert cfg[k.section][k.name] == k.default, k.name


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.conf"
    with pytest.raises(ConfigError) as exc:
        load(str(path))
    assert str(path) in str(exc.value) and "cannot read" in str(exc.value)


def test_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load(str(tmp_path))
    assert str(tmp_path) in str(exc.value) and "cannot read" in str(exc.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a mode 000 file")
def test_unreadable_file_is_a_clear_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[general]\n")
    path.chmod(0)
    try:
        with pytest.raises(ConfigError) as exc:
            load(str(path))
    finally:
        path.chmod(0o644)
    assert str(path) in str(exc.value) and "cannot read" in str(exc.value)


def test_non_utf8_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.conf"
    path.write_bytes(b"[general]\nname=caf\xe9\n")
    with pytest.raises(ConfigError) as exc:
        load(str(path))
    assert str(path) in str(exc.value) and "UTF-8" in str(exc.value)


def test_effective_lists_every_key(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "[general]\ntimeout=2000\n")
    lines = cfg.effective()
    assert "timeout=2000" in lines
    for k in full_schema():
        assert f"[{k.section}]" in lines
        assert any(line.startswith(f"{k.name}=") for line in lines), k.name


# -- examples/sipgen.conf ----------------------------------------------------------------------

def _example_blocks() -> dict[tuple[str, str], tuple[str, str, int]]:
    """(section, key) -> (value, comment text just above the key line, line number)."""
    out: dict[tuple[str, str], tuple[str, str, int]] = {}
    section = None
    comments: list[str] = []
    for n, raw in enumerate(EXAMPLE.read_text(encoding="utf-8").splitlines(), 1):
        s = raw.strip()
        if not s:
            comments = []
        elif s[0] in ";#":
            comments.append(s[1:].strip())
        elif s.startswith("["):
            section = s[1:-1].strip()
            comments = []
        else:
            name, _, value = s.partition("=")
            assert (section, name.strip()) not in out, f"{EXAMPLE}:{n}: {name} set twice"
            out[(section, name.strip())] = (value.strip(), " ".join(comments), n)
            comments = []
    return out


def _expected_block(k: config.Key) -> str:
    return f"[{k.section}]\n; {k.name}: {k.allowed()}\n; {k.doc}\n{k.name}={k.show(k.default)}"


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def test_example_parses_without_warnings() -> None:
    full_schema()
    cfg = load(str(EXAMPLE))
    assert cfg.warnings == []


def test_example_sets_every_key_to_its_default() -> None:
    blocks = _example_blocks()
    defaults = config.defaults(CURRENT["schema"], str(EXAMPLE.parent))
    cfg = load(str(EXAMPLE))
    for k in full_schema():
        assert (k.section, k.name) in blocks, (
            f"{EXAMPLE} lacks [{k.section}] {k.name}; add it (with its doc) like this:\n"
            + _expected_block(k))
        value, _, line = blocks[(k.section, k.name)]
        assert value == k.show(k.default), (
            f"{EXAMPLE}:{line}: {k.name}={value}, but its default is {k.show(k.default)}")
        assert cfg[k.section][k.name] == defaults[k.section][k.name], k.name


def test_example_documents_every_key() -> None:
    blocks = _example_blocks()
    for k in full_schema():
        _, comment, line = blocks[(k.section, k.name)]
        assert _squash(k.doc) in _squash(comment), (
            f"{EXAMPLE}:{line}: the ';' comment above {k.name}= should carry its doc text from "
            f"SCHEMA:\n{k.doc}")


def test_example_has_no_stray_keys() -> None:
    known = {(k.section, k.name) for k in full_schema()}
    stray = [f"line {n}: [{s}] {name}" for (s, name), (_, _, n) in _example_blocks().items()
             if (s, name) not in known and not config._is_extension_section(s or "")]
    assert stray == []


def test_example_state_dir_is_next_to_the_example() -> None:
    cfg = load(str(EXAMPLE))
    assert cfg["general"]["state_dir"] == str(EXAMPLE.parent / "state")


def test_config_knows_no_feature_and_the_schema_is_assembled_from_their_declarations() -> None:
    """No import circle: config.py imports no feature; each feature declares its own keys and
    features.schema() puts them together, in order, each key exactly once."""
    import subprocess
    import sys

    code = ("import sys, yate_sipgen.config; "
            "print(any(m.startswith('yate_sipgen.features') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=str(ROOT))
    assert out.stdout.strip() == "False"
    s = schema()
    assert s.sections()[:3] == ["general", "connection", "message"]
    assert {"events", "presence", "dialog", "message-summary", "generic"} <= set(s.sections())
    for cls in feature_classes():
        assert all(k in s.keys for k in cls.config.keys), cls
    with pytest.raises(ValueError):
        config.Schema([config.CORE, config.CORE])
