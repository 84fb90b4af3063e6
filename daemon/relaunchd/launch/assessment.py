"""The readiness report: the platform facts read once and every launch method judged on
them (launch layer). `relaunchctl check` prints it; the engine's `Capabilities` come from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relaunchd.launch import registry
from relaunchd.launch.checks import Verdict
from relaunchd.platform.readiness import ProbeConfig, read_facts
from relaunchd.platform.sysroot import Read


@dataclass(frozen=True)
class Report:
    root: str
    facts: dict[str, Read]
    verdicts: dict[str, Verdict]

    @property
    def best(self) -> str | None:
        """The strongest ready method: a DRTM launch before a plain measured kexec."""
        return next((m for m in registry.NAMES if self.verdicts[m].ready), None)

    def to_json(self) -> dict[str, Any]:
        facts = {}
        for name, r in self.facts.items():
            entry: dict[str, Any] = {"value": r.value, "source": r.path}
            if r.error:
                entry["error"] = r.error
            if r.detail:
                entry["detail"] = r.detail
            facts[name] = entry
        methods = {m: {"ready": v.ready, "reasons": [c.as_reason() for c in v.reasons],
                       "checks": [{**c.as_reason(), "ok": c.ok} for c in v.checks]}
                   for m, v in self.verdicts.items()}
        return {"root": self.root, "best": self.best, "methods": methods, "facts": facts}


def assess(config: ProbeConfig | None = None) -> Report:
    """Read the platform facts once and judge every method on them."""
    facts = read_facts(config)
    verdicts = {m.name: m.verdict(facts) for m in registry.methods()}
    return Report(facts.root.root, facts.facts, verdicts)
