"""Where the `colonies` command gets its settings, and the checks that make a bad one obvious.

Precedence, highest first: command-line flags, `COLONIES_*` environment variables (Colonies'
HEAD names), a TOML file, defaults. The file is `--config FILE`, else `$COLONIES_CONFIG`, else
`~/.colonies/config.toml` when it exists:

    server_addr   = "/ip4/127.0.0.1/tcp/50080/p2p/16Uiu2..."
    colony_name   = "dev"
    prvkey        = "..."   # the acting user or executor
    colony_prvkey = "..."   # the colony owner
    server_prvkey = "..."   # the server owner
    executor_type = "cli"
    executor_name = "dev-executor"
    output        = "table" # or "json"

Values are checked when a command uses them, not when they are loaded, so a stale key that a
command does not need never gets in its way; the error then names where the bad value came
from. The file itself (syntax, unknown keys, types) is checked when it is read.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from protocol.errors import ColoniesError
from protocol.identity import PrivateKey

# Setting name -> (flag, environment variable). None: no such flag / variable.
SETTINGS: dict[str, tuple[str | None, str | None]] = {
    "server_addr": ("--addr", "COLONIES_SERVER_ADDR"),
    "colony_name": ("--colony", "COLONIES_COLONY_NAME"),
    "prvkey": ("--prvkey", "COLONIES_PRVKEY"),
    "colony_prvkey": ("--colony-prvkey", "COLONIES_COLONY_PRVKEY"),
    "server_prvkey": ("--server-prvkey", "COLONIES_SERVER_PRVKEY"),
    "executor_type": (None, "COLONIES_EXECUTOR_TYPE"),
    "executor_name": (None, "COLONIES_EXECUTOR_NAME"),
    "output": ("--output", None),
}

CONFIG_ENV = "COLONIES_CONFIG"
DEFAULT_CONFIG_PATH = Path("~/.colonies/config.toml")

# The executor type that `colonies dev` registers (as Colonies' docker-compose.env does), so
# `colonies process run` reaches the dev executor with no further setting.
DEFAULT_EXECUTOR_TYPE = "cli"
OUTPUTS = ("table", "json")

DEFAULTS: dict[str, str] = {"executor_type": DEFAULT_EXECUTOR_TYPE, "output": "table"}

# What each setting is for, shown when a command needs one that is not set.
PURPOSE = {
    "server_addr": "the node's full multiaddr (/ip4/HOST/tcp/PORT/p2p/PEERID), or several, comma-separated",
    "colony_name": "the colony name",
    "prvkey": "the private key of the acting user or executor",
    "colony_prvkey": "the colony owner's private key",
    "server_prvkey": "the server owner's private key",
    "executor_type": "the executor type",
    "executor_name": "the executor name",
}

# As protocol/schema.py NAME: what the node accepts as a colony, executor or function name.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")


class ConfigError(Exception):
    """A missing or bad setting: reported as one line, exit status 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Setting:
    value: str
    source: str  # "--prvkey", "COLONIES_PRVKEY", "config.toml (prvkey)" or "default"


@dataclass(frozen=True)
class Config:
    settings: dict[str, Setting] = field(default_factory=dict)
    config_file: Path | None = None

    def get(self, name: str) -> str | None:
        s = self.settings.get(name)
        return s.value if s is not None else None

    def source(self, name: str) -> str:
        s = self.settings.get(name)
        return s.source if s is not None else "unset"

    def require(self, name: str) -> str:
        s = self.settings.get(name)
        if s is None:
            raise ConfigError(f"{PURPOSE.get(name, name)} is not set: {how_to_set(name)}")
        return s.value

    @property
    def output(self) -> str:
        return self.get("output") or "table"

    def server_addrs(self) -> list[str]:
        """One node address or several, comma-separated (members of one cluster: the
        client tries them in order and learns the rest from the first that answers)."""
        value = self.require("server_addr")
        addrs = [a for a in (x.strip() for x in value.split(",")) if a]
        if not addrs:
            raise ConfigError(f"no node address in {self.source('server_addr')}")
        return [check_addr(a, self.source("server_addr")) for a in addrs]

    def server_addr(self) -> str:
        """The first configured node address."""
        return self.server_addrs()[0]

    def colony_name(self) -> str:
        return check_name(self.require("colony_name"), self.source("colony_name"))

    def executor_type(self) -> str:
        return check_name(self.require("executor_type"), self.source("executor_type"))

    def key(self, name: str) -> PrivateKey:
        """The private key setting `name` (prvkey, colony_prvkey, server_prvkey), checked."""
        return parse_key(self.require(name), self.source(name))

    def has(self, name: str) -> bool:
        return name in self.settings


def how_to_set(name: str) -> str:
    flag, env = SETTINGS[name]
    ways = [w for w in (flag, env) if w]
    ways.append(f"'{name}' in the config file")
    return "use " + ", ".join(ways[:-1]) + " or " + ways[-1] if len(ways) > 1 else ways[0]


def parse_key(value: str, source: str) -> PrivateKey:
    try:
        return PrivateKey.from_hex(value.strip())
    except ColoniesError as e:
        raise ConfigError(f"bad private key from {source}: {e.message}") from None


def check_addr(addr: str, source: str) -> str:
    addr = addr.strip()
    if not addr.startswith("/") or "/p2p/" not in addr:
        raise ConfigError(
            f"bad node address from {source}: {addr!r} is not a full multiaddr "
            "like /ip4/127.0.0.1/tcp/50080/p2p/<peer id>"
        )
    return addr


def check_name(value: str, source: str) -> str:
    if not NAME.fullmatch(value):
        raise ConfigError(
            f"bad name from {source}: {value!r} (use letters, digits and _ . : @ -, "
            "starting with a letter or digit, at most 128 characters)"
        )
    return value


def config_path(flag: str | None, env: Mapping[str, str], home: Path | None = None) -> Path | None:
    """The config file to read, or None. An explicitly named file must exist."""
    if flag:
        path, source = Path(flag).expanduser(), "--config"
    elif env.get(CONFIG_ENV):
        path, source = Path(env[CONFIG_ENV]).expanduser(), CONFIG_ENV
    else:
        default = (home / ".colonies" / "config.toml") if home else DEFAULT_CONFIG_PATH.expanduser()
        return default if default.is_file() else None
    if not path.is_file():
        raise ConfigError(f"config file {path} (from {source}) does not exist")
    return path


def read_config_file(path: Path) -> dict[str, str]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    out: dict[str, str] = {}
    for key, value in data.items():
        if key not in SETTINGS:
            known = ", ".join(sorted(SETTINGS))
            raise ConfigError(f"config file {path}: unknown key {key!r} (known keys: {known})")
        if not isinstance(value, str):
            raise ConfigError(f"config file {path}: {key!r} must be a string")
        out[key] = value
    if "output" in out and out["output"] not in OUTPUTS:
        raise ConfigError(f"config file {path}: 'output' must be one of {', '.join(OUTPUTS)}")
    return out


def load_config(
    flags: Mapping[str, str | None],
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
    home: Path | None = None,
) -> Config:
    """Merge flags (by setting name), environment, the config file and defaults.

    Empty values count as unset, so `COLONIES_PRVKEY= colonies ...` falls through to the file.
    """
    env = os.environ if env is None else env
    path = config_path(config_file, env, home)
    from_file = read_config_file(path) if path is not None else {}
    settings: dict[str, Setting] = {}
    for name, (flag, var) in SETTINGS.items():
        if flag and flags.get(name):
            settings[name] = Setting(str(flags[name]), flag)
        elif var and env.get(var):
            settings[name] = Setting(env[var], var)
        elif from_file.get(name):
            settings[name] = Setting(from_file[name], f"config file {path} ({name})")
        elif name in DEFAULTS:
            settings[name] = Setting(DEFAULTS[name], "default")
    return Config(settings, path)
