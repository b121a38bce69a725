"""Checking a trace against the Chrome trace-event format, strictly.

``SCHEMA`` is a JSON Schema (draft 2020-12) of the trace-event format's JSON object
form ("Trace Event Format", Google, the document Perfetto and catapult follow) for the
event phases kvmpy writes: complete ``X``, instant ``i`` (with scope), flow ``s``/``t``/
``f`` (v1; ``bp: "e"``), async nestable ``b``/``e``, metadata ``M``. Every property
of every event is typed and nothing unknown is allowed, so a typo or a wrong type fails.
``check_semantics`` adds what a schema cannot say and a viewer relies on: each flow id
has one start, then steps, then one finish, in time order, each bound inside a slice of
its thread; async begin/end pairs match; slices on a thread nest (never overlap
partially); times are not negative. ``validate`` runs both (needs ``jsonschema``).
"""

from __future__ import annotations

import bisect
from collections import defaultdict

_NUM = {"type": "number", "minimum": 0}
_INT = {"type": "integer", "minimum": 0}
_ARGS = {"type": "object"}
_COMMON = {"name": {"type": "string"}, "cat": {"type": "string"}, "pid": _INT,
           "tid": _INT, "ts": _NUM, "args": _ARGS}


def _event(ph: list[str], required: list[str], **extra: object) -> dict[str, object]:
    return {
        "type": "object",
        "properties": {**_COMMON, "ph": {"enum": ph}, **extra},
        "required": ["name", "ph", "pid", "tid", *required],
        "additionalProperties": False,
    }


SCHEMA: dict[str, object] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Chrome trace-event format, JSON object form (the phases kvmpy writes)",
    "type": "object",
    "properties": {
        "traceEvents": {
            "type": "array",
            "items": {
                "oneOf": [
                    _event(["X"], ["ts", "dur"], dur=_NUM),
                    _event(["i"], ["ts", "s"], s={"enum": ["g", "p", "t"]}),
                    _event(["s"], ["ts", "id", "cat"], id={"type": ["integer", "string"]}),
                    _event(["t", "f"], ["ts", "id", "cat"],
                           id={"type": ["integer", "string"]}, bp={"enum": ["e"]}),
                    _event(["b", "e"], ["ts", "id", "cat"], id={"type": ["integer", "string"]}),
                    {
                        "type": "object",
                        "properties": {
                            "name": {"enum": ["process_name", "thread_name",
                                              "thread_sort_index", "process_sort_index"]},
                            "ph": {"const": "M"}, "pid": _INT, "tid": _INT,
                            "args": {
                                "type": "object",
                                "properties": {"name": {"type": "string"},
                                               "sort_index": {"type": "integer"}},
                                "minProperties": 1, "maxProperties": 1,
                                "additionalProperties": False,
                            },
                        },
                        "required": ["name", "ph", "pid", "tid", "args"],
                        "additionalProperties": False,
                    },
                ]
            },
        },
        "displayTimeUnit": {"enum": ["ms", "ns"]},
        "otherData": {"type": "object",
                      "additionalProperties": {"type": ["string", "number", "boolean"]}},
    },
    "required": ["traceEvents"],
    "additionalProperties": False,
}


def check_semantics(trace: dict[str, object]) -> list[str]:
    """What the format needs beyond the schema; returns the problems (empty: none)."""
    problems: list[str] = []
    events = trace["traceEvents"]
    assert isinstance(events, list)
    slices: dict[tuple[int, int], list[tuple[float, float]]] = defaultdict(list)
    flows: dict[object, list[dict[str, object]]] = defaultdict(list)
    asyncs: dict[tuple[object, object, object], list[dict[str, object]]] = defaultdict(list)
    for ev in events:
        ph = ev["ph"]
        if ph == "X":
            slices[(ev["pid"], ev["tid"])].append((ev["ts"], ev["ts"] + ev["dur"]))
        elif ph in ("s", "t", "f"):
            flows[(ev["cat"], ev["id"])].append(ev)
        elif ph in ("b", "e"):
            asyncs[(ev["cat"], ev["id"], ev["name"])].append(ev)
    for key, spans in slices.items():
        spans.sort()
        stack: list[float] = []
        for start, end in spans:
            while stack and stack[-1] <= start + 1e-9:
                stack.pop()
            if stack and end > stack[-1] + 1e-9:
                problems.append(f"slices overlap partially on {key} at ts {start}")
                break
            stack.append(end)
    starts = {k: sorted(s[0] for s in v) for k, v in slices.items()}
    for fid, evs in flows.items():
        phases = [e["ph"] for e in evs]
        if phases.count("s") != 1 or phases.count("f") != 1 or phases[0] != "s" \
                or phases[-1] != "f":
            problems.append(f"flow {fid}: phases {phases} (want s, t*, f)")
            continue
        times = [e["ts"] for e in evs]
        if times != sorted(times):
            problems.append(f"flow {fid}: not in time order {times}")
        for e in evs:
            key = (e["pid"], e["tid"])
            if not _enclosed(e["ts"], slices.get(key, []), starts.get(key, [])):
                problems.append(f"flow {fid}: {e['ph']} at ts {e['ts']} on {key} is in no "
                                "slice")
    for key, evs in asyncs.items():
        if [e["ph"] for e in evs] != ["b", "e"] or evs[1]["ts"] < evs[0]["ts"]:
            problems.append(f"async {key}: want one b then one e, got "
                            f"{[(e['ph'], e['ts']) for e in evs]}")
    return problems


def _enclosed(ts: float, spans: list[tuple[float, float]], starts: list[float]) -> bool:
    """Is ``ts`` inside one of ``spans`` (sorted by start; nested up to 64 deep)?"""
    i = bisect.bisect_right(starts, ts) - 1
    for j in range(i, max(i - 64, -1), -1):
        if spans[j][0] <= ts <= spans[j][1]:
            return True
    return False


def validate(trace: dict[str, object]) -> list[str]:
    """Schema errors (jsonschema, draft 2020-12) and semantic problems, at most 20."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(SCHEMA)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(trace)]
    if errors:
        return errors[:20]
    return check_semantics(trace)[:20]
