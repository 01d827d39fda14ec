"""The run report and the eval report as a reader sees them: sections in order, figures from the stage files in
words and units, no raw JSON in any cell, answers side by side; then both pages rendered in headless Chromium.

The workdir is the session's `demo_run` (conftest.py): a real `ezo run` of the demo recipe cut to seconds, judged
by the scripted judge, so every answer has a known grade."""
import base64
import io
import json
import re
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from ezoforge.recipe_report import hms, write_run_report
from scripted_judge import expected_grade

SECTIONS = ["Stages", "Base vs tuned", "Beside published figures", "Contamination check", "Curation", "Data mix",
            "Synthesis", "Training", "Answers side by side"]


class Page(HTMLParser):
    """What a reader sees: headings, table cells by section, cards, image sources."""

    def __init__(self, text: str):
        super().__init__()
        self.h2: list[str] = []
        self.tables: dict[str, list[list[list[str]]]] = {}
        self.cards: list[dict] = []
        self.images: list[str] = []
        self._text: list[str] | None = None
        self._cell: list[str] | None = None
        self._card: list[str] | None = None
        self._h3: list[str] | None = None
        self._card_h3 = ""
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "h2":
            self._text = []
        elif tag == "table":
            self.tables.setdefault(self.h2[-1] if self.h2 else "", []).append([])
        elif tag == "tr":
            self.tables[self.h2[-1] if self.h2 else ""][-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "section":
            self._card = []
        elif tag == "h3" and self._card is not None:
            self._h3 = []
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "h2":
            self.h2.append("".join(self._text).strip())
            self._text = None
        elif tag in ("td", "th"):
            self.tables[self.h2[-1] if self.h2 else ""][-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "h3" and self._h3 is not None:
            self._card_h3 = "".join(self._h3).strip()
            self._h3 = None
        elif tag == "section":
            self.cards.append({"section": self.h2[-1] if self.h2 else "", "h3": self._card_h3,
                               "text": "".join(self._card)})
            self._card = None

    def handle_data(self, data):
        for buf in (self._text, self._cell, self._card, self._h3):
            if buf is not None:
                buf.append(data)

    def table(self, section: str) -> dict[str, list[str]]:
        """The section's first table as {first cell: the other cells}."""
        return {row[0]: row[1:] for row in self.tables[section][0] if row}


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def parquet(folder: Path) -> list[dict]:
    return [r for p in sorted((folder / "data").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]


@pytest.fixture(scope="module")
def workdir(demo_run) -> Path:
    return demo_run.workdir


@pytest.fixture(scope="module")
def page(workdir) -> Page:
    return Page((workdir / "report.html").read_text(encoding="utf-8"))


def test_sections_in_reading_order(page):
    assert page.h2 == SECTIONS


def test_stage_table_has_columns_and_times_from_the_run(workdir, page):
    timings = read(workdir / "timings.json")
    header, *rows, total = page.tables["Stages"][0]
    assert header == ["Stage", "Wall time", "Result"]
    assert [r[0] for r in rows] == ["curate", "synth", "train", "merge", "eval-base", "eval-tuned", "pairwise", "export"]
    for stage, wall, result in rows:
        assert wall == hms(timings[stage]["seconds"]) and re.fullmatch(r"\d+:\d\d:\d\d", wall)
        assert len(result) > 10 and not result.startswith("{")
    assert total[:2] == ["Total", hms(sum(t["seconds"] for t in timings.values()))]
    curate = read(workdir / "curate" / "stats.json")
    synth = read(workdir / "synth" / "stats.json")
    cells = {r[0]: r[2] for r in rows}
    assert f"kept {curate['docs_out']} of {curate['docs_in']} documents" in cells["curate"]
    pairs = f"{synth['pairs']} pair" + ("" if synth["pairs"] == 1 else "s")
    assert cells["synth"].startswith(f"{pairs} from {synth['documents_with_pairs']} of 2 documents")
    assert "tokens/s" in cells["synth"] and "tokens/s" in cells["train"]


def test_base_vs_tuned_is_one_table_with_difference_ci_and_the_better_marked(workdir, page):
    base, tuned = read(workdir / "eval-base" / "report.json"), read(workdir / "eval-tuned" / "report.json")
    header, *_ = page.tables["Base vs tuned"][0]
    assert header == ["Metric", "Base", "Tuned", "Tuned − base", "95% CI of the difference"]
    t = page.table("Base vs tuned")
    ppl = t["Perplexity on held-out text (lower is better)"]
    change = 100 * (tuned["perplexity"] / base["perplexity"] - 1)
    assert [c.removesuffix(" ✓") for c in ppl[:2]] == [f"{base['perplexity']:.2f}", f"{tuned['perplexity']:.2f}"]
    assert ppl[2] == f"{tuned['perplexity'] - base['perplexity']:+.2f} ({change:+.1f}%)"
    chrf = t["chrF vs the references (0–100)"]
    assert [c.removesuffix(" ✓") for c in chrf[:2]] == [f"{base['chrf']:.1f}", f"{tuned['chrf']:.1f}"]
    if tuned["perplexity"] != base["perplexity"]:  # the lower perplexity is marked, and only it
        assert [c.endswith(" ✓") for c in ppl[:2]] == [base["perplexity"] < tuned["perplexity"],
                                                      tuned["perplexity"] < base["perplexity"]]
    html = (workdir / "report.html").read_text(encoding="utf-8")
    from ezoforge.eval.compare import compare

    grade = t["Mean grade (LLM judge)"]
    means = [sum(expected_grade(a["answer"]) for a in jsonl(workdir / f"eval-{s}" / "answers.jsonl")) / 3
             for s in ("base", "tuned")]
    assert [c.removesuffix(" ✓") for c in grade[:2]] == [f"{m:.2f}" for m in means]
    diff = compare([workdir / "eval-base", workdir / "eval-tuned"])["runs"][1]["diff"]
    assert diff["n"] == 3 and diff["diff"] == pytest.approx(means[1] - means[0], abs=5e-5)  # compare rounds to 4 places
    assert grade[2] == f"{diff['diff']:+.2f}" and grade[3] == f"{diff['ci95'][0]:+.2f} to {diff['ci95'][1]:+.2f}"
    # the judge and its prompt version said once, in words
    assert html.count(base["judge"]["prompt_version"]) == 1 and "as judge with prompt version" in html


def test_data_mix_and_synthesized_pairs_with_provenance(workdir, page):
    docs = {d["id"]: d for d in parquet(workdir / "curate")}
    pairs = parquet(workdir / "synth")
    per_source = Counter(docs[p["doc_id"]]["source"] for p in pairs)
    curated = Counter(d["source"] for d in docs.values())
    header, *rows, foot = page.tables["Data mix"][0]
    assert header[0] == "Source" and "Documents curated" in header and "Pairs kept" in header
    got = {r[0]: dict(zip(header[1:], r[1:])) for r in rows}
    assert set(got) == set(curated)
    for source, cells in got.items():
        assert cells["Documents curated"] == f"{curated[source]:,}" and cells["Pairs kept"] == str(per_source[source])
    assert foot[0] == "All" and foot[header.index("Pairs kept")] == str(len(pairs))
    examples = [c for c in page.cards if c["section"] == "Synthesis"]
    assert 1 <= len(examples) <= 3
    for card in examples:
        pair = next(p for p in pairs if p["instruction"] in card["text"])
        doc = docs[pair["doc_id"]]
        assert (doc["title"] or doc["id"]) in card["text"] and pair["context"][:100] in card["text"]
        assert pair["response"][:100] in card["text"]
        at = 0
        for label in ("Source document", "Passage", "Instruction", "Response"):  # in this order (a passage may
            at = card["text"].index(label, at)                                  # hold one of the words too)


def test_answers_side_by_side_largest_grade_change_first(workdir, page):
    sides = {s: ({r["task_id"]: r for r in jsonl(workdir / f"eval-{s}" / "answers.jsonl")},
                 {j["task_id"]: j for j in jsonl(workdir / f"eval-{s}" / "judgements.jsonl")}) for s in ("base", "tuned")}
    cards = [c for c in page.cards if c["section"] == "Answers side by side"]
    shown = [c["h3"].split()[0] for c in cards]
    assert sorted(shown) == sorted(sides["base"][0])

    def change(tid):
        b, t = sides["base"][1][tid]["grade"], sides["tuned"][1][tid]["grade"]
        return None if b is None or t is None else t - b
    graded = [abs(change(t)) for t in shown]  # the scripted judge grades every answer
    assert graded == sorted(graded, reverse=True)
    for card, tid in zip(cards, shown):
        text = card["text"]
        base, tuned = sides["base"][0][tid], sides["tuned"][0][tid]
        for part in (base["prompt"][:80], base["reference"][:80], base["answer"][:80], tuned["answer"][:80]):
            assert part.strip() in text
        assert text.index("Question") < text.index("Reference answer") < text.index("Base answer") < \
            text.index("Tuned answer")
        for side in ("base", "tuned"):
            j = sides[side][1][tid]
            assert j["grade"] == expected_grade(sides[side][0][tid]["answer"]) and j["error"] is None
            assert j["reason"][:60] in text


def test_no_cell_shows_raw_json(workdir, page):
    pages = [page] + [Page((workdir / f / "report.html").read_text(encoding="utf-8")) for f in ("eval-base", "eval-tuned")]
    for p in pages:
        cells = [c for tables in p.tables.values() for t in tables for row in t for c in row]
        assert cells
        for cell in cells:
            assert not re.match(r"\s*[\[{]", cell) and '": ' not in cell and "null" not in cell, cell
            assert not re.search(r"\d\.\d{4,}", cell), cell  # figures are rounded to what they mean


def test_eval_report_shows_input_and_reference_beside_answer_grade_and_reason(workdir):
    for folder in ("eval-base", "eval-tuned"):
        rows = jsonl(workdir / folder / "answers.jsonl")
        verdicts = {j["task_id"]: j for j in jsonl(workdir / folder / "judgements.jsonl")}
        p = Page((workdir / folder / "report.html").read_text(encoding="utf-8"))
        cards = [c for c in p.cards if c["section"] == "Tasks"]
        assert p.h2[-1] == "Tasks" and [c["h3"] for c in cards] == [r["task_id"] for r in rows]  # answers last
        for card, row in zip(cards, rows):
            text, j = card["text"], verdicts[row["task_id"]]
            assert row["prompt"][:80] in text and row["reference"][:80] in text and row["answer"][:80].strip() in text
            assert j["grade"] == expected_grade(row["answer"]) and j["reason"][:60] in text
            assert str(j["grade"]) in text
            assert text.index("Question") < text.index("Reference answer") < text.index("Answer")
        figures = p.table("")
        assert figures["Open tasks"] == [str(len(rows))]


def test_images_are_embedded_pngs(workdir, page):
    for p in (page, Page((workdir / "eval-base" / "report.html").read_text(encoding="utf-8"))):
        assert p.images
        for src in p.images:
            assert src.startswith("data:image/png;base64,")  # self-contained: nothing to fetch
            Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    html = (workdir / "report.html").read_text(encoding="utf-8")
    assert "<script" not in html and "http://" not in html.split("<body>")[0] and "Noto Sans CJK JP" in html
    assert 'name="viewport"' in html


def test_mix_from_synth_and_train_stats_when_present_and_left_out_without_data(workdir, tmp_path):
    """The agreed shape (synth `by_source`, train `pairs_by_source`) is rendered; no per-source data, no section."""
    # the records the report reads, without the weights
    shutil.copytree(workdir, tmp_path / "w", ignore=shutil.ignore_patterns("*.safetensors", "*.gguf", "*.pt", "*.pth"))
    w = tmp_path / "w"
    synth, train = read(w / "synth" / "stats.json"), read(w / "train" / "stats.json")
    synth["by_source"] = {"wikipedia": {"documents": 2, "passages": 3, "documents_with_pairs": 1, "pairs": 4},
                          "fineweb": {"documents": 5, "passages": 6, "documents_with_pairs": 7, "pairs": 8}}
    train["pairs_by_source"] = {"wikipedia": 9, "fineweb": 10}
    (w / "synth" / "stats.json").write_text(json.dumps(synth), encoding="utf-8")
    (w / "train" / "stats.json").write_text(json.dumps(train), encoding="utf-8")
    timings = read(w / "timings.json")
    report = write_run_report(w, list(timings), timings)
    header, *rows, foot = Page((w / "report.html").read_text(encoding="utf-8")).tables["Data mix"][0]
    assert header == ["Source", "Documents curated", "Drawn for synthesis", "Passages", "Documents with pairs",
                      "Pairs kept", "Pairs trained on"]
    assert rows[0][0] == "fineweb" and rows[0][2:] == ["5", "6", "7", "8", "10"] and foot[2:] == ["7", "9", "8", "12", "19"]
    assert report["data_mix"][1]["pairs_trained"] == 9

    shutil.rmtree(w / "curate" / "data")
    shutil.rmtree(w / "synth" / "data")  # pairs carry their source too
    del synth["by_source"], train["pairs_by_source"]
    (w / "synth" / "stats.json").write_text(json.dumps(synth), encoding="utf-8")
    (w / "train" / "stats.json").write_text(json.dumps(train), encoding="utf-8")
    report = write_run_report(w, list(timings), timings)
    assert report["data_mix"] == [] and "Data mix" not in Page((w / "report.html").read_text(encoding="utf-8")).h2


def test_markup_in_a_task_or_model_name_is_shown_as_text_in_every_page(demo_copy, tmp_path):
    """The eval report, the compare page and the run report escape what the records hold: a task id and a model
    name carrying a script tag are printed as text, and no script tag reaches the page."""
    from markupsafe import escape

    from ezoforge.eval import eval_report
    from ezoforge.eval.compare import compare

    workdir = demo_copy.workdir
    model_tag, task_tag = "<script>model()</script>", "<script>task()</script>"
    for side in ("base", "tuned"):
        folder = workdir / f"eval-{side}"
        report = read(folder / "report.json")
        report["model"]["name"] += model_tag
        (folder / "report.json").write_text(json.dumps(report), encoding="utf-8")
        first = jsonl(folder / "answers.jsonl")[0]["task_id"]
        for name in ("answers.jsonl", "judgements.jsonl"):
            rows = jsonl(folder / name)
            for r in rows:
                r["task_id"] += task_tag if r["task_id"] == first else ""
            (folder / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                       encoding="utf-8")
    tuned = workdir / "eval-tuned"
    compare([workdir / "eval-base", tuned], tmp_path)
    write_run_report(workdir, [], {})
    pages = {"eval": eval_report.run_html(read(tuned / "report.json"), jsonl(tuned / "answers.jsonl"),
                                          jsonl(tuned / "judgements.jsonl")),
             "compare": (tmp_path / "compare.html").read_text(encoding="utf-8"),
             "run": (workdir / "report.html").read_text(encoding="utf-8")}
    for name, text in pages.items():
        assert "<script" not in text, name
        assert escape(model_tag) in text, name
    for name, section in (("eval", "Tasks"), ("run", "Answers side by side")):  # the pages that show tasks
        assert escape(task_tag) in pages[name], name
        heads = [c["h3"] for c in Page(pages[name]).cards if c["section"] == section]
        assert sum(h.split()[0].endswith(task_tag) for h in heads) == 1, name


# ---------------------------------------------------------------- in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Injected into a copy of the page only (the report itself has no script): what the browser loaded and laid out.
PROBE = ("<script>addEventListener('load',()=>{const i=[...document.images];const p=document.createElement('pre');"
         "p.id='probe';p.textContent=JSON.stringify({images:i.length,broken:i.filter(x=>!x.complete||!x.naturalWidth)"
         ".length,scroll:document.documentElement.scrollWidth,width:innerWidth});document.body.appendChild(p)})</script>")


def chromium(*args: str) -> str:
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


def probe(html_path: Path, width: int) -> dict:
    copy = html_path.with_name("probe-" + html_path.name)
    copy.write_text(html_path.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = chromium(f"--window-size={width},900", "--virtual-time-budget=5000", "--dump-dom", copy.as_uri())
    copy.unlink()
    return json.loads(re.search(r'<pre id="probe">([^<]*)</pre>', dom).group(1))


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium fonts-noto-cjk)")
@pytest.mark.parametrize("name", ["report.html", "eval-base/report.html"])
def test_renders_in_headless_chromium(workdir, name, tmp_path):
    path = workdir / name
    shot = tmp_path / "shot.png"
    chromium("--window-size=1300,2400", f"--screenshot={shot}", path.as_uri())
    image = Image.open(shot).convert("RGB")
    assert image.size == (1300, 2400)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50, "the page rendered blank"
    wide = probe(path, 1300)
    assert wide["images"] == len(Page(path.read_text(encoding="utf-8")).images) > 0 and wide["broken"] == 0
    narrow = probe(path, 390)  # a phone: nothing sticks out sideways (wide tables scroll inside their box)
    assert narrow["scroll"] <= narrow["width"]
