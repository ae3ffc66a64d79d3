"""Generation tasks: batched greedy decoding against a hand-written argmax loop (causal and
seq2seq), answer normalisation and extraction, and generation tasks through merge evaluation."""

from __future__ import annotations

import json
import re

import pytest
import torch
from lightning.pytorch import Trainer
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from lmerge.data import TaskDataModule
from lmerge.errors import ConfigError
from lmerge.metrics import contains, exact_match, extract_answer, get_metric, normalize_answer
from lmerge.tasks.kinds.generation import GenerationSettings, generate_answers, generate_ids, read_answers
from lmerge.tasks.spec import TaskSpec

PROMPT = "Question: {text} Answer:"
TEXTS = ["good film", "the plot was boring and the acting awful", "nice", "a great movie", "poor"]


def argmax_loop(model, prompt, max_new_tokens, ends, encoder_decoder=False, stop=(), decode=None):
    """Greedy decoding by hand, one example, no padding: append the argmax token until an end
    token, ``max_new_tokens`` tokens, or a stop string in the decoded answer."""
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            if encoder_decoder:
                decoder = torch.tensor([[model.config.decoder_start_token_id, *tokens]])
                logits = model(input_ids=torch.tensor([prompt]), decoder_input_ids=decoder).logits
            else:
                logits = model(input_ids=torch.tensor([prompt + tokens])).logits
        token = int(logits[0, -1].argmax())
        if token in ends:
            break
        tokens.append(token)
        if any(s in decode(tokens) for s in stop):
            break
    return tokens


def data_module(tmp_path, base) -> TaskDataModule:
    rows = [{"text": text, "label": "good"} for text in TEXTS]
    (tmp_path / "test.json").write_text(json.dumps(rows))
    return TaskDataModule(
        name="gen",
        tokenizer=str(base),
        dataset={"path": "json", "data_files": {"test": str(tmp_path / "test.json")}},
        kind="generation",
        prompt=PROMPT,
        eval_batch_size=len(TEXTS),
    )


def check_against_loop(module, model, settings, encoder_decoder):
    tokenizer = module.tokenizer
    batch = next(iter(module.dataloader("test")))
    ends = {tokenizer.eos_token_id, module.pad_id()}
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    with torch.inference_mode():
        generated = generate_ids(model, batch, settings, tokenizer, module.pad_id())
        answers = generate_answers(model, batch, tokenizer, settings, module.pad_id())
    expected = [
        argmax_loop(
            model,
            tokenizer(PROMPT.format(text=text))["input_ids"],
            settings.max_new_tokens,
            ends,
            encoder_decoder,
            settings.stop,
            decode,
        )
        for text in TEXTS
    ]
    assert generated == expected
    return batch, expected, answers


def test_batched_greedy_decoding_matches_an_argmax_loop_on_llama(word_llama, tmp_path):
    base = word_llama["base"]
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    module = data_module(tmp_path, base)
    settings = GenerationSettings.read({"max_new_tokens": 7}, "test")
    batch, expected, answers = check_against_loop(module, model, settings, encoder_decoder=False)
    # Prompts of different lengths, left-padded: every answer starts in the same column.
    mask = batch["prompt_mask"]
    assert len(set(mask.sum(-1).tolist())) > 1 and bool((mask[:, -1] == 1).all())
    assert any(len(tokens) > 1 for tokens in expected)  # the model generates words, not at once EOS
    tokenizer = module.tokenizer
    assert answers == [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in expected]

    # A stop string the model does generate: each row stops once its text holds it, and is cut before it.
    word = next(tokenizer.decode(tokens[1:2]) for tokens in expected if len(tokens) > 1)
    stopped = GenerationSettings.read({"max_new_tokens": 7, "stop": [word]}, "test")
    _, expected_stopped, answers = check_against_loop(module, model, stopped, encoder_decoder=False)
    assert expected_stopped != expected
    assert answers == [
        tokenizer.decode(tokens, skip_special_tokens=True).split(word)[0].strip() for tokens in expected_stopped
    ]


def test_batched_greedy_decoding_matches_an_argmax_loop_on_t5(t5_tasks, tmp_path):
    base = t5_tasks.parent / "t5"
    model = AutoModelForSeq2SeqLM.from_pretrained(base).eval()
    module = data_module(tmp_path, base)
    assert module.encoder_decoder
    check_against_loop(module, model, GenerationSettings.read({"max_new_tokens": 5}, "test"), encoder_decoder=True)


def test_answer_normalisation_by_hand():
    assert normalize_answer("The Answer: an ELEPHANT!") == "answer elephant"
    assert normalize_answer("  Paris,\tFrance. ") == "paris france"
    # Numbers keep their sign and decimal point and lose their thousands separators.
    assert normalize_answer("It costs -1,000.50 dollars.") == "it costs -1000.50 dollars"
    assert normalize_answer("-3") != normalize_answer("3")
    assert normalize_answer("« Oui », dit-il") == "oui ditil"
    assert exact_match("The cat.", "cat") and not exact_match("cats", "cat")
    assert contains("I think the answer is Paris, France.", "paris") and not contains("Parisian", "paris")
    assert contains("yes", "Yes!") and not contains("no", "not")


def test_answer_extraction_takes_the_last_match():
    number = re.compile(r"(-?[\d,.]*\d)")
    assert extract_answer("3 apples and 4 pears make 7.", number) == "7"
    assert extract_answer("no digits", number) is None
    assert extract_answer("anything", None) == "anything"
    assert extract_answer("so x = 12", re.compile(r"x = \d+")) == "x = 12"  # no group: the whole match
    predictions, references = read_answers(["it is 1,000", "none"], ["#### 1000", "42"], number)
    assert predictions == ["1,000", ""] and references == ["1000", "42"]
    measure = get_metric("exact_match").build(0)
    measure.update(predictions, references)
    assert measure.compute() == 0.5  # "1,000" and "1000" normalize alike; "" is not 42


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"metric": "accuracy"}, "metric 'accuracy' does not score generated text; use wer, exact_match, contains"),
        ({"label_names": ["yes", "no"]}, "generation answers are free text, so label_names do not apply"),
        ({"generation": {"max_new_tokens": 0}}, "generation.max_new_tokens must be a positive integer, got 0"),
        ({"generation": {"beams": 2}}, "generation.beams: unknown key"),
        ({"generation": {"stop": [""]}}, "generation.stop must be a list of non-empty strings"),
        ({"generation": {"answer_pattern": "("}}, "generation.answer_pattern '\\(' is not a regular expression"),
        ({"generation": [1]}, "generation must be a mapping"),
    ],
)
def test_generation_settings_are_checked(fields, message):
    with pytest.raises(ConfigError, match=f"^task t: {message}"):
        TaskSpec(name="t", kind="generation", **fields)


def test_generation_settings_belong_to_generation_tasks():
    assert TaskSpec(name="t", kind="generation").metric == "exact_match"
    assert TaskSpec(name="t", kind="label_tokens").metric == "accuracy"
    with pytest.raises(ConfigError, match="^task t: generation is for kind 'generation' only"):
        TaskSpec(name="t", kind="label_tokens", generation={"max_new_tokens": 4})


def test_merge_evaluates_generation_tasks_like_an_independent_loop(word_llama, tmp_path, capsys):
    """``lmerge merge --eval_tasks`` on two generation tasks (exact match, WER): the recorded
    single and merged scores equal those of PEFT models decoded by the argmax loop."""
    import yaml
    from peft import PeftModel
    from torchmetrics.text import WordErrorRate

    from lmerge.__main__ import main

    base = word_llama["base"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    settings = {"max_new_tokens": 4, "stop": ["."]}

    def answers(model, texts):
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        prompts = [tokenizer(PROMPT.format(text=text))["input_ids"] for text in texts]
        loops = [argmax_loop(model, p, 4, {tokenizer.eos_token_id}, stop=["."], decode=decode) for p in prompts]
        return [decode(tokens).split(".")[0].strip() for tokens in loops]

    def peft(adapter):
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()

    texts = [" ".join(TEXTS[i % len(TEXTS)].split()[: 1 + i % 3]) for i in range(8)]
    first_single = answers(peft(word_llama["first"]), texts)
    # Half the references are what the first adapter answers, so its exact match is at least 0.5.
    references = {
        "first": [answer if i % 2 == 0 else "music" for i, answer in enumerate(first_single)],
        "second": ["good film" if i % 2 else "the science" for i in range(8)],
    }
    entries = {}
    for task, metric in (("first", "exact_match"), ("second", "wer")):
        rows = [{"text": text, "label": label} for text, label in zip(texts, references[task])]
        (tmp_path / f"{task}.json").write_text(json.dumps(rows))
        entries[task] = {
            "adapter": str(word_llama[task]),
            "kind": "generation",
            "metric": metric,
            "dataset": {"path": "json", "data_files": {"test": f"{task}.json"}},
            "prompt": PROMPT,
            "generation": settings,
        }
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"tasks": entries}))
    out = tmp_path / "out"
    command = ["merge", "--adapters", "[first,second]", "--catalog", str(catalog), "--method", "task_vector"]
    assert main([*command, "--eval_tasks", "[first,second]", "--eval_batch_size", "3", "--output_dir", str(out)]) == 0
    run_dir = capsys.readouterr().out.split("run bundle: ")[1].strip()
    results = json.loads((next((out / "merged" / "task_vector").glob("*/eval/test/eval_results_*.json"))).read_text())
    merged_model = peft(run_dir)

    def exact(predicted, reference):
        return sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predicted, reference)) / len(reference)

    def wer(predicted, reference):
        return float(WordErrorRate()(predicted, reference))

    expected = {
        "first": (exact(first_single, references["first"]), exact(answers(merged_model, texts), references["first"])),
        "second": (
            wer(answers(peft(word_llama["second"]), texts), references["second"]),
            wer(answers(merged_model, texts), references["second"]),
        ),
    }
    assert expected["first"][0] >= 0.5
    for task, (single, merged) in expected.items():
        scores = results["tasks"][task]
        assert scores["examples"] == 8
        assert abs(scores["single"] - single) < 1e-6 and abs(scores["merged"] - merged) < 1e-6, task
    assert results["tasks"]["second"]["higher_is_better"] is False


def learn_and_export(learner_class, split, options, catalog, tmp_path, capsys):
    from lmerge.data import CatalogDataModule
    from lmerge.pipeline import export_learned_merge

    learner = learner_class(str(catalog), ["first", "second"], **options)
    before = learner.coefficients.values()
    data = CatalogDataModule(str(catalog), ["first", "second"], fit_split=split, batch_size=4)
    trainer = Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(learner, datamodule=data)
    assert learner.coefficients.values() != before
    out = tmp_path / "out"
    export_learned_merge(learner, str(out), eval_tasks=["first", "second"])
    assert re.search(r"^second +exact_match", capsys.readouterr().out, re.MULTILINE)
    [entry] = json.loads(next(out.glob("merged/weighted_delta_n/*/eval/index.json")).read_text())
    for task in ("first", "second"):
        scores = entry["tasks"][task]
        assert scores["metric"] == "exact_match" and 0 <= scores["merged"] <= 1 and scores["examples"] == 20


def test_a_learner_trains_on_generation_tasks_and_its_export_is_evaluated(generation_catalog, tmp_path, capsys):
    """Teacher-forced CE on the answers is the training signal; the export generates."""
    from lmerge.learn import GradientCE

    learn_and_export(GradientCE, "validation", {"ce_baseline_batches": 1}, generation_catalog, tmp_path, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["AdaMerging", "SuperMerge", "RegretSmoothMax"])
def test_every_other_learner_trains_on_generation_tasks(name, generation_catalog, tmp_path, capsys):
    import lmerge.learn

    split, options = ("test", {"lr": 0.05}) if name == "AdaMerging" else ("validation", {})
    if name == "RegretSmoothMax":
        options = {"baseline_batches": 1}
    learn_and_export(getattr(lmerge.learn, name), split, options, generation_catalog, tmp_path, capsys)
