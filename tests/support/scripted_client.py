"""A relaunchd client, watch, clock and systemd driven from a script, for the
`relaunchctl relaunch --wait` tests (tests/unit/cli/test_busclient.py, test_relaunch.py):
each read answers the next entry of the script (the last repeats), so every order a
shutdown can bring is played exactly."""

from __future__ import annotations

from relaunchd.errors import RelaunchError

IDENT = "5b0c1f0e-relaunch"


def remote_error(name: str, message: str = "") -> RelaunchError:
    """What bus.error_names makes of a D-Bus error reply named `name`."""
    err = RelaunchError(message or name)
    err.name = name
    return err


class ScriptedClient:
    """Answers GetAll from a script: a dict is returned, an exception raised; the last
    entry repeats."""

    def __init__(self, *answers, relaunch: object = IDENT) -> None:
        self.answers = list(answers)
        self.reads = 0
        self.relaunch = relaunch
        self.calls: list[tuple[str, dict]] = []

    def properties(self) -> dict:
        self.reads += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return dict(answer)

    def call(self, method: str, *args, options=None, interactive=False):
        self.calls.append((method, options or {}))
        if isinstance(self.relaunch, BaseException):
            raise self.relaunch
        return self.relaunch

    def watch(self) -> ScriptedWatch:
        return ScriptedWatch()


class ScriptedWatch:
    def __init__(self, on_next=None) -> None:
        self.gone = False
        self.on_next = on_next
        self.closed = False

    def next(self, timeout: float) -> list[dict]:
        if self.on_next:
            self.on_next()
        return []

    def close(self) -> None:
        self.closed = True


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0          # every look at the clock is one poll later
        return self.now


def systemd(*states):
    seq = list(states)
    return lambda: seq.pop(0) if len(seq) > 1 else seq[0]
