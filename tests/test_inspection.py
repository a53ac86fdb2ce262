"""quietstar-inspect: the HTML report parses back and holds every token and thought."""

from html.parser import HTMLParser

import torch

from char_tokenizer import char_tokenizer
from quietstar import QuietStarForCausalLM
from quietstar.inspection import inspect_text, main, render_html, render_terminal
from tiny_models import tiny_base

TEXT = "Q: 12 + 30?\nA: 42 <ok> & done"


class Collect(HTMLParser):
    """Strict-enough parse: balanced tags, token spans' text and titles, table cells."""

    VOID = {"meta", "br", "line", "rect", "circle", "img", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.spans, self.cells, self.errors = [], [], [], []
        self.in_span = self.in_cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "span" and attrs.get("class") == "tok":
            self.in_span = {"title": attrs["title"], "text": ""}
        if tag == "td":
            self.in_cell = ""

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)
        if tag == "span" and self.in_span is not None:
            self.spans.append(self.in_span)
            self.in_span = None
        if tag == "td":
            self.cells.append(self.in_cell)
            self.in_cell = None

    def handle_data(self, data):
        if self.in_span is not None:
            self.in_span["text"] += data
        if self.in_cell is not None:
            self.in_cell += data


def test_html_report_holds_every_token_and_thought(tmp_path):
    tok = char_tokenizer()
    model = QuietStarForCausalLM.from_base(tiny_base("llama"), tokenizer=tok, n_thought_tokens=3, n_talk_tokens=2, n_passes=2).eval()
    with torch.no_grad():
        model.mixing_head.mlp[-1].weight.normal_(0, 0.5)
    report = inspect_text(model, tok, TEXT, generator=torch.Generator().manual_seed(0))
    L = len(TEXT)  # one character per token
    assert len(report.positions) == L and model.config.n_passes == 2  # restored
    assert [p.reward is None for p in report.positions] == [i + 2 >= L for i in range(L)]
    assert any(p.reward > 0 for p in report.rewarded) and any(p.reward < 0 for p in report.rewarded)

    page = render_html(report)
    parser = Collect()
    parser.feed(page)
    parser.close()
    assert page.startswith("<!DOCTYPE html>") and not parser.errors and not parser.stack
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained
    assert "".join(s["text"] for s in parser.spans).replace("\u21b5", "") == TEXT  # every token, in order, unescaped
    for p, span in zip(report.positions, parser.spans):
        assert repr(p.thought) in span["title"] and len(p.thought_ids) == 3
        assert repr(p.thought) in parser.cells  # the table lists every thought
    assert "<svg" in page and page.count("<circle") == len(report.rewarded)

    terminal = render_terminal(report, color=False)
    assert len(terminal.splitlines()) == L + 1

    out = tmp_path / "r.html"
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    main(["--model", str(tmp_path / "m"), "--text", TEXT, "--output", str(out), "--quiet"])
    again = Collect()
    again.feed(out.read_text(encoding="utf-8"))
    assert len(again.spans) == L and not again.errors
