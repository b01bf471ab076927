"""zotune predict: label-word probabilities for sentences given on the command line."""

import re

import pytest
import torch

from zotune.cli import main
from zotune.evaluate import build, encode, predict
from zotune.tasks.data import Example

pytestmark = pytest.mark.usefixtures("one_thread")

LINE = re.compile(r"^terrible (\d\.\d\d)  great (\d\.\d\d)  -> (terrible|great)$")


def test_predict_prints_one_line_of_probabilities_per_sentence(tiny_mlm_dir, capsys):
    texts = ["a gorgeous , witty film", "boring and flat", "it is what it is"]
    args = ["predict", "--model", str(tiny_mlm_dir), "--task", "sst2", "--device", "cpu"]
    assert main(args + [a for t in texts for a in ("--text", t)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    prompted = build(str(tiny_mlm_dir), "sst2", device="cpu")
    want = torch.softmax(predict(prompted.runner, encode(prompted.prompt, [Example((t,), None) for t in texts]), 8), -1)
    for line, row in zip(lines, want.tolist()):
        match = LINE.match(line)
        assert match, line
        terrible, great, word = float(match[1]), float(match[2]), match[3]
        assert terrible == pytest.approx(row[0], abs=0.006) and great == pytest.approx(row[1], abs=0.006)
        assert word == ("great" if row[1] > row[0] else "terrible")


def test_predict_with_custom_label_words_and_template(tiny_mlm_dir, capsys):
    assert main(["predict", "--model", str(tiny_mlm_dir), "--device", "cpu", "--text", "fine",
                 "--template", "*cls**sent_0*_Overall*mask*.*sep+*", "--label-words", "bad,good"]) == 0
    assert re.match(r"^bad \d\.\d\d  good \d\.\d\d  -> (bad|good)$", capsys.readouterr().out.strip())


def test_predict_two_sentence_task_and_errors(tiny_mlm_dir, capsys):
    assert main(["predict", "--model", str(tiny_mlm_dir), "--task", "rte", "--device", "cpu",
                 "--text", "A man is sleeping.\tSomeone rests."]) == 0
    assert re.match(r"^No \d\.\d\d  Yes \d\.\d\d  -> (No|Yes)$", capsys.readouterr().out.strip())
    assert main(["predict", "--model", str(tiny_mlm_dir), "--task", "rte", "--device", "cpu",
                 "--text", "only a premise"]) == 2
    err = capsys.readouterr().err
    assert "2 sentences" in err and err.count("\n") == 1


def test_predict_on_a_causal_lm_prints_candidate_probabilities(tiny_causal_dir, capsys):
    from zotune.cli import _candidate_scores
    texts = ["a gorgeous , witty film", "boring and flat"]
    args = ["predict", "--model", str(tiny_causal_dir), "--task", "sst2", "--device", "cpu"]
    assert main(args + [a for t in texts for a in ("--text", t)]) == 0
    lines = capsys.readouterr().out.splitlines()
    prompted = build(str(tiny_causal_dir), "sst2", device="cpu")
    scores, _ = _candidate_scores(prompted.runner, [prompted.prompt.example_from_text(t) for t in texts], 8)
    for line, row in zip(lines, torch.softmax(scores, -1).tolist()):
        match = LINE.match(line)  # the candidates " terrible" / " great", as text
        assert match, line
        assert float(match[1]) == pytest.approx(row[0], abs=0.006) and float(match[2]) == pytest.approx(row[1], abs=0.006)
        assert match[3] == ("great" if row[1] > row[0] else "terrible")
    # a SuperGLUE task takes a JSON record of its template's fields (COPA lower-cases a choice, as MeZO's
    # template); a bad one is one line
    record = '{"premise": "The lamp went dark.", "question": "cause", "choice1": "The bulb burned out.", ' \
             '"choice2": "I opened a window."}'
    assert main(["predict", "--model", str(tiny_causal_dir), "--task", "copa", "--device", "cpu", "--text", record]) == 0
    assert re.match(r"^the bulb burned out\. \d\.\d\d  I opened a window\. \d\.\d\d  -> (the|I) ",
                    capsys.readouterr().out)
    assert main(["predict", "--model", str(tiny_causal_dir), "--task", "copa", "--device", "cpu",
                 "--text", "not json"]) == 2
    err = capsys.readouterr().err
    assert "JSON object" in err and err.count("\n") == 1


def test_predict_squad_prints_the_generated_answer(tiny_causal_dir, capsys):
    """A generation task's --text is a record without answers; predict prints the greedy answer,
    the one transformers' generate gives on the prompt that eval would build for that record."""
    import json

    from transformers import AutoModelForCausalLM

    from zotune.evaluate import MAX_NEW_TOKENS, stop_tokens
    from zotune.tasks.causal import CAUSAL_TASKS, to_example
    records = [{"title": "Old_Mill", "context": "Ann Ray built the mill in 1901.", "question": "Who built the mill?"},
               {"title": "Pond", "context": "The pond froze.", "question": "What froze?"}]
    args = ["predict", "--model", str(tiny_causal_dir), "--task", "squad", "--device", "cpu"]
    assert main(args + [a for r in records for a in ("--text", json.dumps(r))]) == 0
    printed = capsys.readouterr().out
    assert main(args + ["--text", json.dumps({"title": "T", "question": "Who?"})]) == 2  # no context: one line
    err = capsys.readouterr().err
    assert "no field 'context'" in err and err.count("\n") == 1
    prompted = build(str(tiny_causal_dir), "squad", device="cpu")
    tokenizer, want = prompted.prompt.tokenizer, []
    hf = AutoModelForCausalLM.from_pretrained(tiny_causal_dir, dtype=torch.float32).eval()
    for record in records:
        example = prompted.prompt.example_from_text(json.dumps(record))
        gold = to_example(CAUSAL_TASKS["squad"], {**record, "answers": ["Ann"]}, tokenizer, prompted.prompt.bos)
        assert example.prompt_ids == gold.prompt_ids and example.label is None and example.answers == ()
        ids = torch.tensor([example.prompt_ids])
        with torch.inference_mode():
            new = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                              max_new_tokens=MAX_NEW_TOKENS, eos_token_id=sorted(stop_tokens(tokenizer)),
                              pad_token_id=1)[0, ids.shape[1]:]
        want.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    assert printed == "".join(answer + "\n" for answer in want)
