"""The role table: every message has the rule the semantics notes give it, and each rule
admits exactly the callers it should (checked through ColonyMachine.authorize and read)."""

from __future__ import annotations

import pytest
from machine_harness import SERVER, Harness, make_id

from consensus.roles import RULES
from protocol.errors import AccessDenied, NotFound
from protocol.messages import MESSAGES, OUT, PENDING, REJECTED

PEER = "16Uiu2HAmMmu7o74vsbemwzENv8XTtQxKzKCkJTTAiS3ddBgfwwqJ"

EXPECTED_SYMBOLS = {
    "getstatisticsmsg": "SO",
    "getstatedigestmsg": "SO",
    "addcolonymsg": "SO",
    "removecolonymsg": "SO",
    "getcoloniesmsg": "SO",
    "getcolonymsg": "M✓",
    "getcolonystatsmsg": "M✓|CO",
    "addexecutormsg": "CO",
    "approveexecutormsg": "CO",
    "rejectexecutormsg": "CO",
    "removeexecutormsg": "CO",
    "getexecutorsmsg": "M|CO",
    "getexecutormsg": "M✓|CO",
    "submitfuncspecmsg": "M✓",
    "assignprocessmsg": "M✓",
    "closesuccessfulmsg": "M✓+A",
    "closefailedmsg": "M✓+A",
    "closeassignmsg": "M✓+A & M✓",
    "getprocessmsg": "M✓",
    "getprocessesmsg": "M✓",
    "removeprocessmsg": "M✓",
    "removeallprocessesmsg": "CO",
    "addattributemsg": "M✓+A",
    "getattributemsg": "M✓",
    "cancelprocessmsg": "M✓",
    "submitworkflowspecmsg": "M✓",
    "getprocessgraphmsg": "M✓",
    "getprocessgraphsmsg": "M✓",
    "removeprocessgraphmsg": "M✓",
    "removeallprocessgraphsmsg": "CO",
    "cancelprocessgraphmsg": "M✓",
    "addchildmsg": "M✓+A",
    "addmembermsg": "SO",
    "removemembermsg": "SO",
    # Logs, functions, pause, executor liveness.
    "addlogmsg": "M✓+A",
    "getlogsmsg": "M✓",
    "addfunctionmsg": "M✓ & SELF",
    "removefunctionmsg": "M✓+SELF",
    "getfunctionsmsg": "M✓",
    "pauseassignmentsmsg": "CO",
    "resumeassignmentsmsg": "CO",
    "getpausestatusmsg": "M|CO",
    "executorheartbeatmsg": "M",
    "setexecutorstaleaftermsg": "CO",
    # Generators and crons.
    "addgeneratormsg": "M✓",
    "getgeneratormsg": "M✓",
    "getgeneratorsmsg": "M✓",
    "removegeneratormsg": "M✓",
    "packgeneratormsg": "M✓",
    "addcronmsg": "M✓",
    "getcronmsg": "M✓",
    "getcronsmsg": "M✓",
    "removecronmsg": "M✓",
    "runcronmsg": "M✓",
    # Beyond Colonies: retention, export, subscriptions.
    "setretentionmsg": "CO",
    "getretentionmsg": "M✓|CO",
    "exportprocessesmsg": "M✓|CO",
    "waitprocessmsg": "M✓|CO",
    "followprocessesmsg": "M✓|CO",
}

# Who passes each rule in the world built below.
ALLOWED = {
    "SO": {"so"},
    "CO": {"co"},
    "M✓": {"assigned", "peer"},
    "M✓|CO": {"assigned", "peer", "co"},
    "M|CO": {"assigned", "peer", "pending", "rejected", "co"},
    "M✓+A": {"assigned"},
    "M✓+A & M✓": {"assigned"},
    # Logs, functions, pause, executor liveness.
    "M✓ & SELF": {"peer"},
    "M✓+SELF": {"peer"},
    "M": {"assigned", "peer", "pending", "rejected"},
}


class World:
    """Colony dev: owner co, an executor running process P (with attribute A) and the root
    R of workflow G, an approved peer, a pending and a rejected executor. Colony other: owner
    co2 and member o1."""

    def __init__(self) -> None:
        h = self.h = Harness()
        self.ids = {"so": SERVER, "co": h.colony("dev"), "co2": h.colony("other")}
        self.ids["assigned"] = h.executor("dev", "w1")
        self.ids["peer"] = h.executor("dev", "peer")
        self.ids["pending"] = h.executor("dev", "pending", state=PENDING)
        self.ids["rejected"] = h.executor("dev", "rejected", state=REJECTED)
        self.ids["o1"] = h.executor("other", "o1")
        self.ids["stranger"] = make_id("stranger")
        h.submit(self.ids["assigned"], "dev")
        self.p = h.assign(self.ids["assigned"], "dev")
        self.a = h.write(
            "addattributemsg",
            self.ids["assigned"],
            {
                "attribute": {
                    "targetid": self.p["processid"],
                    "attributetype": OUT,
                    "key": "k",
                    "value": "v",
                }
            },
        )
        wf = {"colonyname": "dev", "functionspecs": [dict(h.spec("dev"), nodename="r")]}
        self.g = h.write("submitworkflowspecmsg", self.ids["assigned"], {"spec": wf})
        self.r = h.assign(self.ids["assigned"], "dev")
        assert self.r["processgraphid"] == self.g["processgraphid"]
        # Logs, functions, pause, executor liveness: a function the peer serves.
        fun = {"executorname": "peer", "colonyname": "dev", "funcname": "f"}
        self.f = h.write("addfunctionmsg", self.ids["peer"], {"fun": fun})
        # Generators and crons: one of each, added by the peer.
        self.wf = {"functionspecs": [dict(h.spec("dev"), nodename="r")]}
        generator = {"colonyname": "dev", "name": "gen", "workflowspec": self.wf, "trigger": 5}
        self.gen = h.write("addgeneratormsg", self.ids["peer"], {"generator": generator})
        cron = {"colonyname": "dev", "name": "cron", "workflowspec": self.wf, "interval": 60}
        self.cron = h.write("addcronmsg", self.ids["peer"], {"cron": cron})

    def body(self, msgtype: str) -> dict:
        pid, aid = self.p["processid"], self.a["attributeid"]
        gid = self.g["processgraphid"]
        ref = {"colonyname": "dev", "executorname": "peer"}
        executor = {
            "executorid": make_id("new"),
            "executortype": "cli",
            "executorname": "new",
            "colonyname": "dev",
        }
        spec = {"funcname": "f", "conditions": {"colonyname": "dev", "executortype": "cli"}}
        return {
            "getstatisticsmsg": {},
            "getstatedigestmsg": {},
            "addmembermsg": {"peerid": PEER, "addr": f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}"},
            "removemembermsg": {"peerid": PEER},
            "addcolonymsg": {"colony": {"colonyid": make_id("c3"), "name": "c3"}},
            "removecolonymsg": {"colonyname": "dev"},
            "getcoloniesmsg": {},
            "getcolonymsg": {"colonyname": "dev"},
            "getcolonystatsmsg": {"colonyname": "dev"},
            "addexecutormsg": {"executor": executor},
            "approveexecutormsg": ref,
            "rejectexecutormsg": ref,
            "removeexecutormsg": ref,
            "getexecutorsmsg": {"colonyname": "dev"},
            "getexecutormsg": ref,
            "submitfuncspecmsg": {"spec": spec},
            "assignprocessmsg": {"colonyname": "dev", "timeout": -1},
            "closesuccessfulmsg": {"processid": pid, "attempt": 1},
            "closefailedmsg": {"processid": pid, "attempt": 1},
            "closeassignmsg": {
                "processid": pid,
                "attempt": 1,
                "colonyname": "dev",
                "timeout": -1,
                "successful": True,
            },
            "getprocessmsg": {"processid": pid},
            "getprocessesmsg": {"colonyname": "dev"},
            "removeprocessmsg": {"processid": pid},
            "removeallprocessesmsg": {"colonyname": "dev", "state": -1},
            "addattributemsg": {
                "attribute": {"targetid": pid, "attributetype": OUT, "key": "k2", "value": "v"}
            },
            "getattributemsg": {"attributeid": aid},
            "cancelprocessmsg": {"processid": pid},
            "submitworkflowspecmsg": {
                "spec": {"colonyname": "dev", "functionspecs": [dict(spec, nodename="a")]}
            },
            "getprocessgraphmsg": {"processgraphid": gid},
            "getprocessgraphsmsg": {"colonyname": "dev"},
            "removeprocessgraphmsg": {"processgraphid": gid},
            "removeallprocessgraphsmsg": {"colonyname": "dev", "state": -1},
            "cancelprocessgraphmsg": {"processgraphid": gid},
            "addchildmsg": {
                "processgraphid": gid,
                "parentprocessid": self.r["processid"],
                "spec": dict(spec, nodename="child"),
            },
            # Logs, functions, pause, executor liveness.
            "addlogmsg": {"processid": pid, "message": "hello"},
            "getlogsmsg": {"processid": pid},
            "addfunctionmsg": {"fun": {"executorname": "peer", "colonyname": "dev",
                                       "funcname": "g"}},
            "removefunctionmsg": {"functionid": self.f["functionid"]},
            "getfunctionsmsg": {"colonyname": "dev"},
            "pauseassignmentsmsg": {"colonyname": "dev"},
            "resumeassignmentsmsg": {"colonyname": "dev"},
            "getpausestatusmsg": {"colonyname": "dev"},
            "executorheartbeatmsg": {"colonyname": "dev"},
            "setexecutorstaleaftermsg": {"colonyname": "dev", "staleafter": 60},
            # Generators and crons.
            "addgeneratormsg": {"generator": {"colonyname": "dev", "name": "g2",
                                              "workflowspec": self.wf, "trigger": 2}},
            "getgeneratormsg": {"generatorid": self.gen["generatorid"]},
            "getgeneratorsmsg": {"colonyname": "dev"},
            "removegeneratormsg": {"generatorid": self.gen["generatorid"]},
            "packgeneratormsg": {"generatorid": self.gen["generatorid"], "arg": "a"},
            "addcronmsg": {"cron": {"colonyname": "dev", "name": "c2",
                                    "workflowspec": self.wf, "interval": 5}},
            "getcronmsg": {"cronid": self.cron["cronid"]},
            "getcronsmsg": {"colonyname": "dev"},
            "removecronmsg": {"cronid": self.cron["cronid"]},
            "runcronmsg": {"cronid": self.cron["cronid"]},
            # Beyond Colonies: retention, export, subscriptions.
            "setretentionmsg": {"colonyname": "dev", "seconds": 3600},
            "getretentionmsg": {"colonyname": "dev"},
            "exportprocessesmsg": {"colonyname": "dev"},
            "waitprocessmsg": {"processid": pid, "state": -1, "timeout": 0},
            "followprocessesmsg": {"colonyname": "dev"},
        }[msgtype]


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def test_every_served_message_has_its_rule():
    served = {name for name in MESSAGES if name != "getserverinfomsg"}
    assert set(RULES) == served
    assert {name: rule.symbol for name, rule in RULES.items()} == EXPECTED_SYMBOLS


@pytest.mark.parametrize("msgtype", sorted(EXPECTED_SYMBOLS))
def test_rule_admits_exactly_its_callers(world: World, msgtype: str):
    allowed = ALLOWED[EXPECTED_SYMBOLS[msgtype]]
    body = world.body(msgtype)
    for who, caller in world.ids.items():
        if who in allowed:
            world.h.m.authorize(msgtype, caller, body)
        else:
            with pytest.raises(AccessDenied):
                world.h.m.authorize(msgtype, caller, body)


@pytest.mark.parametrize("msgtype", sorted(n for n, m in MESSAGES.items() if not m.write))
def test_reads_apply_the_same_rule(world: World, msgtype: str):
    if msgtype == "getserverinfomsg":
        return
    allowed = ALLOWED[EXPECTED_SYMBOLS[msgtype]]
    body = world.body(msgtype)
    for who, caller in world.ids.items():
        if who in allowed:
            world.h.m.read(msgtype, caller, body, world.h.now)
        else:
            with pytest.raises(AccessDenied):
                world.h.m.read(msgtype, caller, body, world.h.now)


MISSING = {
    "colonyname": "nosuch",
    "processid": make_id("no-process"),
    "attributeid": make_id("no-attribute"),
    "processgraphid": make_id("no-graph"),
    "functionid": make_id("no-function"),
    "generatorid": make_id("no-generator"),
    "cronid": make_id("no-cron"),
}


@pytest.mark.parametrize("msgtype", sorted(n for n, s in EXPECTED_SYMBOLS.items() if s != "SO"))
def test_a_missing_object_is_404_before_the_role(world: World, msgtype: str):
    body = dict(world.body(msgtype))
    if "executor" in body:
        body["executor"] = dict(body["executor"], colonyname="nosuch")
    elif "parentprocessid" in body:  # addchildmsg: the parent is what the rule looks up
        body["parentprocessid"] = MISSING["processid"]
    elif "functionspecs" in body.get("spec", {}):
        body["spec"] = dict(body["spec"], colonyname="nosuch")
    elif "spec" in body:
        body["spec"] = {
            **body["spec"],
            "conditions": {"colonyname": "nosuch", "executortype": "cli"},
        }
    elif "attribute" in body:
        body["attribute"] = dict(body["attribute"], targetid=MISSING["processid"])
    elif "fun" in body:  # addfunctionmsg: its colony
        body["fun"] = dict(body["fun"], colonyname="nosuch")
    elif "generator" in body or "cron" in body:  # add: the colony it names
        kind = "generator" if "generator" in body else "cron"
        body[kind] = dict(body[kind], colonyname="nosuch")
    else:
        keys = ("processid", "attributeid", "processgraphid", "functionid", "generatorid",
                "cronid", "colonyname")
        key = next(k for k in keys if k in body)
        body[key] = MISSING[key]
    for caller in world.ids.values():
        with pytest.raises(NotFound):
            world.h.m.authorize(msgtype, caller, body)


def test_apply_rechecks_the_rule(world: World):
    """The pre-check is a courtesy: apply refuses on its own, with the same error."""
    h = world.h
    with pytest.raises(AccessDenied):
        h.write("removeallprocessesmsg", world.ids["peer"], world.body("removeallprocessesmsg"))
    with pytest.raises(AccessDenied):
        h.write("closesuccessfulmsg", world.ids["peer"], world.body("closesuccessfulmsg"))
