"""The chat template's sandbox: a template that builds a huge value through lists, joins or ``replace`` is refused
by the rendering child's memory cap, and the caller's memory never grows with it."""

from __future__ import annotations

import resource

import pytest

from models.errors import CheckpointError
from models.prompt import render
from models.template_sandbox import _CHILD, TEMPLATE_MAX_BYTES

MESSAGES = [{"role": "user", "content": "hi"}]
HUGE = [
    "{{ (['x'|center(10**7)]*100)|join }}",  # 10^9 characters from 100 references to one 10^7 string
    "{{ ('a'*10**6)|replace('a', 'b'*200) }}",  # 2 x 10^8 characters
    "{% set ns = namespace(l=[1]) %}{% for i in range(24) %}{% set ns.l = ns.l + ns.l %}{% endfor %}"
    "{{ ns.l|length }}",  # a list doubled to 16.7M elements
    "{% set ns = namespace(x='ab') %}{% for i in range(40) %}{% set ns.x = [ns.x, ns.x]|join %}{% endfor %}",
]


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.parametrize("template", HUGE)
def test_templates_that_build_huge_values_are_refused(template):
    render("{{ messages[0].content }}", MESSAGES)  # the child is up
    before = _max_rss()
    with pytest.raises(CheckpointError, match=f"over its budget .*{TEMPLATE_MAX_BYTES >> 20} MiB"):
        render(template, MESSAGES)
    assert _max_rss() - before < TEMPLATE_MAX_BYTES  # built in the child, if at all
    assert render("{{ messages[0].content }}", MESSAGES) == "hi"  # and the next render works


def test_a_render_over_time_kills_the_child_and_the_next_one_starts_afresh(monkeypatch):
    import models.template_sandbox as sandbox

    render("{{ 1 }}", MESSAGES)
    first = _CHILD.proc.pid
    monkeypatch.setattr(sandbox, "TEMPLATE_MAX_SECONDS", 0.2)  # the caller's wait; the child keeps its own 2 s
    with pytest.raises(sandbox.TemplateBudgetError):
        sandbox.render("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", MESSAGES)
    monkeypatch.undo()
    assert render("{{ messages[0].content }}", MESSAGES) == "hi"
    assert _CHILD.proc.pid != first


def test_what_a_template_refuses_and_what_the_sandbox_forbids_keep_their_messages():
    with pytest.raises(CheckpointError, match="refused the prompt: no video"):
        render("{{ raise_exception('no video') }}", MESSAGES)
    with pytest.raises(CheckpointError, match="sandbox forbids"):
        render("{{ ''.__class__.__mro__ }}", MESSAGES)
    with pytest.raises(CheckpointError, match="not valid Jinja"):
        render("{% for %}", MESSAGES)
