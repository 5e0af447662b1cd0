"""Every signal of one engine job, recorded for tests."""


class Recorder:
    """Every signal of one job, in arrival order."""

    def __init__(self, handle):
        self.events = []
        handle.started.connect(lambda: self.events.append(("started",)))
        handle.progress.connect(lambda done, total, text: self.events.append(("progress", done, total, text)))
        handle.yielded.connect(lambda item: self.events.append(("yielded", item)))
        handle.returned.connect(lambda result: self.events.append(("returned", result)))
        handle.errored.connect(lambda message: self.events.append(("errored", message)))
        handle.cancelled.connect(lambda: self.events.append(("cancelled",)))
        handle.finished.connect(lambda: self.events.append(("finished",)))

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]

    def of(self, kind: str) -> list[tuple]:
        return [e for e in self.events if e[0] == kind]
