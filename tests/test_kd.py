"""Logit distillation: stage 1's --save_logprobs sidecar (written, resumed, in sync with the rows) and stage 2's
--distill_loss kd (the loss against hand arithmetic, the prompt kept out, the tokenizer check, the error without
log-probabilities, a real 2-step run on the tiny model)."""

import json
import math

import pytest
import torch

from distill.records import InputError
from distill.run_files import sidecar_path, sync_sidecar
from distill.soft_targets import TeacherTargets, check_tokenizer, tokenizer_hash
from distill.training import NO_MASS, TeacherTargetCollator, kd_loss
from tests.conftest import run_main
from tests.test_create_data import MAX_LEN, complete_rows, example_subset, paths
from tests.test_train import build, train_args

# ---- the loss, by hand ------------------------------------------------------------------------------------------


def three_token_fixture():
    """Tokens [prompt, answer, end of turn] over a 4-token vocabulary. The teacher's top-2 at the answer token is
    {2: 0.6, 0: 0.2}; the end of turn has no target. Student logits at position 0 (predicting the answer) are
    log [1, 1, 2, 4], at position 1 (predicting the end of turn, token 1) log [1, 3, 2, 2]."""
    logits = torch.log(torch.tensor([[[1.0, 1, 2, 4], [1, 3, 2, 2], [1, 1, 1, 1]]]))
    labels = torch.tensor([[-100, 2, 1]])
    target_ids = torch.tensor([[[0, 0], [2, 0], [0, 0]]])
    target_logprobs = torch.tensor([[[NO_MASS, NO_MASS], [math.log(0.6), math.log(0.2)], [NO_MASS, NO_MASS]]])
    target_mask = torch.tensor([[False, True, False]])
    return logits, labels, target_ids, target_logprobs, target_mask


def test_kd_loss_equals_hand_computed_value():
    fixture = three_token_fixture()
    # T = 1, alpha = 1 (kd). Teacher renormalised over its top 2: p = [0.6, 0.2] / 0.8 = [0.75, 0.25] on ids [2, 0].
    # Student q = [1, 1, 2, 4] / 8, so q[2] = 0.25 and q[0] = 0.125.
    # KL = 0.75 * ln(0.75 / 0.25) + 0.25 * ln(0.25 / 0.125) = 0.75 ln 3 + 0.25 ln 2.
    # End of turn: CE = -ln(3 / 8). Two labelled tokens: the mean of the two.
    kd = 0.75 * math.log(3) + 0.25 * math.log(2)
    end_of_turn = -math.log(3 / 8)
    expected = (kd + end_of_turn) / 2
    assert kd_loss(*fixture, temperature=1.0, alpha=1.0).item() == pytest.approx(expected, rel=1e-6)

    # T = 2, alpha = 0.5 (kd+ce). Teacher: softmax(ln[0.6, 0.2] / 2) = [sqrt 3, 1] / (sqrt 3 + 1).
    # Student: softmax(ln[1, 1, 2, 4] / 2) = [1, 1, sqrt 2, 2] / (4 + sqrt 2), so q[2] = sqrt 2 / (4 + sqrt 2) and
    # q[0] = 1 / (4 + sqrt 2). The answer token's CE (at T = 1) is -ln q[2] = -ln(2 / 8).
    p2, p0 = math.sqrt(3) / (math.sqrt(3) + 1), 1 / (math.sqrt(3) + 1)
    q2, q0 = math.sqrt(2) / (4 + math.sqrt(2)), 1 / (4 + math.sqrt(2))
    kd_t2 = p2 * math.log(p2 / q2) + p0 * math.log(p0 / q0)
    answer = 0.5 * 2**2 * kd_t2 + 0.5 * -math.log(2 / 8)
    expected = (answer + end_of_turn) / 2
    assert kd_loss(*fixture, temperature=2.0, alpha=0.5).item() == pytest.approx(expected, rel=1e-6)
    # alpha = 0 is plain CE on both tokens
    plain = (-math.log(2 / 8) + end_of_turn) / 2
    assert kd_loss(*fixture, temperature=2.0, alpha=0.0).item() == pytest.approx(plain, rel=1e-6)


def test_prompt_positions_never_contribute():
    torch.manual_seed(0)
    length, vocab = 8, 10
    logits = torch.randn(1, length, vocab)
    labels = torch.tensor([[-100, -100, -100, -100, 4, 7, 2, 1]])  # 4 prompt tokens, then answer + end of turn
    target_ids = torch.randint(0, vocab, (1, length, 3))
    target_logprobs = torch.log_softmax(torch.randn(1, length, 3), -1)
    target_mask = torch.ones(1, length, dtype=torch.bool)  # targets everywhere, even on the prompt: labels decide
    loss = kd_loss(logits, labels, target_ids, target_logprobs, target_mask, 2.0, 0.5)

    perturbed = logits.clone()
    perturbed[:, :3] += 5 * torch.randn(1, 3, vocab)  # the logits that predict prompt tokens 1..3
    other_targets = target_logprobs.clone()
    other_targets[:, :4] = torch.log_softmax(torch.randn(1, 4, 3), -1)
    assert kd_loss(perturbed, labels, target_ids, other_targets, target_mask, 2.0, 0.5).item() == \
        pytest.approx(loss.item(), abs=1e-6)

    perturbed[:, 4] += 5 * torch.randn(vocab)  # predicts answer token 5: the loss must move
    assert kd_loss(perturbed, labels, target_ids, target_logprobs, target_mask, 2.0, 0.5).item() != \
        pytest.approx(loss.item(), abs=1e-3)


@pytest.mark.parametrize("padding_free", [False, True])
def test_collator_places_targets_on_completion_tokens(padding_free):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], "teacher_start": 2,
         "teacher_top_ids": [[7, 1]], "teacher_top_logprobs": [[-0.1, -2.0]]},
        {"input_ids": [5, 9, 3], "labels": [-100, 9, 3], "teacher_start": -1, "teacher_top_ids": [],
         "teacher_top_logprobs": []},
        {"input_ids": [5, 4, 3], "labels": [-100, 4, 3], "teacher_start": 1,
         "teacher_top_ids": [[4, 2]], "teacher_top_logprobs": [[-0.5, -1.0]]},
    ]
    collator = TeacherTargetCollator(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free))
    batch = collator(examples)
    marked = batch["teacher_target_mask"].nonzero().tolist()
    assert marked == ([[0, 2], [0, 8]] if padding_free else [[0, 2], [2, 1]])
    for row, column in marked:
        token = int(batch["input_ids"][row, column])
        assert int(batch["teacher_top_ids"][row, column, 0]) == token  # the teacher's top token is the answer token
        assert int(batch["labels"][row, column]) == token


# ---- the tokenizer check ----------------------------------------------------------------------------------------


def test_kd_refuses_a_student_with_another_tokenizer():
    from tests.tiny_model import build_tokenizer

    teacher, student = build_tokenizer(1024), build_tokenizer(900)
    targets = TeacherTargets("logprobs", {}, "teacher-model", tokenizer_hash(teacher))
    check_tokenizer(targets, build_tokenizer(1024), "same-tokenizer-student")  # the same vocabulary passes
    with pytest.raises(InputError, match="student-model.*teacher-model"):
        check_tokenizer(targets, student, "student-model")
    check_tokenizer(TeacherTargets("vote_shares", {}), student, "student-model")  # vote shares: any tokenizer


def test_kd_without_logprobs_stops_before_the_model_loads(tiny_model, gold_teacher_file, tmp_path, monkeypatch):
    import trl

    def no_model(*args, **kwargs):
        raise AssertionError("the trainer (and the model) must not be built")

    monkeypatch.setattr(trl.SFTTrainer, "__init__", no_model)
    with pytest.raises(InputError, match="--save_logprobs"):
        build(tiny_model, gold_teacher_file, tmp_path / "out", "--distill_loss", "kd")


# ---- stage 1 writes and resumes the sidecar; stage 2 trains on it -------------------------------------------------


def sidecar_lines(output):
    return complete_rows(sidecar_path(output))


@pytest.fixture(scope="module")
def logprob_run(tiny_model, tmp_path_factory, shared_engines):
    """Stage 1 on 6 queries with --save_logprobs 3; then a crash is simulated (a row's sidecar line lost, a sidecar
    line without its row) and the run resumed with 14 queries."""
    work = tmp_path_factory.mktemp("kd")
    queries = example_subset(work / "in.jsonl", 14)
    output = work / "teacher.jsonl"
    command = ["create_data.py", "--input_file", queries, "--output_file", output, "--model_name", tiny_model,
               "--constrain_labels", "--save_logprobs", 3, *MAX_LEN]
    run_main(*command, "--split", "all", "--max_samples", 6)  # the first 6 (held out): a resume test, not training
    first = {"rows": complete_rows(output), "sidecar": sidecar_lines(output)}
    sidecar = sidecar_path(output)
    lines = sidecar.read_text(encoding="utf-8").splitlines(keepends=True)
    lost = json.loads(lines[0])["id"]
    orphan = {**json.loads(lines[1]), "id": "never-written"}
    sidecar.write_text("".join(lines[1:]) + json.dumps(orphan) + "\n", encoding="utf-8")
    resumed = run_main(*command)
    return {"output": output, "first": first, "lost": lost, "resumed": resumed, "tiny_model": tiny_model}


@pytest.mark.slow
def test_stage1_writes_one_sidecar_line_per_row(logprob_run):
    from transformers import AutoTokenizer

    rows, lines = logprob_run["first"]["rows"], logprob_run["first"]["sidecar"]
    assert rows and [row["id"] for row in rows] == [line["id"] for line in lines]
    tokenizer = AutoTokenizer.from_pretrained(logprob_run["tiny_model"])
    for row, line in zip(rows, lines):
        label = row["teacher"]["label"]
        assert line["answer_token_ids"] and tokenizer.decode(line["answer_token_ids"]).strip().lower() == label
        assert len(line["top_ids"]) == len(line["top_logprobs"]) == len(line["answer_token_ids"])
        # the label constraint leaves some positions fewer than 3 possible tokens; -inf entries are left out
        assert all(1 <= len(ids) <= 3 for ids in line["top_ids"]) and len(line["top_ids"][0]) == 3
        assert all(math.isfinite(value) for values in line["top_logprobs"] for value in values)
        assert all(values == sorted(values, reverse=True) for values in line["top_logprobs"])
        if line["label_distribution"] is not None:
            assert sum(line["label_distribution"].values()) == pytest.approx(1, abs=1e-3)
    record = json.loads(paths(logprob_run["output"])[2].read_text(encoding="utf-8"))
    assert record["teacher_tokenizer_sha256"] == tokenizer_hash(tokenizer)
    assert record["logprobs_top_k"] == 3 and record["settings"]["save_logprobs"] == 3


@pytest.mark.slow
def test_stage1_resume_keeps_rows_and_sidecar_in_sync(logprob_run):
    output, lost = logprob_run["output"], logprob_run["lost"]
    out, rejects, _ = paths(output)
    rows, lines = complete_rows(out), sidecar_lines(output)
    assert [row["id"] for row in rows] == [line["id"] for line in lines]  # same ids, same order, once each
    assert len(set(row["id"] for row in rows)) == len(rows)
    assert len(rows) + len(complete_rows(rejects)) == 14
    assert "never-written" not in {line["id"] for line in lines}
    assert lost in {row["id"] for row in rows}  # the row that lost its sidecar line was asked again
    stdout = logprob_run["resumed"].stdout
    assert "1 rows without sidecar dropped" in stdout and "1 sidecar without row dropped" in stdout


def test_sync_sidecar_unit(tmp_path):
    out, sidecar = tmp_path / "t.jsonl", tmp_path / "t.logprobs.jsonl"
    out.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n', encoding="utf-8")
    sidecar.write_text('{"id": "a", "top_ids": []}\n{"id": "c", "top_ids": []}\n{"id": "d", "top_ids": []}\n'
                       '{"id": "e", "top', encoding="utf-8")
    dropped = sync_sidecar(out, sidecar)
    assert dropped == {"rows_without_sidecar": ["b"], "sidecar_without_row": ["d"]}
    assert out.read_text() == '{"id": "a"}\n{"id": "c"}\n'
    assert [json.loads(line)["id"] for line in sidecar.read_text().splitlines()] == ["a", "c"]
    before = out.stat().st_mtime_ns, sidecar.stat().st_mtime_ns
    assert sync_sidecar(out, sidecar) == {"rows_without_sidecar": [], "sidecar_without_row": []}
    assert (out.stat().st_mtime_ns, sidecar.stat().st_mtime_ns) == before  # nothing to repair: nothing rewritten


@pytest.mark.slow
def test_kd_training_on_the_sidecar_changes_the_adapter(logprob_run, tmp_path):
    from safetensors.torch import load_file

    tiny_model, output = logprob_run["tiny_model"], logprob_run["output"]
    out = tmp_path / "kd-run"
    # every row in the training split: the 14 example rows' groups may all fall on the held-out side otherwise
    run_main("train_sft_trl.py", *train_args(tiny_model, output, out, "--max_steps", 2, "--distill_loss", "kd+ce",
                                             "--kd_temperature", 2.0, "--heldout_fraction", 0.0,
                                             "--per_device_train_batch_size", 4, "--logging_steps", 1))
    record = json.loads((out / "distill_run.json").read_text())
    assert record["status"] == "finished"
    distillation = record["counts"]["distillation"]
    assert distillation["source"] == "logprobs" and distillation["rows_distilled"] > 0
    assert distillation["rows_distilled"] + distillation["rows_ce_fallback"] == record["counts"]["rows_used"]
    losses = [entry["loss"] for entry in record["log_history"] if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b and any(tensor.abs().sum() > 0 for tensor in lora_b)  # B starts at zero: training moved it


def test_vote_shares_become_a_soft_target_on_the_first_answer_token(tmp_path):
    from distill.render import student_example
    from distill.soft_targets import find_targets, row_targets
    from tests.tiny_model import build_tokenizer

    tokenizer = build_tokenizer(1024)
    row = {"id": "a", "messages": [{"role": "user", "content": "Bonjour"}, {"role": "assistant", "content": "fr"}],
           "teacher": {"label": "fr", "votes": {"fr": 3, "en": 1}}}
    data = tmp_path / "teacher.jsonl"
    data.write_text(json.dumps(row) + "\n", encoding="utf-8")
    targets = find_targets(str(data), [row])
    assert targets.source == "vote_shares"
    example = student_example(tokenizer, "Bonjour", "fr")
    columns = row_targets(targets, row, tokenizer, example)
    first = {label: tokenizer(label, add_special_tokens=False).input_ids[0] for label in ("fr", "en")}
    assert columns["teacher_start"] == example["completion_mask"].index(1)
    assert example["input_ids"][columns["teacher_start"]] == first["fr"]
    shares = dict(zip(columns["teacher_top_ids"][0], map(math.exp, columns["teacher_top_logprobs"][0])))
    assert shares == pytest.approx({first["fr"]: 0.75, first["en"]: 0.25})
    with pytest.raises(InputError, match="--save_logprobs"):  # one vote per row is no soft label
        find_targets(str(data), [{**row, "teacher": {"label": "fr", "votes": {"fr": 1}}}])


def test_merge_shards_merges_sidecars_and_refuses_a_missing_line(tmp_path):
    from tests.test_create_data import _merge, _settings, _shard_files

    rows = [{"id": f"q{i}", "text": f"t{i}"} for i in range(12)]
    settings = _settings(save_logprobs=3)
    pattern = _shard_files(tmp_path, rows, 3, settings)
    for shard in sorted(tmp_path.glob("shard-*-of-3.jsonl")):
        if not shard.name.endswith((".rejects.jsonl", ".logprobs.jsonl")):
            lines = [{"id": row["id"], "answer_token_ids": [1], "top_ids": [[1]], "top_logprobs": [[0.0]]}
                     for row in complete_rows(shard)]
            sidecar_path(shard).write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    out, _, _ = _merge(tmp_path, pattern, rows, settings)
    assert [line["id"] for line in complete_rows(sidecar_path(out))] == [row["id"] for row in complete_rows(out)]

    first_sidecar = sidecar_path(tmp_path / "shard-0-of-3.jsonl")
    first_sidecar.write_text("".join(first_sidecar.read_text().splitlines(keepends=True)[1:]))
    with pytest.raises(InputError, match="no line in their shard's .logprobs.jsonl"):
        _merge(tmp_path, pattern, rows, settings)


# ---- the held-out measure the KD bench reports --------------------------------------------------------------------


def test_heldout_kl_is_zero_on_the_students_own_distribution_and_minus_log_q_for_a_sure_teacher(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.measures import heldout_kl
    from distill.render import student_example

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    query, answer = "which language is this", "the answer is french"
    row = {"id": "q1", "messages": [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]}
    example = student_example(tokenizer, query, answer)
    start = example["completion_mask"].index(1)
    answer_ids = example["input_ids"][start:-1]  # the teacher's answer tokens: the completion without end of turn
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
    student_log_q = torch.log_softmax(logits[start - 1 : start - 1 + len(answer_ids)].float(), dim=-1)
    vocabulary = list(range(student_log_q.shape[-1]))

    def line(top_ids, top_logprobs, token_ids=answer_ids):
        return {"q1": {"id": "q1", "answer_token_ids": token_ids, "top_ids": top_ids, "top_logprobs": top_logprobs}}

    own = heldout_kl(model, tokenizer, [row], line([vocabulary] * len(answer_ids), student_log_q.tolist()))
    assert own["mean_kl"] == pytest.approx(0.0, abs=1e-5)
    assert own["tokens"] == len(answer_ids) and own["rows"] == 1 and own["rows_without_targets"] == 0

    # A teacher sure of token 7 everywhere: KL(one-hot || q) = -log q(7) at each answer position.
    sure = heldout_kl(model, tokenizer, [row], line([[7]] * len(answer_ids), [[0.0]] * len(answer_ids)))
    assert sure["mean_kl"] == pytest.approx(-student_log_q[:, 7].mean().item(), rel=1e-5)

    # A sidecar whose answer tokens the student's tokenization does not start with gives no targets.
    other = heldout_kl(model, tokenizer, [row], line([[7]], [[0.0]], token_ids=[answer_ids[0] + 1]))
    assert other == {"mean_kl": None, "tokens": 0, "rows": 0, "rows_without_targets": 1}


def test_answer_span_leaves_out_a_kept_stop_newline_so_free_form_answers_get_targets(tiny_model):
    """A generative task's stop string (the French task's "\\n") stays in the generated tokens; the student's target
    is the stripped answer then its end of turn, so the teacher's answer tokens must end before the newline, or the
    row silently falls back to CE."""
    from transformers import AutoTokenizer

    from distill.render import student_example
    from distill.soft_targets import answer_span, logprob_targets

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    answer = "la langue est le francais."
    generated = tokenizer(answer + "\n", add_special_tokens=False).input_ids
    start, end = answer_span(tokenizer, generated, answer)
    assert tokenizer.decode(generated[start:end]) == answer and end < len(generated)
    example = student_example(tokenizer, "which language", answer)
    completion = example["input_ids"][example["completion_mask"].index(1):]
    line = {"answer_token_ids": generated[start:end], "top_ids": [[0]] * (end - start),
            "top_logprobs": [[0.0]] * (end - start)}
    assert logprob_targets(line, completion) is not None
    # A label inside a longer answer line keeps its exact tokens (the span is the label's, not the line's).
    label_line = tokenizer("Final Answer: fr\n", add_special_tokens=False).input_ids
    start, end = answer_span(tokenizer, label_line, "fr")
    assert tokenizer.decode(label_line[start:end]).strip() == "fr"


class CharTokenizer:
    """Just enough tokenizer for the label-distribution arithmetic: ids name their text."""

    vocab = ["fr", "f", "e", "en", "ar", "x", "<|im_end|>"]

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)

    def __call__(self, text, add_special_tokens=False):
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=[self.vocab.index(text)] if text in self.vocab
                               else [self.vocab.index(text[0])])


def test_label_distribution_counts_prefix_tokens_a_constrained_teacher_spells_labels_with():
    from distill.soft_targets import label_distribution

    tokenizer = CharTokenizer()
    labels = ["fr", "en", "el", "ar"]
    # p(fr) = 0.1, p(f) = 0.4 (only fr begins with f), p(e) = 0.2 (en and el: 0.1 each), p(en) = 0.2, p(x) = 0.1
    top_ids = [1, 2, 3, 0, 5]
    top_logprobs = [math.log(p) for p in (0.4, 0.2, 0.2, 0.1, 0.1)]
    distribution = label_distribution(tokenizer, labels, top_ids, top_logprobs)
    assert distribution == pytest.approx({"fr": 0.5 / 0.9, "en": 0.3 / 0.9, "el": 0.1 / 0.9, "ar": 0.0}, abs=1e-4)


def test_a_label_rows_distribution_is_the_first_token_target_even_when_token_paths_differ():
    from distill.soft_targets import row_targets

    tokenizer = CharTokenizer()
    # The teacher wrote "fr" as f, r: no token alignment with the student's "fr", but the label distribution holds.
    line = {"id": "a", "answer_token_ids": [1, 99], "top_ids": [[1, 2]], "top_logprobs": [[-0.1, -2.0]],
            "label_distribution": {"fr": 0.75, "en": 0.25, "ar": 0.0}}
    targets = TeacherTargets("logprobs", {"a": line})
    example = {"input_ids": [5, 5, 0, 6], "completion_mask": [0, 0, 1, 1]}
    found = row_targets(targets, {"id": "a"}, tokenizer, example)
    assert found["teacher_start"] == 2 and found["teacher_top_ids"] == [[0, 3]]
    assert [math.exp(v) for v in found["teacher_top_logprobs"][0]] == pytest.approx([0.75, 0.25])
    # Without a distribution and without aligned tokens the row keeps plain CE.
    no_distribution = TeacherTargets("logprobs", {"a": {**line, "label_distribution": None}})
    assert row_targets(no_distribution, {"id": "a"}, tokenizer, example)["teacher_start"] == -1
