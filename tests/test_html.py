"""report.html from a run directory's files, `ptd report`, and a check in a real headless browser.

The fixture tests/data/demo_run holds the text files (no weights) of a real run of
configs/fashion_mnist_demo.yaml, shortened:
  ptd run configs/fashion_mnist_demo.yaml --out RUN --set data.train_subset=2000 --set threads=1
    --set teacher.optim.epochs=2 --set distill.optim.epochs=1 --set prune.retrain.epochs=1
    --set distill.arms=[scratch,unpruned_teacher,pruned_teacher,retrained_teacher]
Its results.json predates the interval statistics, which `ptd report` must bring up to date.
"""
import base64
import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from ptd.cli import main
from ptd.report import rerender
from ptd.report.html import chain_after, render_run_html, stage_curves
from ptd.report.stats import format_estimate

DEMO = Path(__file__).parent / "data" / "demo_run"
IMG = re.compile(r'<img src="([^"]*)" alt="([^"]*)">')
SECTIONS = 7  # arms, comparisons, teacher curves, student curves, layer sparsity, widths, compute


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    shutil.copytree(DEMO, d)
    return d


def images(page: str) -> list[tuple[str, str]]:
    return IMG.findall(page)


def test_stage_curves_find_every_stage(run_dir):
    c = stage_curves(run_dir)
    assert sorted(c) == ["control", "distill", "prune", "teacher"]
    assert [n for n, _ in c["prune"]] == ["prune/level_1", "prune/level_2", "prune/level_3", "prune/level_4"]
    assert len(c["distill"]) == 8 and len(c["control"]) == 4
    # The teacher trained 2 epochs; pruning levels (1 epoch each) then follow as epochs 3, 4, 5, 6,
    # and so do the control rounds, in their own sequence.
    chained = chain_after(c["teacher"], c["prune"] + c["control"])
    assert [[r["epoch"] for r in rows] for _, rows in chained] == [[3], [4], [5], [6]] * 2


def test_run_html_is_self_contained_and_complete(run_dir):
    md = rerender(run_dir)
    page = (run_dir / "report.html").read_text()
    imgs = images(page)
    assert len(imgs) == SECTIONS
    for src, alt in imgs:
        assert src.startswith("data:image/png;base64,") and alt
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # Nothing fetched from outside the file: no links, scripts or style sheets by URL.
    assert not re.search(r'(src|href)="(?!data:)', page) and "<script" not in page and "<link" not in page
    r = json.loads((run_dir / "results.json").read_text())
    c = r["comparison"]["pruned_minus_unpruned"]
    # Recomputed from the students: 30.02 and 10.56 points; mean 20.29, sd 19.46 / sqrt(2) = 13.76,
    # se 13.76 / sqrt(2) = 9.73, t(0.975, 1) = 12.706 -> 20.29 - 123.63 = -103.34.
    assert c["n"] == 2 and c["method"] == "paired t, one teacher" and not c["called"]
    assert 100 * c["ci_low"] == pytest.approx(20.29 - 12.706 * 9.73, abs=0.05)
    for text in ("distilled from pruned teacher", "95% CI", "paired t, one teacher", "Per-layer sparsity of the pruned teacher",
                 "Teacher vs student widths per layer", "Compute and latency", "Training curves: students"):
        assert text in page
    # The comparison table and the verdict show the interval cut to the [-100, +100] points a
    # difference can take (results.json keeps the t interval itself): [-103.34, ...] read as a range
    # the data allowed (real-data audit).
    assert f"-100.00 .. {min(100.0, 100 * c['ci_high']):+.2f} (cut)" in page
    assert "95% CI [-100.00, " in md and "(cut to the range a difference can take)" in md and "| 95% CI of the mean % |" in md


def test_teacher_replicates_get_their_own_curves(run_dir):
    """Replicate 1's stages live under teachers/r1/: they are drawn as replicate 1's curves, never
    chained into replicate 0's teacher figure or mixed with its students."""
    r1 = run_dir / "teachers" / "r1"
    for stage in ("teacher", "prune", "control", "distill"):
        shutil.copytree(run_dir / stage, r1 / stage)
    c0, c1 = stage_curves(run_dir, 0), stage_curves(run_dir, 1)
    assert sorted(c0) == sorted(c1) == ["control", "distill", "prune", "teacher"]
    assert all(not name.startswith("teachers") for runs in c0.values() for name, _ in runs)
    assert [n for n, _ in c1["prune"]] == [f"teachers/r1/prune/level_{k}" for k in (1, 2, 3, 4)]
    assert len(c0["distill"]) == len(c1["distill"]) == 8
    r = json.loads((run_dir / "results.json").read_text())
    row = {"teacher_test_acc": 0.9, "pruned_test_acc": 0.9, "sparsity": 0.59, "control_test_acc": 0.9}
    r["teacher_replicates"] = [{"replicate": 0, **row}, {"replicate": 1, **row}]
    page = render_run_html(run_dir, r)
    alts = [alt for _, alt in images(page)]
    assert len(alts) == SECTIONS + 2  # a teacher figure and a student figure per replicate
    assert "student training curves under teacher replicate 1" in alts
    assert "teacher, pruning and control training curves of replicate 1" in alts


def test_missing_files_become_notes(run_dir):
    (run_dir / "prune" / "level_4" / "sparsity.json").unlink()
    (run_dir / "student" / "stats.json").unlink()
    for f in (run_dir / "distill").rglob("metrics.jsonl"):
        f.unlink()
    page = render_run_html(run_dir)
    assert len(images(page)) == SECTIONS - 3  # no sparsity, no widths, no student curves
    assert f"per-layer sparsity: not drawn, {run_dir / 'prune' / 'level_4' / 'sparsity.json'} is not in this folder." in page
    assert "No student metrics.jsonl." in page
    # The committed results folders hold no stats.json: the page said the student "was named in the
    # config, not derived" of a derived student, and gave no student size at all (new-user audit).
    assert "no per-layer plan" not in page and "named in the config" not in page
    assert f"The per-layer plot needs {run_dir / 'student' / 'stats.json'}, which is not in this folder." in page
    s = json.loads((run_dir / "results.json").read_text())["student"]
    assert f"{s['params']:,} params ({s['params_ratio']:.3f}x the teacher), {s['flops']:,} FLOPs" in page


def test_a_results_only_folder_says_where_the_curves_are(run_dir, tmp_path):
    """benchmarks/results/<run>/ keeps results.json without the stage folders: the report says
    so instead of guessing that the teacher came from a checkpoint."""
    d = tmp_path / "results_only"
    d.mkdir()
    shutil.copy(run_dir / "results.json", d / "results.json")
    page = render_run_html(d)
    assert page.count("this folder holds the run's results without its stage folders") == 2
    assert "loaded from a checkpoint" not in page


def test_cli_report_rerenders_and_errors_in_one_line(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "| comparison (a - b) |" in out and str(run_dir / "report.html") in out
    assert (run_dir / "report.html").is_file() and (run_dir / "report.md").is_file()
    missing = tmp_path / "nothing"
    assert main(["report", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"ptd: error: {missing / 'results.json'} not found: {missing} is not a finished ptd run; "
                   f"run `ptd run CONFIG --out {missing}` to finish it")
    # A stage folder: the run that holds it, not "run `ptd run CONFIG --out <run>/teacher`" (a new
    # run inside the old one: new-user audit).
    (run_dir / "teacher").mkdir(exist_ok=True)
    assert main(["report", str(run_dir / "teacher")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{run_dir / 'teacher'} is a folder inside the ptd run {run_dir.absolute()}, "
                                                    f"not a run; give the run itself, {run_dir.absolute()}")
    (run_dir / "results.json").write_text("{}")
    assert main(["report", str(run_dir)]) == 2
    assert "is not a ptd results file (KeyError" in capsys.readouterr().err


# ---------------------------------------------------------------- a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Injected first into <head>: records every error event (a failed image load fires one too) and
# console.error call, and on load lists the images that did not decode; writes it all into the DOM
# that --dump-dom prints.
PROBE = """<script>
window.__errs=[];window.addEventListener('error',function(e){window.__errs.push('error: '+(e.message||(e.target&&(e.target.alt||e.target.src))||'?').slice(0,120))},true);
var ce=console.error;console.error=function(){window.__errs.push('console.error: '+Array.from(arguments).join(' '));ce.apply(console,arguments)};
window.addEventListener('load',function(){var bad=[];for(const i of document.images){if(!i.complete||i.naturalWidth===0)bad.push(i.alt||i.src.slice(0,60))}
var d=document.createElement('pre');d.id='ptd-check';d.textContent=JSON.stringify({images:document.images.length,broken:bad,errors:window.__errs,
width:Math.max(...Array.from(document.images).map(i=>i.naturalWidth))});document.body.appendChild(d)});
</script>"""


def browser_check(page_path: Path, work: Path) -> dict:
    """Load ``page_path`` in headless chromium; return {images, broken, errors, console}."""
    probe = work / "probed.html"
    probe.write_text(page_path.read_text().replace("<head>", "<head>" + PROBE, 1))
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                        "--enable-logging=stderr", "--v=0", f"--user-data-dir={work / 'profile'}", "--dump-dom", probe.as_uri()],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="ptd-check">(.*?)</pre>', r.stdout, re.S)
    assert m, f"chromium did not finish loading the page (rc {r.returncode}): {r.stderr[-500:]}"
    out = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
    # Console messages chromium logs itself (e.g. CSP or parse errors), beyond what the probe saw.
    out["console"] = [l for l in r.stderr.splitlines() if ":CONSOLE" in l]
    return out


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_report_html_in_a_real_browser(run_dir, tmp_path):
    rerender(run_dir)
    res = browser_check(run_dir / "report.html", tmp_path)
    assert res["images"] == SECTIONS and res["broken"] == [] and res["errors"] == [] and res["console"] == []
    assert res["width"] >= 900  # figures decoded at full size (10 inches at 100 dpi)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_browser_check_catches_broken_images_and_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
                   '<img src="data:image/png;base64,AAAA" alt="corrupt"><img src="missing.png" alt="missing">'
                   '<script>console.error("boom")</script></body></html>')
    res = browser_check(bad, tmp_path)
    assert res["broken"] == ["corrupt", "missing"]
    assert "console.error: boom" in res["errors"] and "error: corrupt" in res["errors"]


# ---------------------------------------------------------------- sweep
# tests/data/demo_sweep/sweep.json: a real `ptd sweep configs/fashion_mnist_sweep.yaml` shortened
# (train_subset 1000, 1 epoch per stage, sparsities 0.36/0.59, imp and oneshot, seeds 0-2).
DEMO_SWEEP = Path(__file__).parent / "data" / "demo_sweep"


def test_sweep_html_and_cli_report(tmp_path, capsys):
    d = tmp_path / "sweep"
    shutil.copytree(DEMO_SWEEP, d)
    assert main(["report", str(d)]) == 0
    assert str(d / "report.html") in capsys.readouterr().out
    page = (d / "report.html").read_text()
    imgs = images(page)
    assert [alt for _, alt in imgs] == ["student accuracy vs teacher sparsity", "student accuracy vs total compute"]
    assert all(base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG" for src, _ in imgs)
    r = json.loads((d / "sweep.json").read_text())  # sweep.json rewritten with today's statistics
    v = r["rows"][0]["vs_unpruned_teacher"]
    assert v["n"] == 3 and v["method"] == "paired t, one teacher" and "ci_low" in v
    assert format_estimate(v) in page
    # The whole-sweep call is Holm's step-down (ptd.report.sweep.family_intervals); the page said
    # "Bonferroni intervals" for it, while the intervals it shows are each row's own 95%.
    assert v["family"]["method"] == "Holm" and v["family"]["rows"] == 4
    assert ("Called over the sweep: Holm's step-down, a row called when its interval at 1 - 0.05/m excludes zero, m being the "
            "comparisons not called before it (first 98.75%, Bonferroni's level), at most 5% chance of any false call among the 4") in page
    assert (d / "sweep.md").is_file() and (d / "student_acc_vs_sparsity.png").is_file()
    # sweep.md's Reading (the whole-sweep count, the extra-training caveat, the best-mean warning)
    # was on no part of the page (new-user trial): every line of it is now.
    md = (d / "sweep.md").read_text()
    reading = [x.lstrip(" -") for x in md[md.index("## Reading"):md.index("## Plots")].splitlines()[1:] if x.strip()]
    assert len(reading) >= 4 and "<h2>Reading</h2>" in page
    assert [x for x in reading if html.escape(x) not in page] == []
    if CHROMIUM:
        res = browser_check(d / "report.html", tmp_path)
        assert res["images"] == 2 and res["broken"] == [] and res["errors"] == [] and res["console"] == []


def test_rerender_takes_the_deployed_latency_from_the_student_stage(run_dir):
    """A results.json written before it carried onnxruntime's latency gets it from student/stats.json."""
    stats_path = run_dir / "student" / "stats.json"
    stats = json.loads(stats_path.read_text())
    stats["onnx_latency"] = {"runtime": "onnxruntime CPU", "threads": 1, "repeats": 5,
                             "batch_1": {"teacher_ms": 0.5, "student_ms": 0.4, "speedup": 1.25},
                             "batch_64": {"teacher_ms": 12.0, "student_ms": 5.0, "speedup": 2.4}}
    stats_path.write_text(json.dumps(stats))
    assert "onnx_latency" not in json.loads((run_dir / "results.json").read_text())["student"]
    md = rerender(run_dir)
    assert json.loads((run_dir / "results.json").read_text())["student"]["onnx_latency"] == stats["onnx_latency"]
    assert "| onnxruntime (1 thread) | 64 | 12.00 | 5.00 | 2.40x |" in md
    assert "<td class=l>onnxruntime (1 thread)</td><td>64</td><td>12.00</td><td>5.00</td><td>2.40x</td>" in (run_dir / "report.html").read_text()
    assert "ran slower than its teacher" not in (run_dir / "report.html").read_text()
    # The caption with the runs' spread is on the page, as in report.md (it once was dropped there).
    assert '<p class="note">Latency, teacher vs student, fp32' in (run_dir / "report.html").read_text()
    # A student slower than its teacher in one runtime (its paired runs' interval below 1) is said
    # under the table on the page too.
    stats["onnx_latency"]["batch_1"] = {"teacher_ms": 0.4, "student_ms": 0.5, "speedup": 0.8,
                                        "teacher_times_ms": [0.4] * 6, "student_times_ms": [0.5] * 6}
    stats_path.write_text(json.dumps(stats))
    r = json.loads((run_dir / "results.json").read_text())
    del r["student"]["onnx_latency"]  # taken again from stats.json, as for an older run
    (run_dir / "results.json").write_text(json.dumps(r))
    rerender(run_dir)
    assert ('<p class="note">The student ran slower than its teacher here (the speedup&#x27;s 95% interval is below 1): '
            'onnxruntime (1 thread) at batch 1 (0.80x, [0.80, 0.80]).' in (run_dir / "report.html").read_text())
    assert "round_to: 32" not in (run_dir / "report.html").read_text()  # not a GPU row: no GPU advice


# ---------------------------------------------------------------- what a new user's audit found in report.html


def test_the_page_shows_an_arm_interval_clipped_to_0_100(run_dir):
    """Two students at 83.33% and 100%: the t interval of their mean is [-14.22, 197.55] %, and the
    page's table (and the figure's text column) showed it so. Now cut to 0-100 % and marked, with
    the t interval in a note."""
    from ptd.report import summarize

    r = json.loads((run_dir / "results.json").read_text())
    students = [{"arm": "scratch", "seed": 0, "test_acc": 50 / 60}, {"arm": "scratch", "seed": 1, "test_acc": 1.0}]
    students += [{"arm": arm, "seed": k, "test_acc": 0.90} for arm in ("unpruned_teacher", "pruned_teacher", "retrained_teacher") for k in (0, 1)]
    page = render_run_html(run_dir, {**r, "students": students, **summarize(students)})
    assert "<td>0.00 .. 100.00 (clipped)</td>" in page and "<td>90.00 .. 90.00</td>" in page
    assert "not available" not in page
    assert "-14.22 .. 197.55" not in page
    assert "(clipped): the interval is clipped to 0-100 %" in page and "student alone (no teacher) [-14.22, 197.55]" in page


def test_rerender_names_a_loaded_teacher_and_the_weights_from_the_run_files(run_dir, tmp_path):
    """`ptd report` on runs whose results.json predates these records: the loaded teacher is read
    from teacher/result.json's "source" (what stage_teacher writes for teacher.checkpoint), the
    weights each model ends on from config.yaml (a config.yaml without prune.retrain_checkpoint is
    from before that key, when rounds ended on their best-validation epoch), and both are written
    into results.json."""
    d = tmp_path / "loaded"
    shutil.copytree(DEMO, d)
    src = "/runs/c10/teacher/model.safetensors"
    t = json.loads((d / "teacher" / "result.json").read_text())
    (d / "teacher" / "result.json").write_text(json.dumps({**t, "source": src, "epochs": 0, "steps": 0, "wall_s": 0.0}))
    cfg = (d / "config.yaml").read_text()
    (d / "config.yaml").write_text(cfg.replace("  checkpoint: null\n", f"  checkpoint: {src}\n")
                                   .replace("  strategy: imp\n", "  strategy: imp\n  retrain_checkpoint: last\n"))
    md = rerender(d)
    assert md.splitlines()[2] == (
        f"Dataset: fashion_mnist. Accuracies are test top-1 (%): the teacher as loaded from {src} (not trained in this run); "
        "the pruned teacher and the control teacher at their last epoch (prune.retrain_checkpoint: last); the students at "
        "their best-validation epoch.")
    assert f"| teacher (vgg11), loaded from {src} (not trained here) |" in md and "(lower bound)" in md
    r = json.loads((d / "results.json").read_text())
    assert r["teacher"]["source"] == src and r["weights"]["pruned_teacher"] == "last"
    page = (d / "report.html").read_text()
    assert f"loaded from {src} (not trained here)" in page and "the teacher as loaded from" in page
    assert "distilled from pruned teacher (lower bound)" in page
    md = rerender(run_dir)  # the demo run: from before retrain_checkpoint, a trained teacher
    assert md.splitlines()[2] == "Dataset: fashion_mnist. Accuracies are test top-1 (%) at the best-validation checkpoint."
    assert "loaded from" not in md
    assert json.loads((run_dir / "results.json").read_text())["weights"] == {
        "teacher": "best", "pruned_teacher": "best", "retrained_teacher": "best", "students": "best"}


def test_a_re_render_that_would_draw_fewer_figures_is_refused(run_dir, capsys):
    """With distill/ deleted, `ptd report` overwrote report.html and its student training curves
    (drawn from distill/*/metrics.jsonl, the only copy left) with a note, exit 0 (bad-input audit).
    It is refused in one line naming the figure, and nothing is written; a copy of the results in
    a new folder still renders."""
    rerender(run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    shutil.rmtree(run_dir / "distill")
    capsys.readouterr()
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ptd: error: {run_dir / 'report.html'} draws figures this re-render cannot ("), err
    assert "student" in err[0] and f"no longer in {run_dir}; restore them, or copy its results" in err[0]
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    fresh = run_dir.parent / "copy"
    fresh.mkdir()
    shutil.copy(run_dir / "results.json", fresh / "results.json")
    assert main(["report", str(fresh)]) == 0


# ---------------------------------------------------------------- report.html says what report.md says

class _Page(HTMLParser):
    """The headings, table rows (cell texts) and running text of a rendered page."""

    def __init__(self):
        super().__init__()
        self.headings, self.rows, self.text = [], [], []
        self._heading, self._row, self._cell = None, None, None

    def handle_starttag(self, tag, attrs):
        if tag in ("h1", "h2", "h3"):
            self._heading = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append("".join(self._heading).strip())
            self._heading = None
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(tuple(self._row))
            self._row = None
        self.text.append(" ")  # a block's end is a word break, never glue between two sentences

    def handle_data(self, data):
        for part in (self._heading, self._cell, self.text):
            if part is not None:
                part.append(data)


def _md_parts(md: str) -> tuple[list[str], list[tuple[str, ...]], list[str]]:
    """report.md's headings, table rows (cells, "[a, b]" intervals written as the page writes them,
    "a .. b") and sentences (paragraphs and bullets, markup stripped)."""
    headings, rows, sentences = [], [], []
    for line in md.splitlines():
        if line.startswith("#"):
            headings.append(line.lstrip("#").strip())
        elif line.startswith("|"):
            if not re.fullmatch(r"\|(-+:?\|)+", line):
                cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
                rows.append(tuple(re.sub(r"^\[(.+?), (.+?)\]", r"\1 .. \2", c) for c in cells))
        elif line.strip():
            sentences.append(" ".join(line.removeprefix("- ").replace("**", "").split()))
    return headings, rows, sentences


COMMITTED = sorted(d for d in (Path(__file__).resolve().parents[1] / "benchmarks" / "results").iterdir()
                   if (d / "results.json").is_file() and (d / "report.md").is_file())


@pytest.mark.parametrize("folder", [DEMO] + COMMITTED, ids=lambda d: d.name)
def test_the_page_says_everything_report_md_says(folder, tmp_path):
    """report.html left out the Answer heading, its "some one of these three" caveat, the pruning
    levels, each comparison's per-seed differences and the note that unstructured zeros save no
    FLOPs, while the README says it opens with the same (new-user trial). Every heading, table row
    and sentence of report.md must be on the page (the page's own figures and notes are extra).
    Run on the fixture (the control arm, pruning levels) and every committed run: several losses,
    teacher replicates, a loaded teacher."""
    from ptd.report import render_markdown

    d = tmp_path / "run"
    shutil.copytree(folder, d)
    md = rerender(d) if folder == DEMO else render_markdown(json.loads((d / "results.json").read_text()))
    page = _Page()
    page.feed(render_run_html(d))
    text = " ".join(html.unescape("".join(page.text)).split())
    headings, rows, sentences = _md_parts(md)
    at = [next((i for i, x in enumerate(page.headings) if x == h or x.startswith((h + " ", h + ":"))), None) for h in headings]
    missing = [h for h, i in zip(headings, at) if i is None]
    # and in report.md's order: its text points "above" and "below" (the replicates' "the tables above show replicate 0's teachers")
    found = [i for i in at if i is not None]
    assert found == sorted(found), (headings, page.headings)
    missing += [" | ".join(r) for r in rows if r not in set(page.rows)]
    missing += [s for s in sentences if s not in text]
    assert not missing, "\n".join(missing)
