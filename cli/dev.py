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

    colonies dev --nodes 3       # a 3-node Raft cluster on 127.0.0.1:50080-50082

With --nodes N (N > 1) the nodes are N `colonyd` processes on 127.0.0.1, ports --port BASE ..
BASE+N-1 (default 50080..), data in <dir>/node1 .. <dir>/nodeN, each with colonyd.pid and
colonyd.log there. The first run starts node1 (it bootstraps the cluster with the dev server
key), then each other node with --join node1 (it asks to be added, with the same key, and is
ready once it has caught up). Later runs start the nodes that have data all at once (they
find each other from their saved members), then join any new ones. The colony, executor and
env file are the same as with one node; the env file's COLONIES_SERVER_ADDR lists every node,
comma-separated, so a client starts from any live one and fails over by itself.

A colonyd that dies is reported with its log; dev mode keeps running while a majority of the
nodes lives, and stops everything and exits 1 once the majority is gone (the cluster cannot
commit anything then). Ctrl-C or SIGTERM stops the executor, then every colonyd (SIGTERM,
then SIGKILL after NODE_STOP_TIMEOUT_S), removes the pid files and exits 0. The colonyd
processes get SIGTERM from the kernel if dev mode itself is killed (Linux); a pid file left
by a crashed run is ignored unless its pid is a live colonyd.
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
from node.datadir import tighten, write_private
from protocol.identity import PrivateKey
from protocol.messages import APPROVED

DEFAULT_DIR = ".colonies-dev"
DEFAULT_PORT = 50080
DEFAULT_LISTEN = f"/ip4/127.0.0.1/tcp/{DEFAULT_PORT}"
MAX_NODES = 9
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
        help="run a dev colony (one node, or --nodes N) in the foreground",
        description="Run a node, colony 'dev' and an executor serving echo and helloworld, "
        "all in one process; or, with --nodes N, N colonyd processes on 127.0.0.1 forming "
        "a Raft cluster. Writes DIR/env to source in another shell.",
    )
    p.add_argument("--dir", default=DEFAULT_DIR, type=Path, help=f"state dir (default {DEFAULT_DIR})")
    p.add_argument("--listen", default=None, metavar="MULTIADDR",
                   help=f"single node: listen address (default {DEFAULT_LISTEN})")
    p.add_argument("--nodes", type=node_count, default=1, metavar="N",
                   help="run N colonyd processes as one cluster (default 1: a single in-process "
                   "node); dev mode keeps running while a majority of them lives")
    p.add_argument("--port", type=port_number, default=None, metavar="BASE",
                   help=f"listen on 127.0.0.1 port BASE (the nodes: BASE .. BASE+N-1; "
                   f"default {DEFAULT_PORT}); keep it across runs")
    p.add_argument("--log-level", default=os.environ.get("COLONIES_LOG_LEVEL", "warning"))
    p.set_defaults(run_sync=main)


def node_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid node count {text!r}") from None
    if not 1 <= n <= MAX_NODES:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_NODES}, got {n}")
    return n


def port_number(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"must be 1 to 65535, got {n}")
    return n


# Files.


def load_or_create_keys(
    state_dir: Path, node_dirs: list[Path] | None = None
) -> tuple[DevKeys, bool]:
    """The dev keys, and whether they were created now. `node_dirs` (default <dir>/node)
    must not hold node data when the keys are created."""
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
    for node_dir in node_dirs if node_dirs is not None else [state_dir / NODE_DIR]:
        if node_dir.is_dir() and any(node_dir.iterdir()):
            raise ConfigError(
                f"{path} is missing but {node_dir} holds a node's data (owned by the lost keys); "
                f"delete {state_dir} to start over"
            )
    keys = DevKeys(PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate())
    write_private(
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


def write_env_file(path: Path, values: dict[str, str], note: str = "") -> None:
    body = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items())
    write_private(
        path,
        "# colonies dev environment (holds secret keys): source this file\n" + body
        + (f"# {note}\n" if note else ""),
    )


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


async def ensure_colony(addr: str | list[str], keys: DevKeys) -> None:
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

    nodes: int = getattr(args, "nodes", 1)
    port: int | None = getattr(args, "port", None)
    if nodes == 1:
        if args.listen and port is not None:
            raise ConfigError("use --listen or --port, not both")
        listen = args.listen or (f"/ip4/127.0.0.1/tcp/{port}" if port else DEFAULT_LISTEN)
    else:
        if args.listen:
            raise ConfigError(
                "--listen is for a single node; a --nodes cluster listens on 127.0.0.1, "
                "ports from --port"
            )
        port = DEFAULT_PORT if port is None else port
        if port + nodes - 1 > 65535:
            raise ConfigError(f"--port {port} leaves no room for {nodes} nodes (up to 65535)")
    setup_logging(args.log_level)
    state_dir: Path = args.dir
    os.umask(0o077)  # keys, env file, node data and logs: private (see node/datadir.py)
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tighten(state_dir)
    except OSError as e:
        raise ConfigError(f"cannot create {state_dir}: {e.strerror}") from None
    if nodes == 1:
        trio.run(run_dev, state_dir, listen)
        print("colonies dev: stopped", file=sys.stderr, flush=True)
        return 0
    assert port is not None
    from cli.dev_cluster import run_cluster

    code = trio.run(run_cluster, state_dir, nodes, port)
    print("colonies dev: stopped", file=sys.stderr, flush=True)
    return code
