"""`colonies dev`: a single-node colony in one process, for trying things out.

    colonies dev                 # then, in another shell:
    source .colonies-dev/env
    colonies process run --func echo --args hello --wait

It runs, in one trio loop: a ColonyNode (data in <dir>/node), colony `dev`, an approved
executor `dev-executor` of type `cli` (the default executor type of `colonies process run`),
and an in-process executor serving `echo` (returns its args) and `helloworld`. The first run
creates the dev keys (server owner, colony owner, executor) in <dir>/keys.toml; later runs
reuse them and the node's data, so the colony, executor and processes are still there. The
node listens on a fixed port by default so <dir>/env stays valid across restarts.
Ctrl-C or SIGTERM stops everything and exits 0.

The keys file uses config-file names, so `colonies --config <dir>/keys.toml` works too.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from cli.config import DEFAULT_EXECUTOR_TYPE, ConfigError, parse_key
from protocol.identity import PrivateKey
from protocol.messages import APPROVED

DEFAULT_DIR = ".colonies-dev"
DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/50080"
COLONY_NAME = "dev"
EXECUTOR_NAME = "dev-executor"
EXECUTOR_TYPE = DEFAULT_EXECUTOR_TYPE
KEYS_FILE = "keys.toml"
ENV_FILE = "env"
NODE_DIR = "node"
# How long the in-process executor long-polls: the node drains in-flight calls on shutdown,
# so this bounds how long a stop waits for an idle executor.
EXECUTOR_POLL_S = 1

log = logging.getLogger("colonies.dev")


@dataclass(frozen=True)
class DevKeys:
    server: PrivateKey
    colony: PrivateKey
    executor: PrivateKey


def add_parser(groups: argparse._SubParsersAction) -> None:
    p = groups.add_parser(
        "dev",
        help="run a single-node dev colony in the foreground",
        description="Run a node, colony 'dev' and an executor serving echo and helloworld, "
        "all in one process. Writes DIR/env to source in another shell.",
    )
    p.add_argument("--dir", default=DEFAULT_DIR, type=Path, help=f"state dir (default {DEFAULT_DIR})")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="MULTIADDR",
                   help=f"node listen address (default {DEFAULT_LISTEN})")
    p.add_argument("--log-level", default=os.environ.get("COLONIES_LOG_LEVEL", "warning"))
    p.set_defaults(run_sync=main)


# Files.


def _write_private(path: Path, text: str) -> None:
    """Mode 0600 from the first byte, then moved into place (never a readable partial file)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def load_or_create_keys(state_dir: Path) -> tuple[DevKeys, bool]:
    """The dev keys, and whether they were created now."""
    path = state_dir / KEYS_FILE
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read {path}: {e}; delete {state_dir} to start over") from None
        try:
            keys = DevKeys(
                server=parse_key(str(data["server_prvkey"]), f"{path} (server_prvkey)"),
                colony=parse_key(str(data["colony_prvkey"]), f"{path} (colony_prvkey)"),
                executor=parse_key(str(data["prvkey"]), f"{path} (prvkey)"),
            )
        except KeyError as e:
            raise ConfigError(f"{path} lacks {e.args[0]!r}; delete {state_dir} to start over") from None
        return keys, False
    node_dir = state_dir / NODE_DIR
    if node_dir.is_dir() and any(node_dir.iterdir()):
        raise ConfigError(
            f"{path} is missing but {node_dir} holds a node's data (owned by the lost keys); "
            f"delete {state_dir} to start over"
        )
    keys = DevKeys(PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate())
    _write_private(
        path,
        "# colonies dev keys: secret. Usable as a config file (colonies --config ...).\n"
        f'server_prvkey = "{keys.server.hex}"\n'
        f'colony_prvkey = "{keys.colony.hex}"\n'
        f'prvkey = "{keys.executor.hex}"  # executor {EXECUTOR_NAME}\n'
        f'colony_name = "{COLONY_NAME}"\n'
        f'executor_type = "{EXECUTOR_TYPE}"\n'
        f'executor_name = "{EXECUTOR_NAME}"\n',
    )
    return keys, True


def env_lines(addr: str, keys: DevKeys) -> dict[str, str]:
    return {
        "COLONIES_SERVER_ADDR": addr,
        "COLONIES_COLONY_NAME": COLONY_NAME,
        "COLONIES_PRVKEY": keys.executor.hex,
        "COLONIES_COLONY_PRVKEY": keys.colony.hex,
        "COLONIES_SERVER_PRVKEY": keys.server.hex,
        "COLONIES_EXECUTOR_TYPE": EXECUTOR_TYPE,
        "COLONIES_EXECUTOR_NAME": EXECUTOR_NAME,
    }


def write_env_file(path: Path, values: dict[str, str]) -> None:
    body = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())
    _write_private(path, "# colonies dev environment (holds secret keys): source this file\n" + body)


def dialable(addrs: list[str]) -> str:
    """The address a local client should use: 0.0.0.0 and :: mean 'this host'."""
    for a in addrs:
        if "/ip4/0.0.0.0/" not in a and "/ip6/::/" not in a:
            return a
    a = addrs[0]
    return a.replace("/ip4/0.0.0.0/", "/ip4/127.0.0.1/").replace("/ip6/::/", "/ip6/::1/")


# The dev colony.


def echo(*args: Any, **kwargs: Any) -> list:
    return list(args)


def helloworld(*args: Any, **kwargs: Any) -> str:
    return "Hello, World!"


async def ensure_colony(addr: str, keys: DevKeys) -> None:
    """Register colony `dev` and approve `dev-executor`, unless an earlier run did."""
    from node.client import Client

    async with Client.connect(addr, keys.server) as c:
        colonies = {col["name"]: col for col in await c.colonies()}
        existing = colonies.get(COLONY_NAME)
        if existing is None:
            await c.add_colony(keys.colony.id, COLONY_NAME)
        elif existing["colonyid"] != keys.colony.id:
            raise ConfigError(
                f"colony {COLONY_NAME} exists with another owner ({existing['colonyid']}); "
                "the dev keys do not match the node's data"
            )
        owner = c.with_key(keys.colony)
        executors = {e["executorname"]: e for e in await owner.executors(COLONY_NAME)}
        ex = executors.get(EXECUTOR_NAME)
        if ex is None:
            await owner.add_executor(keys.executor.id, EXECUTOR_NAME, EXECUTOR_TYPE, COLONY_NAME)
        elif ex["executorid"] != keys.executor.id or ex["executortype"] != EXECUTOR_TYPE:
            raise ConfigError(
                f"executor {EXECUTOR_NAME} exists with another id or type; "
                "the dev keys do not match the node's data"
            )
        if ex is None or ex["state"] != APPROVED:
            await owner.approve_executor(COLONY_NAME, EXECUTOR_NAME)


async def run_dev(state_dir: Path, listen: str) -> None:
    from node.daemon import ColonyNode, NodeConfig
    from node.executor import Executor

    keys, created = load_or_create_keys(state_dir)
    node = ColonyNode(
        NodeConfig(data_dir=state_dir / NODE_DIR, listen=[listen], server_prvkey=keys.server.hex)
    )
    executor: Executor | None = None

    async with trio.open_nursery() as nursery:

        async def run_node(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            # The node handles SIGTERM/SIGINT once it is ready: it drains calls, then returns.
            await node.run(task_status=task_status)
            nursery.cancel_scope.cancel()

        async def abort_on_signal_while_starting() -> None:
            # Before the node takes over the signals (it does once ready), a signal aborts.
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    node.stop()
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(abort_on_signal_while_starting)
        await nursery.start(run_node)
        addr = dialable(node.addrs)
        await ensure_colony(addr, keys)

        executor = Executor(
            addr, keys.executor, colonyname=COLONY_NAME, executortype=EXECUTOR_TYPE,
            poll_timeout=EXECUTOR_POLL_S,
        )
        executor.function(echo)
        executor.function(helloworld)

        async def stop_executor_with_node() -> None:
            # The node drains on a signal; the executor's long-poll must end for it to finish.
            while node.rpc is None or not node.rpc.stopping:
                await trio.sleep(0.05)
            logging.getLogger("colonies.executor").setLevel(logging.ERROR)
            assert executor is not None
            executor.stop()

        nursery.start_soon(executor.run)
        nursery.start_soon(stop_executor_with_node)

        env_path = state_dir / ENV_FILE
        write_env_file(env_path, env_lines(addr, keys))
        print("ready", flush=True)
        print(
            f"colonies dev: node {addr}\n"
            f"  colony {COLONY_NAME}, executor {EXECUTOR_NAME} (type {EXECUTOR_TYPE}) serving "
            f"echo, helloworld; {'new' if created else 'existing'} keys in "
            f"{state_dir / KEYS_FILE}\n"
            "  in another shell:\n"
            f"    source {shlex.quote(str(env_path))}\n"
            "    colonies process run --func echo --args hello --wait\n"
            "  Ctrl-C stops.",
            flush=True,
        )


def main(args: argparse.Namespace) -> int:
    from cli.logs import setup_logging

    setup_logging(args.log_level)
    state_dir: Path = args.dir
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {state_dir}: {e.strerror}") from None
    trio.run(run_dev, state_dir, args.listen)
    print("colonies dev: stopped", file=sys.stderr, flush=True)
    return 0
