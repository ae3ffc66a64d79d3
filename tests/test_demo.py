"""``lmerge demo``: data preparation on small samples written here (parsing, dedup, seeded splits,
label sets), the 'run lmerge demo first' message, and (slow) the whole pipeline on a tiny model."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmerge.__main__ import main
from lmerge.demo.build import SplitSizes, prepare_data
from lmerge.demo.prepare import (
    deduplicate,
    read_conversations,
    read_questions,
    read_sentiment,
    read_sms,
    split_rows,
    task_rows,
)
from lmerge.demo.sources import DemoSources

ROOT = Path(__file__).resolve().parents[1]
LANGS = ("english", "spanish", "swedish")


def write_sources(root: Path, copies: int = 1) -> DemoSources:
    """Small files in the packaged formats, with the known traps: neutral ratings, stacked TREC
    subsets, repeated SMS (one quoted over two lines), an untranslated 'Swedish' utterance."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["id\tsentiment\ttext"]
    for i in range(copies):
        lines += [f"{3 * i}\t2.1\tgood film number {i}", f"{3 * i + 1}\t-1.4\tbad plot number {i}"]
        lines.append(f"{3 * i + 2}\t0.2\tthe film number {i}")  # neutral: left out
    lines.append("99\t1.0\tGood  film number 0")  # a duplicate up to case and spaces
    (root / "reviews.txt").write_text("\n".join(lines) + "\n")
    questions = []
    for i in range(copies):
        questions += [f"HUM:ind Who made film {i} ?", f"LOC:city Where is plot {i} ?", f"NUM:date When was {i} ?"]
    # TREC's file stacks nested subsets: the same questions again.
    (root / "questions.txt").write_text("\n".join(questions + questions[: len(questions) // 2]) + "\n")
    sms = [",spam,text"]
    for i in range(copies):
        sms += [f'{2 * i},0,"see you at {i}\nok"', f"{2 * i + 1},1,win a prize {i} now"]
    sms.append('77,0,"see you at 0\nok"')
    (root / "sms.csv").write_text("\n".join(sms) + "\n")
    for language, word in zip(LANGS, ("hello there my friend", "hola amigo mio querido", "hej min van kara")):
        folder = root / "chat" / language
        folder.mkdir(parents=True, exist_ok=True)
        conversations = [[f"{word} number {i}", "short"] for i in range(copies)]
        if language == "swedish":
            # One Swedish utterance and one left untranslated (also under English).
            conversations = [[f"{word} number 0"], ["hello there my friend number 0"]]
        (folder / "talk.yml").write_text(yaml.safe_dump({"conversations": conversations}))
    return DemoSources(
        base_model=root / "model",
        sentiment=root / "reviews.txt",
        questions=root / "questions.txt",
        sms=root / "sms.csv",
        conversations=root / "chat",
        languages=LANGS,
    )


def test_readers_parse_labels_and_deduplicate(tmp_path):
    sources = write_sources(tmp_path, copies=3)
    reviews = read_sentiment(sources.sentiment)
    assert ("good film number 1", "pos") in reviews and ("bad plot number 2", "neg") in reviews
    assert not any(text.startswith("the film") for text, _ in reviews)
    assert len(reviews) == 7 and len(deduplicate(reviews)) == 6
    questions = read_questions(sources.questions)
    assert len(questions) == 13 and {label for _, label in questions} == {"HUM", "LOC", "NUM"}
    assert ("Who made film 0 ?", "HUM") in deduplicate(questions) and len(deduplicate(questions)) == 9
    sms = read_sms(sources.sms)
    assert ("see you at 0\nok", "ham") in sms and ("win a prize 2 now", "spam") in sms
    assert len(sms) == 7 and ("see you at 0 ok", "ham") in deduplicate(sms) and len(deduplicate(sms)) == 6
    chat = read_conversations(sources.conversations, LANGS)
    assert all(len(text) >= 15 for text, _ in chat)  # "short" is left out
    kept = deduplicate(chat)
    assert ("hello there my friend number 0", "english") not in kept  # under two languages: dropped
    assert {label for _, label in kept} == set(LANGS) and len(kept) == 6


def test_task_rows_drop_small_languages(tmp_path, monkeypatch):
    from lmerge.demo import prepare

    sources = write_sources(tmp_path, copies=3)
    langid = prepare.DemoTask(lambda s: read_conversations(s.conversations, LANGS), min_label_examples=2)
    monkeypatch.setitem(prepare.TASKS, "langid", langid)
    rows = task_rows("langid", sources)
    assert {label for _, label in rows} == {"english", "spanish"}  # one Swedish utterance is left: too few
    assert len(rows) == 5


def test_splits_are_seeded_disjoint_and_independent_of_source_order():
    rows = [(f"text {i}", "a" if i % 3 else "b") for i in range(100)]
    first = split_rows(rows, seed=0, validation=10, test=15, train=50)
    assert first == split_rows(list(reversed(rows)), seed=0, validation=10, test=15, train=50)
    assert first != split_rows(rows, seed=1, validation=10, test=15, train=50)
    assert [len(first[s]) for s in ("train", "validation", "test")] == [50, 10, 15]
    texts = [{t for t, _ in first[s]} for s in ("train", "validation", "test")]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    small = split_rows(rows[:10], seed=0, validation=10, test=15, train=50)
    assert [len(small[s]) for s in ("train", "validation", "test")] == [6, 2, 2]


def write_catalog(root: Path, tasks: dict[str, list[str]]) -> Path:
    """A built catalog like configs/demo/catalog.yaml, its data and adapters under ``root/built``."""
    entries = {}
    for task, labels in tasks.items():
        files = {split: f"built/data/{task}/{split}.json" for split in ("train", "validation", "test")}
        entries[task] = {
            "adapter": f"built/adapters/{task}",
            "dataset": {"path": "json", "data_files": files},
            "label_names": labels,
            "max_length": 32,
        }
    entries["spam"]["metric"] = "macro_f1"
    catalog = root / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"built_by": "lmerge demo", "tasks": entries}))
    return catalog


LABELS = {
    "sentiment": ["neg", "pos"],
    "question": ["HUM", "LOC", "NUM"],
    "spam": ["ham", "spam"],
    "langid": list(LANGS),
}


def test_prepare_data_writes_the_catalogs_files_once(tmp_path):
    sources = write_sources(tmp_path / "src", copies=10)
    catalog = write_catalog(tmp_path, LABELS)
    sizes = SplitSizes(train=100, validation=2, test=3)
    manifests, rebuilt = prepare_data(catalog, sources, sizes, seed=0, min_label_examples=1)
    assert sorted(rebuilt) == sorted(LABELS)
    rows = json.loads((tmp_path / "built/data/question/test.json").read_text())
    assert len(rows) == 3 and set(rows[0]) == {"text", "label"}
    assert manifests["question"]["counts"] == {"train": 25, "validation": 2, "test": 3}
    assert manifests["langid"]["labels"] == sorted(LANGS)
    assert prepare_data(catalog, sources, sizes, seed=0, min_label_examples=1)[1] == []  # cached
    assert sorted(prepare_data(catalog, sources, sizes, seed=1, min_label_examples=1)[1]) == sorted(LABELS)
    changed = json.loads((tmp_path / "built/data/question/test.json").read_text())
    assert changed != rows


def test_missing_demo_files_say_run_lmerge_demo_first(tmp_path, capsys):
    catalog = write_catalog(tmp_path, LABELS)
    code = main(["merge", "--catalog", str(catalog), "--adapters", "[sentiment,spam]", "--method", "uniform"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("lmerge: error: catalog ")
    assert err[-1].endswith("does not exist; run `lmerge demo` first")
    code = main(["fit", "--config", str(ROOT / "configs/adamerging.yaml"), "--data.catalog", str(catalog)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].endswith("does not exist; run `lmerge demo` first")


def tiny_demo_sources(tmp_path: Path, copies: int = 12) -> DemoSources:
    """The demo's sources in small: the packaged formats (:func:`write_sources`) and a tiny random
    bare BERT encoder with the sentence-transformers files that say it pools by the mean, like
    all-MiniLM-L6-v2; vocabulary 100."""
    from conftest import build_bert, save_bert_tokenizer
    from transformers import BertConfig, BertModel

    sources = write_sources(tmp_path / "src", copies=copies)
    words = " ".join(Path(f).read_text() for f in (sources.sentiment, sources.questions, sources.sms)).split()
    words += [w for language in LANGS for w in (sources.conversations / language / "talk.yml").read_text().split()]
    BertModel(BertConfig.from_pretrained(build_bert(tmp_path / "with_head"))).save_pretrained(sources.base_model)
    save_bert_tokenizer(sources.base_model, sorted(set(words))[:80])
    pooling = {"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}
    (sources.base_model / "modules.json").write_text(json.dumps([pooling]))
    (sources.base_model / "1_Pooling").mkdir()
    (sources.base_model / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return sources


@pytest.mark.slow
def test_demo_pipeline_end_to_end_on_a_tiny_model(tmp_path, capsys):
    """Data, four fine-tunes, the static merges, the sweeps and four learners on a tiny random BERT;
    a second run reuses data, adapters and learned merges."""
    from lmerge.demo.pipeline import LEARNERS, STATIC, SWEEPS, run_demo

    sources = tiny_demo_sources(tmp_path)
    catalog = write_catalog(tmp_path, LABELS)
    settings = {
        "catalog": catalog,
        "configs": ROOT / "configs",
        "output_dir": tmp_path / "out",
        "logs_dir": tmp_path / "logs",
        "sources": sources,
        "sizes": SplitSizes(train=16, validation=4, test=4),
        "fit_args": ["--trainer.max_steps", "2", "--data.batch_size", "4", "--trainer.enable_progress_bar", "false"],
        "eval_batch_size": 8,
        "min_label_examples": 1,
    }
    outcome = run_demo(**settings)
    names = [r.name for r in outcome.results]
    assert names[: len(STATIC) + 1] == ["single-task adapters", *STATIC]
    sweeps = names[len(STATIC) + 1 : -len(LEARNERS)]
    assert len(sweeps) == len(SWEEPS)
    for row, sweep in zip(sweeps, SWEEPS, strict=True):
        assert row.startswith(f"{sweep} (lambda=")
    assert names[-len(LEARNERS) :] == list(LEARNERS)
    for row in outcome.results:
        assert set(row.scores) == set(LABELS) and all(0.0 <= v <= 1.0 for v in row.scores.values())
    assert all((tmp_path / f"built/adapters/{task}/adapter_config.json").is_file() for task in LABELS)
    assert all((tmp_path / f"built/adapters/{task}/task_head.json").is_file() for task in LABELS)  # mean pooling
    report = outcome.report.read_text()
    assert "| AdaMerging |" in report and "langid (accuracy)" in report and "spam (macro_f1)" in report
    assert "## The adapters alone (test split)" in report and "| head alone on the frozen base |" in report
    assert "## Predicted classes on the test split" in report and "| true labels |" in report
    assert "| head alone |" in report and "| AdaMerging | " in report.split("## Predicted classes")[1]
    assert "## Task vectors: why tasks interfere" in report and "| task | size vs base weights |" in report
    vectors = json.loads((outcome.report.parent / "task_vectors.json").read_text())
    order = vectors["adapters"]
    assert sorted(order) == sorted(LABELS) and all(0 < s < 10 for s in vectors["relative_size"]["all"])
    assert f"| {order[0]} | +1.000 |" in report and f"| layer | {order[0]} / {order[1]} |" in report
    assert outcome.chart.read_bytes().startswith(b"\x89PNG")
    assert "best learned: " in outcome.table and "best learned: " in report
    assert list((tmp_path / "logs" / "lightning_logs").glob("version_*/events.out.tfevents.*"))
    out = capsys.readouterr().out
    assert "fine-tuning" in out
    assert "learning SuperMerge, gradient CE, regret smooth-max, AdaMerging:" in out  # the most steps first
    assert "- learned this run: AdaMerging, gradient CE, SuperMerge, regret smooth-max" in report
    assert "- scores reused (inputs unchanged): none" in report
    again = run_demo(**settings, rescore=True)
    out = capsys.readouterr().out
    assert "cached adapter" in out
    # The learners' merges too: the same specs, scored again on the test split.
    assert out.count("cached learned merge") == len(LEARNERS) and "cached scores reused" not in out
    assert [(r.name, r.scores) for r in again.results] == [(r.name, r.scores) for r in outcome.results]
    assert [r.detail for r in again.results[-len(LEARNERS) :]] == [r.detail for r in outcome.results[-len(LEARNERS) :]]
    assert "- learned this run: none (cached: their inputs were unchanged)" in again.report.read_text()

    # A third run reuses every score (computed from the same inputs), but the one whose run bundle
    # is gone: that merge runs and is scored again.
    shutil.rmtree(again.results[1].detail)
    third = run_demo(**settings)
    out = capsys.readouterr().out
    rows = 1 + len(STATIC) + len(SWEEPS) + len(LEARNERS)  # the adapters alone, and each method
    assert f"  {rows - 1} cached scores reused (inputs unchanged; --rescore true to score them again)" in out
    assert [r.as_record() for r in third.results if r.name != "uniform"] == [
        r.as_record() for r in again.results if r.name != "uniform"
    ]
    assert third.results[1].scores == again.results[1].scores and Path(third.results[1].detail).is_dir()
    assert "- scores reused (inputs unchanged): adapters alone, ties, " in third.report.read_text()


# `lmerge demo` with the installed packages replaced by the sources written here (JSON, argv[1]).
DEMO_ON_TINY_SOURCES = """
import json, sys
from pathlib import Path
import lmerge.demo.sources as sources
paths = json.loads(sys.argv[1])
tiny = sources.DemoSources(**{k: tuple(v) if k == "languages" else Path(v) for k, v in paths.items()})
sources.installed_sources = lambda: tiny
from lmerge.__main__ import main
sys.exit(main(sys.argv[2:]))
"""
# tqdm's bars, and Lightning's (rich), whose metric columns wrap onto indented lines below it.
PROGRESS_BAR = re.compile(r"\d+%\|| \d+/\d+ \[|it/s\]|s/it\]|━")
BAR_COLUMNS = " " * 20


def screen(text: str) -> list[str]:
    """The lines a terminal keeps of ``text``, progress bars left out: each line as its last
    carriage return leaves it."""
    kept, in_bar = [], False
    for line in (line.rsplit("\r", 1)[-1] for line in text.split("\n")):
        in_bar = bool(PROGRESS_BAR.search(line)) or (in_bar and line.startswith(BAR_COLUMNS))
        if not in_bar:
            kept.append(line)
    return kept


@pytest.mark.slow
def test_the_demos_console_fits_on_one_screen(tmp_path):
    """`lmerge demo` as a user runs it (a fresh process, the libraries as chatty as they are):
    lmerge's steps and results, nothing of Lightning's, transformers' or the warnings of
    dependencies, and one screen apart from progress bars."""
    from test_console import LIBRARY_LINES

    sources = tiny_demo_sources(tmp_path, copies=120)  # langid keeps languages of 100 utterances
    paths = {k: list(v) if k == "languages" else str(v) for k, v in vars(sources).items()}
    argv = ["demo", "--catalog", str(write_catalog(tmp_path, LABELS)), "--output_dir", str(tmp_path / "out")]
    argv += ["--logs_dir", str(tmp_path / "logs"), "--train_examples", "16", "--validation_examples", "4"]
    argv += ["--test_examples", "4", "--eval_batch_size", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    env.pop("TRANSFORMERS_VERBOSITY", None)  # the test suite's own quieting, not lmerge's
    run = subprocess.run(
        [sys.executable, "-c", DEMO_ON_TINY_SOURCES, json.dumps(paths), *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    console = screen(run.stdout) + screen(run.stderr)
    assert [line for line in LIBRARY_LINES if any(line in shown for shown in console)] == []
    assert "  report: " in run.stdout and "best learned: " in run.stdout
    assert len([line for line in console if line.strip()]) <= 60, "\n".join(console)


def test_demo_jobs_share_the_cores_out():
    from lmerge.demo.jobs import plan

    assert plan(4, 0, 2) == (2, 1)  # the project's machine: two one-thread fits side by side
    assert plan(4, 0, 16) == (4, 4)
    assert plan(1, 0, 2) == (1, 2)  # one fit left: it gets every core
    assert plan(4, 3, 2) == (3, 1)  # asked for: three, each at least one thread
    assert plan(4, 1, 8) == (1, 8)


def test_demo_jobs_run_the_lmerge_command_and_a_failure_names_its_step(tmp_path, monkeypatch):
    from lmerge.demo import jobs
    from lmerge.demo.jobs import FitRunner, Job, run_jobs
    from lmerge.errors import LMergeError

    envs, popen = [], jobs.subprocess.Popen
    monkeypatch.setattr(
        jobs.subprocess, "Popen", lambda *args, **kwargs: envs.append(kwargs["env"]) or popen(*args, **kwargs)
    )
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    done = []
    (tmp_path / "consoles").mkdir()
    help_job = Job("help", ["--help"], tmp_path / "consoles" / "help.log")
    bad = Job("bad", ["merge", "--method", "no_such_method"], tmp_path / "consoles" / "bad.log")
    peak = run_jobs([help_job], 2, 1, done.append)
    assert [d.job for d in done] == [help_job] and "usage: lmerge VERB" in done[0].output
    assert done[0].output == help_job.log.read_text() and peak > 0
    assert envs[0]["OMP_NUM_THREADS"] == "1" and envs[0]["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "8"
    with pytest.raises(LMergeError, match=r"^demo step bad: `lmerge merge --method no_such_method \.\.\.` ended with "):
        run_jobs([bad, help_job], 2, 1, done.append)
    message = str(pytest.raises(LMergeError, run_jobs, [bad], 1, 1).value)
    assert "exit code 2: lmerge: error: " in message and message.endswith(f"(its console: {bad.log})")

    # Fits that start together get TensorBoard versions of their own, after those already there.
    (tmp_path / "logs" / "lightning_logs" / "version_3").mkdir(parents=True)
    runner = FitRunner(tmp_path / "logs", tmp_path / "consoles", 0, ["--trainer.max_steps", "2"])
    first, second = runner.job("a", "fit-a", ["fit"]), runner.job("b", "fit-b", ["fit"])
    assert runner.log_dirs == {
        "a": tmp_path / "logs/lightning_logs/version_4",
        "b": tmp_path / "logs/lightning_logs/version_5",
    }
    assert first.argv[-4:] == ["--trainer.logger.version", "version_4", "--trainer.max_steps", "2"]
    assert second.log == tmp_path / "consoles" / "fit-b.log"


def test_demo_jobs_take_the_cores_of_those_that_ended_once_none_is_left_to_start(tmp_path, monkeypatch):
    """Each job is told (LMERGE_THREADS_FILE) the threads it may use: its share while jobs wait to
    start, then the cores that the ended ones and this process's own work leave."""
    import subprocess
    import sys

    from lmerge.demo import jobs
    from lmerge.demo.jobs import CoreShare, Job, run_jobs

    share = CoreShare(tmp_path / "share" / "threads", tmp_path, cores=2)
    assert share.threads_each(running=2, pending=True, threads=1) == 1
    assert share.threads_each(running=1, pending=True, threads=1) == 1  # the next job starts soon
    assert share.threads_each(running=1, pending=False, threads=1) == 2
    share.own_work.set()  # this process works on one core beside them
    assert share.threads_each(running=1, pending=False, threads=1) == 1
    assert share.threads_each(running=2, pending=False, threads=1) == 1
    share.own_work.clear()
    assert CoreShare(share.path, tmp_path, cores=16).threads_each(running=3, pending=False, threads=4) == 5

    # Children that sleep as long as their argv says, then print what the file grants them.
    popen = subprocess.Popen
    script = "import os, sys, time; time.sleep(float(sys.argv[1])); print(open(os.environ[sys.argv[2]]).read())"

    def sleeper(command, **options):
        return popen([sys.executable, "-c", script, command[3], jobs.THREADS_FILE_ENV], **options)

    monkeypatch.setattr(jobs.subprocess, "Popen", sleeper)
    (tmp_path / "consoles").mkdir()
    timed = [
        Job(name, [seconds], tmp_path / "consoles" / f"{name}.log")
        for name, seconds in (("long", "4"), ("short", "0.2"))
    ]
    done = []
    run_jobs(timed, 2, 1, done.append, share=share)
    assert [(d.job.name, d.output.strip()) for d in done] == [("short", "1"), ("long", "2")]

    # While this process does its own steps, the one job left keeps one thread.
    share.own_work.set()
    done.clear()
    run_jobs(timed, 2, 1, done.append, share=share)
    assert [(d.job.name, d.output.strip()) for d in done] == [("short", "1"), ("long", "1")]


def test_a_fit_follows_the_threads_its_file_grants(tasks, tmp_path, monkeypatch):
    """``lmerge fit`` with LMERGE_THREADS_FILE set reads it as it trains (ThreadBudget); without
    the variable no such callback is there."""
    import torch

    from lmerge.callbacks import ThreadBudget
    from lmerge.lightning_cli import lightning

    config = tmp_path / "fit.yaml"
    config.write_text(
        "model:\n  class_path: lmerge.learn.AdaMerging\n  init_args: {adapters: [alpha, beta], lr: 0.05}\n"
        f"data: {{catalog: {tasks}, tasks: [alpha, beta], fit_split: test, batch_size: 4}}\n"
        "trainer: {max_steps: 2, enable_progress_bar: false, logger: false, enable_checkpointing: false,"
        f" default_root_dir: {tmp_path}}}\n"
        f"export: {{output_dir: {tmp_path / 'out'}}}\n"
    )
    threads = torch.get_num_threads()
    granted = 1 if threads > 1 else 2
    (tmp_path / "threads").write_text(f"{granted}\n")
    try:
        monkeypatch.setenv("LMERGE_THREADS_FILE", str(tmp_path / "threads"))
        cli = lightning(["fit", "--config", str(config)])
        assert [type(c) for c in cli.trainer.callbacks if isinstance(c, ThreadBudget)] == [ThreadBudget]
        assert torch.get_num_threads() == granted
    finally:
        torch.set_num_threads(threads)
    monkeypatch.delenv("LMERGE_THREADS_FILE")
    cli = lightning(["fit", "--config", str(config)])
    assert not any(isinstance(c, ThreadBudget) for c in cli.trainer.callbacks)

    # A file that is missing or holds no number changes nothing; it is read at most once a second.
    budget = ThreadBudget(str(tmp_path / "missing"))
    budget.on_train_batch_start()
    assert torch.get_num_threads() == threads
    (tmp_path / "bad").write_text("two")
    budget = ThreadBudget(str(tmp_path / "bad"), every_seconds=60)
    budget.on_validation_batch_start()
    (tmp_path / "bad").write_text(f"{granted}")
    budget.on_validation_batch_start()  # within the minute: not read again
    assert torch.get_num_threads() == threads


def test_demo_learners_and_sweep_rankings_run_in_bf16_only_where_the_device_computes_it_natively(monkeypatch):
    from lmerge.demo import jobs
    from lmerge.errors import ConfigError

    native_bf16 = jobs.native_bf16
    for native, expected in ((True, "bf16-mixed"), (False, "32-true")):
        monkeypatch.setattr(jobs, "native_bf16", lambda native=native: native)
        assert jobs.demo_precision("auto", "learner_precision") == expected
        assert (
            jobs.demo_precision("32-true", "x") == "32-true" and jobs.demo_precision("bf16-mixed", "x") == "bf16-mixed"
        )
    with pytest.raises(ConfigError, match=r"^ranking_precision: unknown precision 'bf16'.*bf16-mixed"):
        jobs.demo_precision("bf16", "ranking_precision")
    monkeypatch.setattr(jobs.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(jobs.torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(jobs.torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert native_bf16()
    monkeypatch.setattr(jobs.torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not native_bf16()


def test_demo_jobs_run_beside_this_process_which_works_once_a_core_is_idle(tmp_path, monkeypatch):
    import subprocess
    import sys
    import time

    import torch

    from lmerge.demo import jobs
    from lmerge.demo.jobs import FitRunner, Job
    from lmerge.errors import LMergeError

    (tmp_path / "consoles").mkdir()
    runner = FitRunner(tmp_path / "logs", tmp_path / "consoles", 2, [])
    threads, done = torch.get_num_threads(), []
    bad = Job("bad", ["merge", "--method", "no_such_method"], tmp_path / "consoles" / "bad.log")
    # A job that fails is raised at the block's next pace.
    with pytest.raises(LMergeError, match=r"^demo step bad: "):
        with runner.beside([bad], "running", done.append) as pace:
            pace()
    assert torch.get_num_threads() == threads

    # Children that sleep as long as their argv says: on two workers, 6 s beside 0.5 s, then 0.5 s.
    started, popen = [], subprocess.Popen

    def sleeper(command, **options):
        started.append(popen([sys.executable, "-c", f"import time; time.sleep({command[3]})"], **options))
        return started[-1]

    monkeypatch.setattr(jobs.subprocess, "Popen", sleeper)
    timed = [
        Job(name, [seconds], tmp_path / "consoles" / f"{name}.log")
        for name, seconds in (("long", "6"), ("short", "0.5"), ("last", "0.5"))
    ]
    began = time.perf_counter()
    with runner.beside(timed, "running", done.append) as pace:
        pace()  # waits until a worker has nothing left to start: "last" has ended, "long" runs on
        waited = time.perf_counter() - began
        assert 0.9 < waited < 5.5 and torch.get_num_threads() == 1 and [d.job.name for d in done] == ["short", "last"]
        while started[0].poll() is None:
            time.sleep(0.05)
        time.sleep(0.5)  # the runner's poll sees it end
        pace()
        assert torch.get_num_threads() == threads  # every job has ended: all threads again
    assert [d.job.name for d in done] == ["short", "last", "long"] and runner.peak_rss_mb > 0

    # When the block raises, the jobs still running are stopped.
    started.clear()
    sleepers = [Job(name, ["60"], tmp_path / "consoles" / f"{name}.log") for name in ("a", "b")]
    began = time.perf_counter()
    with pytest.raises(RuntimeError, match="the block failed"):
        with runner.beside(sleepers, "running", done.append):
            while len(started) < 2:
                time.sleep(0.05)
            raise RuntimeError("the block failed")
    assert time.perf_counter() - began < 30 and all(process.poll() is not None for process in started)
    assert torch.get_num_threads() == threads


def test_demo_fine_tunes_the_tasks_with_the_most_tokens_first(zoo, tmp_path):
    from lmerge.demo.build import longest_first

    manifests = {}
    texts = {"short": "a", "long": "a b c d e f g h i j k l", "capped": " ".join(["word"] * 40)}
    for task, text in texts.items():
        train = tmp_path / task / "train.json"
        train.parent.mkdir()
        train.write_text(json.dumps([{"text": text, "label": "x"}, {"text": text, "label": "y"}]))
        manifests[task] = {"files": {"train": str(train)}}
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        "tasks:\n"
        + "".join(
            f"  {task}:\n    dataset: {{path: json, data_files: {{train: {task}/train.json}}}}\n"
            f"    label_names: [x, y]\n" + ("    max_length: 4\n" if task == "capped" else "")
            for task in texts
        )
    )
    # "capped" has the most words but is cut at 4 tokens: fewer than "long"'s.
    assert longest_first(manifests, list(texts), catalog, zoo["bert"]) == ["long", "capped", "short"]
