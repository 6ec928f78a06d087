"""The functions registry in the state machine: register (self only), list, remove, and
functions going with their executor."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from machine_harness import SERVER, Harness, S

from consensus.function_ops import MAX_FUNCTIONS_PER_EXECUTOR
from consensus.machine import ColonyMachine
from protocol.errors import AccessDenied, BadRequest, InvalidField, NotFound
from protocol.messages import MAX_FUNCTION_ARGS, MAX_FUNCTION_DESCRIPTION, PENDING


@pytest.fixture
def dev(h: Harness) -> dict[str, str]:
    return {
        "co": h.colony("dev"),
        "w1": h.executor("dev", "w1"),
        "w2": h.executor("dev", "w2", "gpu"),
        "pending": h.executor("dev", "pending", state=PENDING),
        "co2": h.colony("other"),
        "o1": h.executor("other", "o1"),
    }


def fun(executor: str, funcname: str, colony: str = "dev", **kw: Any) -> dict:
    return {"fun": {"executorname": executor, "colonyname": colony, "funcname": funcname, **kw}}


def ls(h: Harness, caller: str, executor: str = "", colony: str = "dev") -> list[tuple]:
    got = h.read("getfunctionsmsg", caller, {"colonyname": colony, "executorname": executor})
    return [(f["executorname"], f["funcname"]) for f in got]


def test_executors_register_and_members_list(h: Harness, dev):
    f = h.write("addfunctionmsg", dev["w2"], fun("w2", "train", description="fits", args=[1]))
    assert f["executortype"] == "gpu" and f["colonyname"] == "dev"
    assert f["description"] == "fits" and f["args"] == [1] and len(f["functionid"]) == 64
    h.write("addfunctionmsg", dev["w1"], fun("w1", "echo"))
    h.write("addfunctionmsg", dev["w1"], fun("w1", "add"))
    assert ls(h, dev["w2"]) == [("w1", "add"), ("w1", "echo"), ("w2", "train")]
    assert ls(h, dev["w1"], "w1") == [("w1", "add"), ("w1", "echo")]
    with pytest.raises(NotFound, match="executor 'nobody'"):
        ls(h, dev["w1"], "nobody")
    assert ls(h, dev["o1"], colony="other") == []


def test_registering_again_updates_and_keeps_the_id(h: Harness, dev):
    a = h.write("addfunctionmsg", dev["w1"], fun("w1", "echo", description="old"))
    b = h.write("addfunctionmsg", dev["w1"], fun("w1", "echo", description="new"))
    assert a["functionid"] == b["functionid"] and b["description"] == "new"
    assert ls(h, dev["w1"]) == [("w1", "echo")]


def test_only_the_executor_itself_registers_and_removes(h: Harness, dev):
    before = h.m.digest()
    for caller in (dev["w2"], dev["co"], dev["o1"], SERVER):
        with pytest.raises(AccessDenied):
            h.write("addfunctionmsg", caller, fun("w1", "echo"))
    with pytest.raises(AccessDenied):  # not approved yet
        h.write("addfunctionmsg", dev["pending"], fun("pending", "echo"))
    with pytest.raises(NotFound):
        h.write("addfunctionmsg", dev["w1"], fun("ghost", "echo"))
    with pytest.raises(NotFound):
        h.write("addfunctionmsg", dev["w1"], fun("w1", "echo", colony="nosuch"))
    assert h.m.digest() == before
    f = h.write("addfunctionmsg", dev["w1"], fun("w1", "echo"))
    ref = {"functionid": f["functionid"]}
    for caller in (dev["w2"], dev["co"], dev["o1"]):
        with pytest.raises(AccessDenied):
            h.write("removefunctionmsg", caller, ref)
    with pytest.raises(NotFound):
        h.write("removefunctionmsg", dev["w1"], {"functionid": "0" * 64})
    with pytest.raises(AccessDenied):
        ls(h, dev["o1"])
    h.write("removefunctionmsg", dev["w1"], ref)
    assert ls(h, dev["w1"]) == [] and h.m._st.executor_functions == {}


def test_bad_function_input_is_refused(h: Harness, dev):
    before = h.m.digest()
    for body in (
        fun("w1", "bad name"),
        fun("w1", "echo", description="x" * (MAX_FUNCTION_DESCRIPTION + 1)),
        fun("w1", "echo", args=list(range(MAX_FUNCTION_ARGS + 1))),
        {"fun": {"executorname": "w1", "colonyname": "dev"}},
    ):
        with pytest.raises(InvalidField):
            h.write("addfunctionmsg", dev["w1"], body)
    assert h.m.digest() == before


def test_an_executor_serves_a_bounded_number_of_functions(h: Harness, dev):
    cmds = [h.cmd("addfunctionmsg", dev["w1"], fun("w1", f"f{i}"))
            for i in range(MAX_FUNCTIONS_PER_EXECUTOR)]
    assert all(r[0] == 200 for r in h.batch(cmds))
    with pytest.raises(BadRequest, match="the most one may register"):
        h.write("addfunctionmsg", dev["w1"], fun("w1", "one-more"))
    h.write("addfunctionmsg", dev["w1"], fun("w1", "f0", description="update is fine"))


def test_functions_go_with_their_executor_and_colony(h: Harness, dev):
    h.write("addfunctionmsg", dev["w1"], fun("w1", "echo"))
    h.write("addfunctionmsg", dev["w2"], fun("w2", "train"))
    h.write("removeexecutormsg", dev["co"], {"colonyname": "dev", "executorname": "w1"})
    assert ls(h, dev["w2"]) == [("w2", "train")]
    h.write("addfunctionmsg", dev["o1"], fun("o1", "x", colony="other"))
    h.write("removecolonymsg", SERVER, {"colonyname": "dev"})
    assert [f.funcname for f in h.m._st.functions.values()] == ["x"]


def test_functions_survive_snapshots(h: Harness, dev):
    h.write("addfunctionmsg", dev["w2"], fun("w2", "train", args=[{"name": "x"}]))
    h.write("addfunctionmsg", dev["w1"], fun("w1", "echo"))
    data = msgpack.unpackb(msgpack.packb(h.m.snapshot()), raw=False)
    restored = ColonyMachine.restore(data)
    assert restored.digest() == h.m.digest()
    body = {"colonyname": "dev", "executorname": ""}
    assert restored.read("getfunctionsmsg", dev["w1"], body, h.now) == h.read(
        "getfunctionsmsg", dev["w1"], body
    )


def test_successful_runs_update_the_functions_statistics(h: Harness, dev):
    f = h.write("addfunctionmsg", dev["w1"], fun("w1", "echo"))
    assert (f["counter"], f["avgexectime"]) == (0, 0)
    for wait_s, exec_s in ((1, 2), (3, 6)):
        h.submit(dev["w1"], "dev")  # funcname echo
        h.now += wait_s * S
        p = h.assign(dev["w1"], "dev")
        h.now += exec_s * S
        h.close(dev["w1"], p)
    # A failed run and a function the executor did not register count nothing.
    h.submit(dev["w1"], "dev")
    h.close(dev["w1"], h.assign(dev["w1"], "dev"), ok=False)
    h.submit(dev["w1"], "dev", funcname="other")
    h.close(dev["w1"], h.assign(dev["w1"], "dev"))
    (got,) = h.read("getfunctionsmsg", dev["w1"], {"colonyname": "dev", "executorname": "w1"})
    assert got["counter"] == 2
    assert (got["minwaittime"], got["maxwaittime"], got["avgwaittime"]) == (1.0, 3.0, 2.0)
    assert (got["minexectime"], got["maxexectime"], got["avgexectime"]) == (2.0, 6.0, 4.0)
    restored = ColonyMachine.restore(msgpack.unpackb(msgpack.packb(h.m.snapshot()), raw=False))
    assert restored.digest() == h.m.digest()
    body = {"colonyname": "dev", "executorname": "w1"}
    assert restored.read("getfunctionsmsg", dev["w1"], body, h.now) == [got]
