"""StagedImage carries the quiesce plan's summary (issue #14, item 5): who holds what the
relaunch takes away, and how many processes the scan could not look into, with the note
that says why — what `relaunchctl status` prints."""

from __future__ import annotations

import json

from relaunchd.platform import quiesce
from support.engine_env import EngineEnv
from support.fakes import FakeMachine

NOTE = "could not inspect 3 processes: missing CAP_SYS_PTRACE"


class ScanRefused(FakeMachine):
    def quiesce_plan(self, policy):
        return quiesce.QuiescePlan(
            reboot_cpu=0, offline_cpus=(1,), kept_cpus=(), devices=(),
            holders=(quiesce.Holder(42, "tpm2-abrmd", "/dev/tpmrm0"),), notes=(NOTE,),
            uninspected=3)


def test_staged_image_says_how_many_processes_were_not_inspected(tmp_path, keys):
    env = EngineEnv.create(tmp_path, str(keys["db"].cert), ScanRefused())
    engine = env.engine()
    engine.stage(env.image("a.efi"))
    assert engine.wait(5) == "staged"
    summary = engine.staged_image["quiesce"]
    assert summary["uninspected"] == 3 and summary["notes"] == [NOTE]
    assert summary["holders"] == [{"pid": 42, "comm": "tpm2-abrmd", "path": "/dev/tpmrm0"}]
    assert summary["offline_cpus"] == [1]
    # the plan the shutdown hook reads keeps the count too
    plan = engine.store.load_runtime("quiesce-plan.json")["plan"]
    assert plan["uninspected"] == 3 and NOTE in plan["notes"]
    assert quiesce.QuiescePlan.from_json(json.dumps(plan)).uninspected == 3
