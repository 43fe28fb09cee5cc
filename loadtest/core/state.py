"""Deterministic, realistic agent state: a chat transcript serialised as JSON bytes.

What a checkpoint of an LLM agent really holds is its conversation: a system prompt, the
JSON schemas of its tools, and turns of user and assistant messages with tool calls and
their results (search hits, SQL rows, command output). Compression ratios and encode times
measured on random bytes (incompressible) or on one repeated letter (compresses 1000x) say
nothing about that, so the benchmark uses this generator instead.

Everything comes from seeded `random.Random` instances: the same (agent, step, size) gives
the same bytes in every process, which lets a fresh process check what it reads back.

Cost matters because states are built inside the timed loops' agent threads (outside the
timed call): exchanges are rendered to JSON once per process and a state is a byte join.
"""

from __future__ import annotations

import json
import random
import string
import threading
from functools import lru_cache

__all__ = ["agent_state", "Transcript", "KB", "MB"]

KB = 1024
MB = 1024 * 1024

# Enough distinct exchanges that a 0.8 MB state never repeats one (a repeat would make it
# compress better than a real conversation does).
_POOL_BYTES = 3 * MB
_PAD_TEXT_BYTES = 256 * KB
_POOL_LOCK = threading.Lock()

# Split at import rather than written as a list: ~300 words read better as text.
_WORD_TEXT = """
the a to of and in is that for it on with as this be are by from at or an not was have can
will which if but all we they you one their has more when would there what so up out about
into than them do only other new some could time these two may then first any like now over
such our also its after most use how should where well through because each those agent
model tool call result query user request response data table row column index file function
error retry timeout budget checkpoint state memory cache store write read latency customer
order invoice payment refund shipment account region revenue quarter forecast report summary
analysis trend growth decline percent total average median estimate source search document
page link snippet title section chapter reference citation article paper python script
command output exit status process thread worker queue task job schedule database schema
migration transaction commit rollback lock replica primary backup restore service endpoint
deploy release version branch merge review test failure passing coverage metric dashboard
alert incident oncall runbook escalation resolved pending investigating please could you
check find compare explain list show update create delete verify confirm here found three
several rows matching returned showing based looks likely suggests note however therefore
additionally finally first second next last previous following above european american asian
pacific northern southern eastern western global local national january february march april
may june july august september october november december monday tuesday wednesday thursday
friday weekend morning afternoon evening daily weekly contract supplier vendor warehouse
inventory stock price cost margin discount tax fee
"""
_WORDS = _WORD_TEXT.split()

_TOOLS = [
    {
        "name": "web_search",
        "description": "Search the web and return the most relevant pages with a snippet each.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What to search for."},
                "max_results": {"type": "integer", "minimum": 1, "maximum": 20, "default": 5},
                "recency_days": {"type": "integer", "description": "Only pages this recent."},
            },
            "required": ["query"],
        },
    },
    {
        "name": "run_sql",
        "description": "Run a read-only SQL query against the analytics warehouse.",
        "parameters": {
            "type": "object",
            "properties": {
                "sql": {"type": "string", "description": "One SELECT statement."},
                "row_limit": {"type": "integer", "default": 50},
            },
            "required": ["sql"],
        },
    },
    {
        "name": "run_shell",
        "description": "Run a shell command in the sandbox and return stdout, stderr, exit code.",
        "parameters": {
            "type": "object",
            "properties": {
                "command": {"type": "string"},
                "cwd": {"type": "string", "default": "/workspace"},
                "timeout_s": {"type": "number", "default": 30},
            },
            "required": ["command"],
        },
    },
    {
        "name": "send_email",
        "description": "Send an email on the user's behalf. Not idempotent: never retried.",
        "parameters": {
            "type": "object",
            "properties": {
                "to": {"type": "array", "items": {"type": "string", "format": "email"}},
                "subject": {"type": "string"},
                "body": {"type": "string"},
            },
            "required": ["to", "subject", "body"],
        },
    },
]

_SYSTEM = (
    "You are an operations analyst agent working for the finance and logistics teams. "
    "Answer with facts you have checked with a tool; cite the source of every figure. "
    "Use run_sql for anything about orders, invoices, refunds or inventory; the warehouse "
    "schema is: orders(id, customer_id, region, total, currency, created_at, status), "
    "invoices(id, order_id, amount, due_date, paid_at), refunds(id, order_id, amount, reason), "
    "inventory(sku, warehouse, on_hand, reserved, updated_at). Use web_search for public "
    "information (exchange rates, regulations, supplier news) and prefer primary sources. "
    "Use run_shell to inspect the reports repository. Never send an email without the user's "
    "explicit confirmation in the latest message. Keep answers short: a summary first, then "
    "a table, then caveats. If a query fails, read the error, fix the query and try again at "
    "most twice before asking the user. Times are UTC. Currency amounts have two decimals."
)


def _zipf_weights(n: int) -> list[float]:
    return [1.0 / (rank + 1) ** 0.9 for rank in range(n)]


class _Writer:
    """Text and records from one seeded generator."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.weights = _zipf_weights(len(_WORDS))

    def words(self, n: int) -> str:
        picked = self.rng.choices(_WORDS, weights=self.weights, k=n)
        text = " ".join(picked)
        return text[0].upper() + text[1:] + "."

    def sentences(self, n: int) -> str:
        return " ".join(self.words(self.rng.randint(6, 22)) for _ in range(n))

    def token(self, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
        return "".join(self.rng.choices(alphabet, k=n))

    def date(self) -> str:
        r = self.rng
        return (f"2024-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}T"
                f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}Z")


def _search_result(w: _Writer) -> tuple[dict[str, object], str]:
    query = w.words(w.rng.randint(3, 7)).rstrip(".").lower()
    hits = [
        {
            "title": w.words(w.rng.randint(4, 10)).rstrip("."),
            "url": f"https://{w.rng.choice(['docs', 'news', 'www', 'blog'])}."
                   f"{w.token(8, string.ascii_lowercase)}.com/{w.token(6, string.ascii_lowercase)}/"
                   f"{w.token(10, string.ascii_lowercase + '-')}",
            "snippet": w.sentences(w.rng.randint(2, 4)),
            "published": w.date(),
        }
        for _ in range(w.rng.randint(3, 8))
    ]
    return {"query": query, "max_results": len(hits)}, json.dumps({"results": hits})


def _sql_result(w: _Writer) -> tuple[dict[str, object], str]:
    region = w.rng.choice(["EU", "US", "APAC", "LATAM"])
    sql = (f"SELECT id, customer_id, region, total, currency, created_at, status FROM orders "
           f"WHERE region = '{region}' AND created_at >= '{w.date()[:10]}' ORDER BY total DESC "
           f"LIMIT {w.rng.randint(10, 40)}")
    rows = [
        [w.rng.randint(100_000, 999_999), f"cus_{w.token(14)}", region,
         round(w.rng.uniform(5, 25_000), 2), w.rng.choice(["EUR", "USD", "GBP", "JPY"]),
         w.date(), w.rng.choice(["paid", "shipped", "refunded", "pending", "cancelled"])]
        for _ in range(w.rng.randint(10, 40))
    ]
    columns = ["id", "customer_id", "region", "total", "currency", "created_at", "status"]
    return {"sql": sql}, json.dumps({"columns": columns, "rows": rows, "row_count": len(rows)})


def _shell_result(w: _Writer) -> tuple[dict[str, object], str]:
    kind = w.rng.randrange(3)
    if kind == 0:
        command = "ls -l reports/"
        lines = [f"-rw-r--r-- 1 agent agent {w.rng.randint(200, 900_000):>7} "
                 f"{w.rng.choice(['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun'])} "
                 f"{w.rng.randint(1, 28):>2} {w.rng.randint(0, 23):02d}:{w.rng.randint(0, 59):02d} "
                 f"{w.token(10, string.ascii_lowercase + '_')}.csv"
                 for _ in range(w.rng.randint(5, 30))]
    elif kind == 1:
        command = "git log --oneline -20"
        lines = [f"{w.token(7, '0123456789abcdef')} {w.words(w.rng.randint(3, 9)).rstrip('.')}"
                 for _ in range(20)]
    else:
        command = "python -m pytest -q tests/test_reports.py"
        lines = [f"tests/test_reports.py::test_{w.token(12, string.ascii_lowercase + '_')} "
                 f"{w.rng.choice(['PASSED', 'PASSED', 'PASSED', 'FAILED'])}"
                 for _ in range(w.rng.randint(8, 25))]
        lines.append(f"{w.rng.randint(5, 40)} passed, {w.rng.randint(0, 3)} failed in "
                     f"{w.rng.uniform(0.5, 9):.2f}s")
    out = {"stdout": "\n".join(lines) + "\n", "stderr": "", "exit_code": w.rng.choice([0, 0, 1])}
    return {"command": command}, json.dumps(out)


_RESULTS = {"web_search": _search_result, "run_sql": _sql_result, "run_shell": _shell_result}


def _exchange(w: _Writer) -> bytes:
    """One round: a user ask, 1-3 tool calls with their results, an assistant answer."""
    ask = w.sentences(w.rng.randint(1, 3))
    messages: list[dict[str, object]] = [{"role": "user", "content": ask}]
    for _ in range(w.rng.randint(1, 3)):
        name = w.rng.choice(list(_RESULTS))
        args, result = _RESULTS[name](w)
        call_id = f"call_{w.token(24)}"
        messages.append({
            "role": "assistant", "content": None,
            "tool_calls": [{"id": call_id, "type": "function",
                            "function": {"name": name, "arguments": json.dumps(args)}}],
        })
        messages.append({"role": "tool", "tool_call_id": call_id, "name": name, "content": result})
    messages.append({"role": "assistant", "content": w.sentences(w.rng.randint(2, 6)),
                     "usage": {"prompt_tokens": w.rng.randint(2_000, 90_000),
                               "completion_tokens": w.rng.randint(50, 900)}})
    return b",".join(json.dumps(m, separators=(",", ":")).encode() for m in messages)


def _pool(seed: int) -> tuple[tuple[bytes, ...], bytes]:
    # One build per process even when many agent threads ask at once.
    with _POOL_LOCK:
        return _build_pool(seed)


@lru_cache(maxsize=4)
def _build_pool(seed: int) -> tuple[tuple[bytes, ...], bytes]:
    """Rendered exchanges (about _POOL_BYTES in all) and filler text, for one corpus seed."""
    w = _Writer(random.Random(seed))
    exchanges: list[bytes] = []
    total = 0
    while total < _POOL_BYTES:
        exchanges.append(_exchange(w))
        total += len(exchanges[-1]) + 1
    pad = json.dumps(w.sentences(_PAD_TEXT_BYTES // 80))[1:-1].encode()  # escaped, unquoted
    return tuple(exchanges), pad


class Transcript:
    """One agent's conversation: its own order of exchanges and its own header.

    `state(size, step)` is this agent's state at `step`, exactly `size` bytes of valid JSON
    (a "scratchpad" string absorbs the difference, as an agent's working notes would).
    """

    def __init__(self, agent: int, *, seed: int = 7) -> None:
        self.agent = agent
        self.exchanges, self._pad = _pool(seed)
        rng = random.Random(seed * 1_000_003 + agent)
        # A permutation, not draws with replacement: no exchange appears twice in a state.
        self._order = rng.sample(range(len(self.exchanges)), len(self.exchanges))
        self._pad_start = rng.randrange(len(self._pad) // 2)
        self._task = _Writer(rng).sentences(2)

    def state(self, size: int, step: int) -> bytes:
        head = json.dumps({
            "agent_id": f"agent-{self.agent:05d}", "step": step, "model": "gpt-4o-2024-08-06",
            "task": self._task, "system": _SYSTEM, "tools": _TOOLS,
        }, separators=(",", ":")).encode()[:-1] + b',"messages":['
        tail_fixed = b'],"scratchpad":""}'
        parts = [head]
        used = len(head) + len(tail_fixed)
        # Later steps hold later exchanges: a step's state is not a prefix of the next one.
        offset = step % len(self._order)
        for i in range(len(self._order)):
            piece = self.exchanges[self._order[(offset + i) % len(self._order)]]
            extra = len(piece) + (1 if len(parts) > 1 else 0)
            if used + extra > size:
                continue  # a shorter exchange further on may still fit
            parts.append(piece)
            used += extra
        pad_len = max(size - used, 0)
        pad = self._pad[self._pad_start:self._pad_start + pad_len]
        while pad.endswith(b"\\"):  # never cut an escape sequence in half
            pad = pad[:-1]
        pad += b" " * (pad_len - len(pad))
        return parts[0] + b",".join(parts[1:]) + b'],"scratchpad":"' + pad + b'"}'


def agent_state(size: int, *, agent: int = 0, step: int = 0, seed: int = 7) -> bytes:
    """The state of `agent` at `step`: `size` bytes of chat-transcript JSON."""
    return Transcript(agent, seed=seed).state(size, step)
