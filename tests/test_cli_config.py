"""`colonies` settings: flag > COLONIES_* environment > config file > default, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli import main as cli_main
from cli.config import DEFAULT_EXECUTOR_TYPE, ConfigError, load_config
from cli.render import fmt_time, fmt_value
from protocol.identity import PrivateKey

KEY_FLAG = PrivateKey.generate()
KEY_ENV = PrivateKey.generate()
KEY_FILE = PrivateKey.generate()
ADDR = "/ip4/127.0.0.1/tcp/50080/p2p/16Uiu2HAmHWT9PXECrnshBhCKdSRGzdDCNVqhz4fnEgk7Eu35NPSY"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No COLONIES_* from the caller's shell, and a HOME without ~/.colonies."""
    import os

    for var in list(os.environ):
        if var.startswith("COLONIES_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def write_toml(path: Path, **values: str) -> Path:
    path.write_text("".join(f'{k} = "{v}"\n' for k, v in values.items()))
    return path


def test_precedence_flag_env_file_default(tmp_path):
    cfg_file = write_toml(
        tmp_path / "c.toml", prvkey=KEY_FILE.hex, colony_name="filecolony", server_addr=ADDR
    )
    env = {"COLONIES_PRVKEY": KEY_ENV.hex, "COLONIES_COLONY_NAME": "envcolony"}
    # A flag wins over everything.
    cfg = load_config({"prvkey": KEY_FLAG.hex}, env, str(cfg_file))
    assert cfg.key("prvkey").id == KEY_FLAG.id
    assert cfg.source("prvkey") == "--prvkey"
    # The environment wins over the file.
    assert cfg.colony_name() == "envcolony"
    assert cfg.source("colony_name") == "COLONIES_COLONY_NAME"
    # The file wins over defaults; the default fills what nothing set.
    assert cfg.server_addr() == ADDR
    assert "c.toml" in cfg.source("server_addr")
    assert cfg.executor_type() == DEFAULT_EXECUTOR_TYPE
    assert cfg.source("executor_type") == "default"
    assert cfg.output == "table"
    # Env over file for the key, when no flag.
    assert load_config({}, env, str(cfg_file)).key("prvkey").id == KEY_ENV.id
    # File alone.
    assert load_config({}, {}, str(cfg_file)).key("prvkey").id == KEY_FILE.id


def test_empty_env_value_falls_through(tmp_path):
    cfg_file = write_toml(tmp_path / "c.toml", prvkey=KEY_FILE.hex)
    cfg = load_config({}, {"COLONIES_PRVKEY": ""}, str(cfg_file))
    assert cfg.key("prvkey").id == KEY_FILE.id


def test_config_file_from_env_and_home(tmp_path):
    cfg_file = write_toml(tmp_path / "env.toml", colony_name="fromenvfile")
    assert load_config({}, {"COLONIES_CONFIG": str(cfg_file)}).colony_name() == "fromenvfile"
    home = tmp_path / "h"
    (home / ".colonies").mkdir(parents=True)
    write_toml(home / ".colonies" / "config.toml", colony_name="fromhome")
    assert load_config({}, {}, home=home).colony_name() == "fromhome"
    # --config beats COLONIES_CONFIG, which beats ~/.colonies/config.toml.
    other = write_toml(tmp_path / "flag.toml", colony_name="fromflag")
    env = {"COLONIES_CONFIG": str(cfg_file)}
    assert load_config({}, env, str(other), home=home).colony_name() == "fromflag"
    assert load_config({}, env, home=home).colony_name() == "fromenvfile"


def test_missing_setting_says_how_to_set_it():
    cfg = load_config({}, {})
    with pytest.raises(ConfigError) as e:
        cfg.key("colony_prvkey")
    assert "--colony-prvkey" in e.value.message and "COLONIES_COLONY_PRVKEY" in e.value.message
    with pytest.raises(ConfigError, match="COLONIES_SERVER_ADDR"):
        cfg.server_addr()


@pytest.mark.parametrize("value", ["zz", "12", "g" * 64, "0" * 64, KEY_FLAG.hex + "00"])
def test_bad_key_names_its_source(value):
    cfg = load_config({}, {"COLONIES_PRVKEY": value})
    with pytest.raises(ConfigError) as e:
        cfg.key("prvkey")
    assert "COLONIES_PRVKEY" in e.value.message
    assert "\n" not in e.value.message


def test_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="not a full multiaddr"):
        load_config({"server_addr": "127.0.0.1:50080"}, {}).server_addr()
    with pytest.raises(ConfigError, match="bad name from COLONIES_COLONY_NAME"):
        load_config({}, {"COLONIES_COLONY_NAME": "no spaces"}).colony_name()
    with pytest.raises(ConfigError, match="does not exist"):
        load_config({}, {}, str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config({}, {"COLONIES_CONFIG": str(tmp_path / "missing.toml")})


def test_bad_config_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("prvkey = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config({}, {}, str(bad))
    bad.write_text('colonyname = "dev"\n')
    with pytest.raises(ConfigError, match="unknown key 'colonyname'"):
        load_config({}, {}, str(bad))
    bad.write_text("colony_name = 5\n")
    with pytest.raises(ConfigError, match="must be a string"):
        load_config({}, {}, str(bad))
    bad.write_text('output = "yaml"\n')
    with pytest.raises(ConfigError, match="'output' must be one of"):
        load_config({}, {}, str(bad))


# Through main(): one line on stderr, exit 2, no traceback.


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli_main.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("colonies: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_cli_bad_key_flag(capsys):
    rc, out, err = run_cli(capsys, "--colony", "dev", "--addr", ADDR, "--prvkey", "nothex",
                           "process", "ps")
    assert rc == 2 and out == ""
    assert "bad private key from --prvkey" in one_error_line(err)


def test_cli_bad_key_env(capsys, monkeypatch):
    monkeypatch.setenv("COLONIES_SERVER_PRVKEY", "abc")
    rc, _, err = run_cli(capsys, "--addr", ADDR, "colony", "ls")
    assert rc == 2
    assert "COLONIES_SERVER_PRVKEY" in one_error_line(err)


def test_cli_missing_settings(capsys):
    rc, _, err = run_cli(capsys, "process", "ps")
    assert rc == 2 and "colony name is not set" in one_error_line(err)
    rc, _, err = run_cli(capsys, "--colony", "dev", "--prvkey", KEY_FLAG.hex, "process", "ps")
    assert rc == 2 and "COLONIES_SERVER_ADDR" in one_error_line(err)


def test_cli_usage_errors(capsys):
    rc, _, err = run_cli(capsys, "process")
    assert rc == 2 and "--help" in one_error_line(err)
    rc, _, err = run_cli(capsys, "process", "close", "--processid", "x", "--attempt", "zero")
    assert rc == 2 and "--attempt" in one_error_line(err)
    rc, _, err = run_cli(capsys, "nosuch")
    assert rc == 2
    one_error_line(err)
    rc, _, err = run_cli(
        capsys, "--colony", "dev", "--prvkey", KEY_FLAG.hex, "--addr", ADDR,
        "process", "run", "--func", "f", "--kwargs", "novalue",
    )
    assert rc == 2 and "--kwargs expects KEY=VALUE" in one_error_line(err)


def test_cli_bad_config_file(capsys, tmp_path):
    bad = write_toml(tmp_path / "c.toml", colony="dev")
    rc, _, err = run_cli(capsys, "--config", str(bad), "process", "ps")
    assert rc == 2 and "unknown key 'colony'" in one_error_line(err)


def test_global_flags_after_the_verb(capsys):
    rc, out, err = run_cli(capsys, "key", "generate", "-o", "json")
    assert rc == 0, err
    doc = json.loads(out)
    assert PrivateKey.from_hex(doc["prvkey"]).id == doc["id"]
    # A flag given before the verb is kept when the leaf does not repeat it.
    rc, out, _ = run_cli(capsys, "-o", "json", "--prvkey", KEY_FLAG.hex, "key", "id")
    assert rc == 0 and json.loads(out) == {"id": KEY_FLAG.id}


def test_key_id_table(capsys, monkeypatch):
    monkeypatch.setenv("COLONIES_PRVKEY", KEY_ENV.hex)
    rc, out, _ = run_cli(capsys, "key", "id")
    assert rc == 0 and out.strip() == KEY_ENV.id


def test_render_values():
    assert fmt_time(0) == "-"
    assert fmt_time(2**63 - 1) == "never"
    assert fmt_time(1_700_000_000_000_000_000).startswith("2023-11-1")
    assert fmt_value("hello") == "hello"
    assert fmt_value({"a": [1, 2]}) == '{"a": [1, 2]}'
    assert fmt_value(3) == "3"


def test_several_node_addresses_comma_separated():
    other = ADDR.replace("50080", "50081")
    cfg = load_config({}, {"COLONIES_SERVER_ADDR": f" {ADDR} , {other},"})
    assert cfg.server_addrs() == [ADDR, other]
    assert cfg.server_addr() == ADDR
    with pytest.raises(ConfigError, match="COLONIES_SERVER_ADDR"):
        load_config({}, {"COLONIES_SERVER_ADDR": f"{ADDR},127.0.0.1:1"}).server_addrs()
    with pytest.raises(ConfigError, match="no node address"):
        load_config({}, {"COLONIES_SERVER_ADDR": " , "}).server_addrs()
