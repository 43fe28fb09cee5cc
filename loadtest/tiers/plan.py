"""What a workload saves: which agent saves which state size at which step.

A Plan is the input both engines get, so "the same inputs" is one object. Ids are made per
run target (`ns`), so the same plan can run against every store and both engines without
two runs ever writing the same key. Digests of every state are computed once, up front, so
the fresh-process readback can check each checkpoint byte for byte without the agents
hashing anything while they are timed.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from ..core.state import Transcript

__all__ = ["Plan", "digest", "uniform", "growing"]


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class Plan:
    name: str
    sizes: list[list[int]]  # sizes[agent][step]: the state's size in bytes
    seed: int = 7
    # Think time between two checkpoints of one agent (its LLM call or tool), seconds:
    # uniform in [think_s / 2, 3 * think_s / 2]; the first one, uniform in [0, think_s),
    # staggers the agents' starts. 0 = back to back ("burst").
    think_s: float = 0.0
    _transcripts: dict[int, Transcript] = field(default_factory=dict, repr=False)
    _digests: list[list[str]] | None = field(default=None, repr=False)

    @property
    def agents(self) -> int:
        return len(self.sizes)

    @property
    def total(self) -> int:
        return sum(len(steps) for steps in self.sizes)

    @property
    def mean_size(self) -> float:
        return sum(map(sum, self.sizes)) / max(self.total, 1)

    def state(self, agent: int, step: int) -> bytes:
        transcript = self._transcripts.get(agent)
        if transcript is None:
            transcript = self._transcripts[agent] = Transcript(agent, seed=self.seed)
        return transcript.state(self.sizes[agent][step], step)

    def thinks(self, agent: int) -> list[float]:
        """Seconds agent `agent` thinks before each of its checkpoints (same every run)."""
        steps = len(self.sizes[agent])
        if self.think_s <= 0:
            return [0.0] * steps
        rng = random.Random(self.seed * 7919 + agent)
        first = rng.uniform(0.0, self.think_s)
        return [first] + [rng.uniform(self.think_s / 2, self.think_s * 1.5)
                          for _ in range(steps - 1)]

    def paced(self, name: str, think_s: float) -> Plan:
        """The same checkpoints with another think time, sharing the built states' caches."""
        self.prepare()
        return Plan(name, self.sizes, self.seed, think_s, self._transcripts, self._digests)

    def prepare(self) -> None:
        """Build everything the agents need before they are timed: the exchange pool (a
        second or so of CPU), each agent's transcript, and the digests."""
        for agent in range(self.agents):
            self.state(agent, 0)
        self.digests()

    def digests(self) -> list[list[str]]:
        if self._digests is None:
            self._digests = [[digest(self.state(a, s)) for s in range(len(steps))]
                             for a, steps in enumerate(self.sizes)]
        return self._digests

    @staticmethod
    def execution_id(ns: str, agent: int) -> str:
        return f"{ns}-a{agent:04d}"

    @staticmethod
    def node_id(ns: str, agent: int, step: int) -> str:
        return f"{ns}-a{agent:04d}-s{step:05d}"

    def job(self, ns: str) -> list[dict[str, object]]:
        """Per agent: its execution id and [node id, digest] of each checkpoint, in order."""
        return [
            {"execution_id": self.execution_id(ns, a),
             "checkpoints": [[self.node_id(ns, a, s), d] for s, d in enumerate(ds)]}
            for a, ds in enumerate(self.digests())
        ]


def uniform(name: str, *, agents: int, steps: int, size: int, think_s: float = 0.0) -> Plan:
    return Plan(name, [[size] * steps for _ in range(agents)], think_s=think_s)


def growing(name: str, *, agents: int, steps: int, first: int, last: int,
            think_s: float = 0.0) -> Plan:
    """Each agent's state grows linearly from `first` to `last` bytes over its steps, as a
    conversation does."""
    if steps == 1:
        return Plan(name, [[last] for _ in range(agents)], think_s=think_s)
    sizes = [first + (last - first) * s // (steps - 1) for s in range(steps)]
    return Plan(name, [list(sizes) for _ in range(agents)], think_s=think_s)
