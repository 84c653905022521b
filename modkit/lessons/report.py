"""How a ``Comparison`` reads: why two decisions differ, as sentences, and the result as text or HTML."""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modkit.lessons.compare import Comparison, Decision, QueueState

MAX_LISTED = 8  # requests listed per queue
DIFFERS_STYLE = ' style="background:#fdd;color:#000"'  # a row of the decision table that differs
CELL_STYLE = ' style="text-align:left"'


def explain(
    ref_name: str,
    cand_name: str,
    ref: Decision,
    cand: Decision,
    ref_state: QueueState,
    cand_state: QueueState,
    lengths: list[int],
    stopped: str | None = None,
) -> tuple[str, ...]:
    """One sentence per way ``cand`` differs from ``ref`` in one step, with a hint where a usual mistake shows."""
    lines: list[str] = []
    if cand.error is not None:
        lines.append(f"{cand_name}.schedule() raised {cand.error}")
    for name, length in zip((ref_name, cand_name), lengths, strict=True):
        if length <= ref.step:
            lines.append(
                f"{name} planned no step {ref.step}: " + ("it stopped" if stopped else "every request had finished")
            )
    if (ref_state.waiting, ref_state.running) != (cand_state.waiting, cand_state.running):
        lines.append(
            "the queues already differed before this step (see both below): the last step's decisions were the same, "
            "but what it did to the queues was not (an admitted request left in waiting, or not added to running?)"
        )
    scheduled = list(dict.fromkeys([*ref.num_scheduled_tokens, *cand.num_scheduled_tokens]))
    for req_id in scheduled:
        a, b = ref.num_scheduled_tokens.get(req_id, 0), cand.num_scheduled_tokens.get(req_id, 0)
        if a == b:
            continue
        if b == 0:
            why = cand.why.get(req_id)
            lines.append(f"{req_id}: {ref_name} gave it {_tokens(a)}, {cand_name} none" + (f" ({why})" if why else ""))
        elif a == 0:
            why = ref.why.get(req_id)
            lines.append(f"{req_id}: {cand_name} gave it {_tokens(b)}, {ref_name} none" + (f" ({why})" if why else ""))
        else:
            lines.append(f"{req_id}: {ref_name} gave it {_tokens(a)}, {cand_name} {b}")
    if ref.preempted != cand.preempted:
        why = "; ".join(f"{r}: {ref.why[r]}" for r in ref.preempted if r in ref.why)
        lines.append(
            f"{ref_name} preempted {_names(ref.preempted)}, {cand_name} {_names(cand.preempted)}"
            + (f" ({ref_name}: {why})" if why else "")
        )
    for req_id in scheduled:
        hit_a, hit_b = ref.prefix_hits.get(req_id), cand.prefix_hits.get(req_id)
        if hit_a is not None and hit_b is not None and hit_a != hit_b:
            lines.append(f"{req_id}: {ref_name} found {hit_a} of its tokens in the prefix cache, {cand_name} {hit_b}")
    tables_differ = False
    for req_id in scheduled:
        a_table, b_table = ref.block_tables.get(req_id), cand.block_tables.get(req_id)
        same_tokens = ref.num_scheduled_tokens.get(req_id) == cand.num_scheduled_tokens.get(req_id)
        if a_table is not None and b_table is not None and a_table != b_table and same_tokens:
            tables_differ = True
            lines.append(f"{req_id}: block table {list(a_table)} under {ref_name}, {list(b_table)} under {cand_name}")
    if tables_differ and ref_state.next_free_blocks != cand_state.next_free_blocks:
        lines.append(
            f"free blocks, next to go first, before the step: {list(ref_state.next_free_blocks)} under {ref_name}, "
            f"{list(cand_state.next_free_blocks)} under {cand_name}"
        )
    if ref.planned_ahead != cand.planned_ahead:
        ahead = ref_name if ref.planned_ahead else cand_name
        lines.append(f"only {ahead} planned this step ahead, while the step before was in flight")
    lines += [f"{cand_name}: {problem}" for problem in cand.problems]
    lines += _hints(ref_name, ref, cand, ref_state)
    return tuple(lines)


def _hints(ref_name: str, ref: Decision, cand: Decision, state: QueueState) -> list[str]:
    """The usual mistakes, recognised from what they leave in a step."""
    hints = []
    running = {r[0] for r in state.running}
    if cand.total > cand.token_budget:
        hints.append(
            "hint: the budget caps every request: one whose prompt is longer than what is left gets what is left "
            "and the rest next step (chunked prefill)"
        )
    starved = [r for r in running if ref.num_scheduled_tokens.get(r, 0) > cand.num_scheduled_tokens.get(r, 0)]
    admitted = [r for r in cand.num_scheduled_tokens if r not in running]
    if starved and admitted and cand.total <= cand.token_budget:
        hints.append(f"hint: running requests ({_names(starved)}) come before waiting ones ({_names(admitted)})")
    if ref.preempted and admitted and not any(r not in running for r in ref.num_scheduled_tokens):
        hints.append(f"hint: {ref_name} admits nobody in a step that preempted (blocks are short)")
    if any(cand.prefix_hits.get(r) == 0 < hit for r, hit in ref.prefix_hits.items()):
        hints.append("hint: kv.get_computed_blocks(request) finds the cached prefix; pass it on to allocate_slots")
    return hints


def _names(req_ids: object) -> str:
    ids = list(req_ids)  # type: ignore[call-overload]
    return ", ".join(ids) if ids else "nobody"


def _queue_lines(state: QueueState) -> list[str]:
    running = [_running(r, computed, known, in_flight) for r, computed, known, in_flight in state.running]
    waiting = [f"{r} ({n} tokens)" for r, n in state.waiting]
    return [
        f"budget {state.token_budget} tokens, {state.num_free_blocks} free KV blocks "
        f"(next to go: {list(state.next_free_blocks)})",
        "running: " + _listed(running),
        "waiting: " + _listed(waiting),
    ]


def _running(req_id: str, computed: int, known: int, in_flight: int) -> str:
    sampling = f", {in_flight} being sampled" if in_flight else ""
    return f"{req_id} ({computed} of {known} tokens computed{sampling})"


def _listed(items: list[str]) -> str:
    if not items:
        return "-"
    more = len(items) - MAX_LISTED
    return ", ".join(items[:MAX_LISTED]) + (f", ... and {more} more" if more > 0 else "")


def _headline(c: Comparison) -> str:
    if c.matched:
        s = c.summary[c.candidate_name]
        return (
            f"{c.candidate_name} decides as {c.reference_name} does at all {c.num_steps} steps: the same tokens, "
            f"preemptions ({s['preemptions']}), prefix hits ({s['prefix_hit_tokens']} tokens) and block tables."
        )
    d = c.first_difference
    assert d is not None
    same = f" (steps 0-{d.step - 1} identical)" if d.step > 0 else ""
    then = (
        f"Its run stopped there: {c.candidate_stopped}."
        if c.candidate_stopped
        else f"{c.num_differing_steps} of {c.num_steps} steps differ."
    )
    return f"{c.candidate_name} differs from {c.reference_name} at step {d.step}{same}. {then}"


def _decision_rows(c: Comparison) -> list[tuple[str, str, str, bool]]:
    """(row label, reference cell, candidate cell, differs) for the first difference's step."""
    d = c.first_difference
    assert d is not None
    ref, cand = d.reference, d.candidate
    rows = []
    for req_id in dict.fromkeys([*ref.num_scheduled_tokens, *cand.num_scheduled_tokens]):
        cells = [_cell(x, req_id) for x in (ref, cand)]
        rows.append((req_id, cells[0], cells[1], cells[0] != cells[1]))
    rows.append(("preempted", _names(ref.preempted), _names(cand.preempted), ref.preempted != cand.preempted))
    rows.append(("budget left", str(ref.budget_left), str(cand.budget_left), ref.budget_left != cand.budget_left))
    return rows


def _cell(decision: Decision, req_id: str) -> str:
    n = decision.num_scheduled_tokens.get(req_id)
    if n is None:
        return "-"
    hit = decision.prefix_hits.get(req_id)
    admitted = f", admitted, {hit} cached" if hit is not None else ""
    return f"{_tokens(n)}{admitted}, blocks {list(decision.block_tables.get(req_id, ()))}"


def _tokens(n: int) -> str:
    return f"{n} token" if n == 1 else f"{n} tokens"


def comparison_text(c: Comparison) -> str:
    lines = [_headline(c), f"workload: {c.workload}"]
    d = c.first_difference
    if d is None:
        return "\n".join(lines)
    lines.append("why:")
    lines += [f"  - {reason}" for reason in d.reasons]
    lines.append(f"before step {d.step}, {c.reference_name} faced:")
    lines += [f"  {line}" for line in _queue_lines(d.reference_state)]
    if d.candidate_state != d.reference_state:
        lines.append(f"and {c.candidate_name}:")
        lines += [f"  {line}" for line in _queue_lines(d.candidate_state)]
    rows = _decision_rows(c)
    width = max(len(r[1]) for r in rows) + 2
    lines.append(f"step {d.step}:".ljust(14) + c.reference_name.ljust(width) + c.candidate_name)
    for label, a, b, differs in rows:
        lines.append(f"  {label}".ljust(14) + a.ljust(width) + b + ("   <- differs" if differs else ""))
    return "\n".join(lines)


def comparison_html(c: Comparison) -> str:
    e = html.escape
    parts = [f"<div><p><b>{e(_headline(c))}</b><br><small>workload: {e(str(c.workload))}</small></p>"]
    d = c.first_difference
    if d is None:
        return parts[0] + "</div>"
    parts.append("<p>Why:</p><ul>" + "".join(f"<li>{e(r)}</li>" for r in d.reasons) + "</ul>")
    states = [(c.reference_name, d.reference_state)]
    if d.candidate_state != d.reference_state:
        states.append((c.candidate_name, d.candidate_state))
    for name, state in states:
        items = "".join(f"<li>{e(line)}</li>" for line in _queue_lines(state))
        parts.append(f"<p>Before step {d.step}, {e(name)} faced:</p><ul>{items}</ul>")
    head = "".join(f"<th{CELL_STYLE}>{e(x)}</th>" for x in (f"step {d.step}", c.reference_name, c.candidate_name))
    head = f"<tr>{head}</tr>"
    body = "".join(
        f"<tr{DIFFERS_STYLE if differs else ''}>"
        + "".join(f"<td{CELL_STYLE}>{e(x)}</td>" for x in (label, a, b))
        + "</tr>"
        for label, a, b, differs in _decision_rows(c)
    )
    parts.append(f"<table>{head}{body}</table></div>")
    return "".join(parts)
