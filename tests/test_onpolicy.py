"""Stage 2b, on-policy prompt distillation (train_opd_trl.py, distill/onpolicy.py, distill/opd_setup.py).

The teacher's hidden states through the prompt's KV cache equal a plain forward of the whole teacher input, at the
positions that predict each completion token; the loss equals a reverse KL computed by hand from full logits; a
thinking teacher gets an empty think block; bad input fails before weights load (tokenizer mismatch, unreachable
server, no training rows); a stage-1 file gives its user turns; and (slow) the CLI trains a tiny student whose LoRA
weights change, with a run record that names the teacher and its tokens, against the self-teacher, another model in
the process, and a stand-in server client (a real teacher server: tests/test_recipes.py, tests/test_teacher_server.py).
"""

import copy
import dataclasses
import json
import socket
import time

import pytest
import torch

from distill.onpolicy import PrefixCache, TeacherInputs, shared_prefix, teacher_hidden_states
from distill.prompts import TaskPrompt, load_prompt
from distill.render import teacher_ids, teacher_text
from tests.conftest import REPO, run_main

IN_SHORT = REPO / "prompts" / "in_short.md"


def tiny_prompt(turns=(("Why is snow white?", "In short: ice crystals scatter every colour."),)) -> TaskPrompt:
    return TaskPrompt("p.md", "Answer in one short sentence that starts with In short.", (), None, "{query}",
                      {"regex": "^In short: "}, example_turns=tuple(turns))


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


def completion_batch(tokenizer, answers: list[str]):
    rows = [tokenizer(a, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for a in answers]
    width = max(map(len, rows))
    ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    return ids, mask


def test_teacher_hidden_states_with_the_prompt_cache_equal_a_plain_forward(tiny):
    model, tokenizer = tiny
    prompt = tiny_prompt()
    queries = ["What is rain?", "Why do cats purr so loudly at night?"]
    prefix = shared_prefix(tokenizer, prompt)
    teacher = TeacherInputs.build(tokenizer, prompt, queries, prefix)
    assert len(prefix) > 20 and all(suffix for suffix in teacher.suffixes)
    completion_ids, completion_mask = completion_batch(tokenizer, ["In short: water.", "In short: they are happy."])
    cache = PrefixCache(prefix)
    with torch.no_grad():
        cached = teacher_hidden_states(model.model, teacher.suffixes, completion_ids, completion_mask, prefix, cache)
        uncached = teacher_hidden_states(model.model, teacher.suffixes, completion_ids, completion_mask, prefix, None)
        cached_again = teacher_hidden_states(model.model, teacher.suffixes, completion_ids, completion_mask, prefix,
                                             cache)
    assert cache.tokens_computed == len(prefix), "the prefix is forwarded once per run, not per batch"
    for i, query in enumerate(queries):
        full = teacher_ids(tokenizer, prompt, query, scoring=True)
        answer = completion_ids[i][completion_mask[i].bool()].tolist()
        with torch.no_grad():
            reference = model.model(input_ids=torch.tensor([full + answer])).last_hidden_state[0]
        # completion token j is predicted by the hidden state just before it
        expected = reference[len(full) - 1: len(full) - 1 + len(answer)]
        n = len(answer)
        torch.testing.assert_close(uncached[i, :n], expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cached[i, :n], expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(cached_again[i, :n], expected, atol=1e-4, rtol=1e-4)


def test_the_loss_is_the_reverse_kl_to_the_prompted_teacher_on_the_sampled_tokens(tiny):
    """TRL's chunked generalized JSD at beta 1, on our teacher layout, against a reverse KL from full logits."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    model, tokenizer = tiny
    prompt = tiny_prompt()
    query, answer = "What is rain?", "In short: water falling."
    prefix = shared_prefix(tokenizer, prompt)
    teacher = TeacherInputs.build(tokenizer, prompt, [query], prefix)
    completion_ids, completion_mask = completion_batch(tokenizer, [answer])
    student_prompt = tokenizer.apply_chat_template([{"role": "user", "content": query}], add_generation_prompt=True,
                                                   enable_thinking=False, tokenize=False)
    student_ids = tokenizer(student_prompt, add_special_tokens=False).input_ids
    n = completion_ids.size(1)
    with torch.no_grad():
        student_hidden = model.model(input_ids=torch.tensor([student_ids + completion_ids[0].tolist()])
                                     ).last_hidden_state[:, len(student_ids) - 1: len(student_ids) - 1 + n]
        teacher_hidden = teacher_hidden_states(model.model, teacher.suffixes, completion_ids, completion_mask, prefix,
                                               PrefixCache(prefix))
        loss, _, _ = _chunked_divergence_loss(student_hidden, teacher_hidden, model.lm_head.weight,
                                              model.lm_head.weight, completion_mask, beta=1.0)
        log_s = torch.log_softmax(model.lm_head(student_hidden), -1)
        log_t = torch.log_softmax(model.lm_head(teacher_hidden), -1)
        by_hand = (log_s.exp() * (log_s - log_t)).sum(-1)[completion_mask.bool()].mean()
    assert by_hand > 1e-4, "a different input must give a different distribution"
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-4)


@pytest.mark.parametrize("kind, ending", [("thinking-2507", "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
                                          ("hybrid", "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
                                          ("instruct-2507", "<|im_start|>assistant\n")])
def test_a_scoring_teacher_is_in_the_final_answer_state_of_its_own_template(tiny, kind, ending):
    """Stage 2b scores the student's final answer: a Thinking-2507 teacher gets the think block its generation prompt
    opens closed, a hybrid one enable_thinking=False, an Instruct-2507 one nothing. (Before: the hybrid teacher was
    rendered without the switch and scored the answer as the start of a thought.) Stage 1's generating teacher keeps
    its template's default."""
    from tests.tiny_model import TEMPLATES

    _, tokenizer = tiny
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = TEMPLATES[kind]
    text = teacher_text(tokenizer, tiny_prompt(), "What is rain?", scoring=True)
    assert text.endswith("What is rain?<|im_end|>\n" + ending)
    generating = teacher_text(tokenizer, tiny_prompt(), "What is rain?")
    assert generating.endswith("<|im_start|>assistant\n" + ("<think>\n" if kind == "thinking-2507" else ""))


def test_example_turns_reach_the_teacher_and_not_the_student(tiny):
    _, tokenizer = tiny
    text = teacher_text(tokenizer, tiny_prompt(), "What is rain?", scoring=True)
    assert "Why is snow white?" in text and "In short: ice crystals" in text and text.count("<|im_start|>user") == 2


def test_a_row_that_does_not_start_with_the_shared_prefix_is_refused(tiny):
    _, tokenizer = tiny
    with pytest.raises(ValueError, match="does not start with the prompt's shared tokens"):
        TeacherInputs.build(tokenizer, tiny_prompt(), ["x"], [tokenizer.eos_token_id] * 3)


# ---- bad input, before any weights load ------------------------------------------------------------------------


def test_a_teacher_with_another_tokenizer_is_refused_before_weights_load(tiny_model, tmp_path):
    from tests.tiny_model import build_tokenizer

    other = tmp_path / "other-teacher"
    build_tokenizer(900).save_pretrained(other)  # no weights at all: the check must not need them
    result = run_main("train_opd_trl.py", "--config", "recipes/opd_cpu.yaml", "--model_name_or_path", tiny_model,
                      "--teacher_model_name_or_path", other, "--prompt_file", IN_SHORT, "--dataset_name",
                      REPO / "example-data" / "general_questions.jsonl", "--output_dir", tmp_path / "out",
                      "--report_to", "none", check=False)
    assert result.returncode != 0
    assert "its tokenizer is not the student's" in result.stderr and "tokens against" in result.stderr


def test_an_unreachable_teacher_server_fails_in_seconds(tiny_model, tmp_path):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    started = time.monotonic()
    result = run_main("train_opd_trl.py", "--config", "recipes/opd_cpu.yaml", "--model_name_or_path", tiny_model,
                      "--teacher_server_url", f"http://127.0.0.1:{port}", "--prompt_file", IN_SHORT,
                      "--dataset_name", REPO / "example-data" / "general_questions.jsonl", "--output_dir",
                      tmp_path / "out", "--report_to", "none", check=False)
    assert result.returncode != 0 and "unreachable" in result.stderr and "distill.teacher_server" in result.stderr
    assert time.monotonic() - started < 30  # probed from the command line, before TRL or torch is imported


def test_a_stage1_file_gives_its_user_turns_and_held_out_groups_never_train(tmp_path):
    from types import SimpleNamespace

    from distill.opd_setup import training_queries
    from distill.splits import split_of

    stage1 = tmp_path / "teacher.jsonl"
    rows = [json.loads(line) for line in (REPO / "example-data" / "general_questions.jsonl").read_text().splitlines()]
    with open(stage1, "w") as handle:
        for row in rows:
            handle.write(json.dumps({"id": row["id"], "group": row["group"], "messages": [
                {"role": "user", "content": row["text"]}, {"role": "assistant", "content": "ignored"}],
                "teacher": {"answer_chars": 7}}) + "\n")
    args = SimpleNamespace(dataset_name=str(stage1), text_field="text", heldout_fraction=0.2, split_seed=0,
                           max_train_rows=None, messages_field="messages", dataset_split="train")
    queries, note = training_queries(args)
    assert "teacher answers are ignored" in note
    assert [q["text"] for q in queries.rows] == [r["text"] for r in rows if split_of(r) == "train"]
    assert queries.counts == {"rows_in_file": 400, "heldout_rows_dropped": 70, "rows_used": 330}
    assert all("messages" not in q for q in queries.rows)


def test_a_missing_prompt_file_or_no_training_rows_fail_with_the_file_named(tmp_path):
    from types import SimpleNamespace

    from distill.opd_setup import task_prompt, training_queries
    from distill.records import InputError

    with pytest.raises(InputError, match="nope.md: no such file"):
        task_prompt(str(tmp_path / "nope.md"))
    only_heldout = tmp_path / "q.jsonl"
    only_heldout.write_text(json.dumps({"id": "a", "text": "x", "group": "g"}) + "\n")
    args = SimpleNamespace(dataset_name=str(only_heldout), text_field="text", heldout_fraction=1.0, split_seed=0,
                           max_train_rows=None, messages_field="messages", dataset_split="train")
    with pytest.raises(InputError, match="no training queries left"):
        training_queries(args)


def test_conversations_reach_the_teacher_behind_the_prompt_and_share_its_cached_prefix(tiny, tmp_path):
    """Conversations as stage 2b's queries, from a file of them and from a stage-1 file of their answers: the
    teacher's input is the prompt, the example turns, then the conversation; a row's own system turn joins the
    prompt's, so the shared (cached) prefix must stop inside the system turn, or that row would be refused."""
    from types import SimpleNamespace

    from distill.opd_setup import training_queries

    _, tokenizer = tiny
    chats = REPO / "example-data" / "in_short_conversations.jsonl"
    args = SimpleNamespace(dataset_name=str(chats), text_field="text", messages_field="messages",
                           dataset_split="train", heldout_fraction=0.2, split_seed=0, max_train_rows=None)
    queries, _ = training_queries(args)
    # held-out groups never train: 48 of the 60 conversations (2 of 10 groups held out)
    assert queries.counts["rows_used"] == 48 and all(row["messages"][-1]["role"] == "user" for row in queries.rows)
    own_system = next(row for row in queries.rows if row["messages"][0]["role"] == "system")
    stage1 = tmp_path / "teacher.jsonl"
    stage1.write_text(json.dumps({**own_system, "messages": own_system["messages"] + [
        {"role": "assistant", "content": "In short: ignored."}], "teacher": {}}) + "\n")
    (from_stage1,) = training_queries(SimpleNamespace(**{**vars(args), "dataset_name": str(stage1)}))[0].rows
    assert from_stage1 == {key: own_system[key] for key in ("id", "group", "text", "messages")}

    prompt = tiny_prompt()
    conversation = own_system["messages"]
    text = teacher_text(tokenizer, prompt, conversation, scoring=True)
    assert text.index(prompt.text) < text.index(conversation[0]["content"]) < text.index("Why is snow white?") < (
        text.index(conversation[-1]["content"]))
    with pytest.raises(ValueError, match="shared tokens"):
        TeacherInputs.build(tokenizer, prompt, [conversation], shared_prefix(tokenizer, prompt))
    prefix = shared_prefix(tokenizer, prompt, [conversation, "What is rain?"])
    inputs = TeacherInputs.build(tokenizer, prompt, [conversation, "What is rain?"], prefix)
    assert all(prefix + suffix == teacher_ids(tokenizer, prompt, query, scoring=True)
               for suffix, query in zip(inputs.suffixes, [conversation, "What is rain?"]))
    # the cost: the example turns leave the cached prefix, which still holds the prompt's system text
    assert "Why is snow white?" in tokenizer.decode(shared_prefix(tokenizer, prompt))
    assert "Why is snow white?" not in tokenizer.decode(prefix) and prompt.text[:40] in tokenizer.decode(prefix)

    # Turns that go around the query template: an earlier user turn (rendered as written, not through the
    # template) and an assistant turn first (a chatbot's greeting). The prefix is the rows' own common prefix.
    templated = dataclasses.replace(prompt, query_template="Text to classify:\n<<<\n{query}\n>>>")
    earlier = [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "In short: hi."},
               {"role": "user", "content": "What is rain?"}]
    greeting = [{"role": "assistant", "content": "Hi! Ask me anything."}, {"role": "user", "content": "What is hail?"}]
    for chat in (earlier, greeting):
        with pytest.raises(ValueError, match="shared tokens"):
            TeacherInputs.build(tokenizer, templated, [chat], shared_prefix(tokenizer, templated))
    queries = [earlier, greeting, "What is snow?"]
    prefix = shared_prefix(tokenizer, templated, queries)
    inputs = TeacherInputs.build(tokenizer, templated, queries, prefix)
    assert all(prefix + suffix == teacher_ids(tokenizer, templated, query, scoring=True)
               for suffix, query in zip(inputs.suffixes, queries))
    assert templated.text[:40] in tokenizer.decode(prefix)  # the system prompt stays in the cached prefix


# ---- the CLI on a tiny student (slow) --------------------------------------------------------------------------


def queries_file(tmp_path):
    path = tmp_path / "queries.jsonl"
    rows = [json.loads(line) for line in (REPO / "example-data" / "general_questions.jsonl").read_text().splitlines()]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows[::10]))  # 40 rows, every group
    return path


def lora_b_norm(adapter) -> float:
    from safetensors.torch import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    return sum(t.abs().sum().item() for name, t in tensors.items() if "lora_B" in name)


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["self", "model"])
def test_the_cli_trains_a_student_against_an_in_process_teacher(tiny_model, tmp_path, teacher):
    out = tmp_path / "opd"
    extra = ["--teacher_model_name_or_path", tiny_model] if teacher == "model" else []
    result = run_main("train_opd_trl.py", "--config", "recipes/opd_cpu.yaml", "--model_name_or_path", tiny_model,
                      "--prompt_file", IN_SHORT, "--dataset_name", queries_file(tmp_path), "--max_steps", 2,
                      "--per_device_train_batch_size", 4, "--max_completion_length", 8, "--learning_rate", 1e-2,
                      "--output_dir", out, "--report_to", "none", *extra)
    record = json.loads((out / "distill_run.json").read_text())
    assert record["status"] == "finished" and record["stage"] == "train_opd_trl"
    assert record["teacher"].startswith("self:" if teacher == "self" else "model:")
    spend = record["teacher_spend"]
    prefix = len(shared_prefix(__import__("transformers").AutoTokenizer.from_pretrained(tiny_model),
                               load_prompt(IN_SHORT)))
    assert spend["prompt_prefix_tokens"] == prefix, "the 2k-token prompt is forwarded once for the run"
    assert spend["teacher_forwards"] == 2 and spend["query_and_answer_tokens"] > 0
    assert record["counts"]["heldout_rows_dropped"] > 0
    assert lora_b_norm(out) > 0, "LoRA B starts at zero: training must have moved it"
    assert "train_opd:" in result.stdout
    # the fingerprint: 8 training queries, each with the student's own greedy answer, scored by the adapter as saved
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from distill.fingerprint import answer_logprobs

    fingerprint = json.loads((out / "fingerprint.json").read_text())
    assert record["fingerprint"]["probes"] == record["fingerprint"]["greedy_probes"] == len(fingerprint["probes"]) == 8
    assert all(probe["source"] == "greedy" and probe["answer"] is not None for probe in fingerprint["probes"])
    assert all(probe["base_logprobs"] != probe["logprobs"] for probe in fingerprint["probes"])  # the adapter moved
    student = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), out)
    student.eval()
    for probe in fingerprint["probes"]:
        assert probe["logprobs"] == pytest.approx(
            answer_logprobs(student, probe["input_ids"], probe["answer_start"], "cpu"), abs=1e-5)


@pytest.mark.slow
def test_the_cli_warm_starts_from_a_stage2_adapter(tiny_model, tmp_path, trained_run):
    sft = trained_run["dir"]  # the session's stage-2 adapter
    out = tmp_path / "opd"
    run_main("train_opd_trl.py", "--config", "recipes/opd_cpu.yaml", "--model_name_or_path", tiny_model,
             "--prompt_file", IN_SHORT, "--dataset_name", queries_file(tmp_path), "--init_adapter", sft,
             "--max_steps", 1, "--per_device_train_batch_size", 4, "--max_completion_length", 8,
             "--output_dir", out, "--report_to", "none")
    from safetensors.torch import load_file

    before, after = (load_file(str(path / "adapter_model.safetensors")) for path in (sft, out))
    assert set(before) == set(after)
    assert any(not torch.equal(before[name], after[name]) for name in before), "on-policy steps moved the adapter"
    assert json.loads((out / "distill_run.json").read_text())["init_adapter"] == str(sft)


def token_code(token_id: int) -> float:
    """A stand-in log-probability that names its token: where it lands in the loss shows which token it scored."""
    return -1.0 - token_id / 10_000


class TokenCodingTeacherClient:
    """TRL's VLLMClient as the trainer uses it (get_sequence_logprobs): per sequence, one entry per token from its
    prompt length on, as vLLM's prompt_logprobs gives them; each value is token_code of the token it scores, less 0.5
    when the sequence does not hold the long prompt (a teacher reads its context: the first step's prompt check asks
    for the same answers after the bare query)."""

    sequences: list = []

    def __init__(self, base_url, connection_timeout=0.0):
        self.base_url = base_url

    def get_sequence_logprobs(self, sequences, prompt_lengths, top_logprobs=1, temperature=1.0, **_):
        type(self).sequences.extend(sequences)
        scored = [[[token_code(token) - (0.0 if start > 500 else 0.5)] for token in sequence[start:]]
                  for sequence, start in zip(sequences, prompt_lengths)]
        token_ids = [[[t] for t in s[p:]] for s, p in zip(sequences, prompt_lengths)]
        return {"logprobs": scored, "logprob_token_ids": token_ids, "actual_logprobs": scored,
                "actual_token_ids": token_ids}


@pytest.mark.slow
def test_server_teacher_scores_land_on_the_student_tokens_they_score(tiny_model, tmp_path, monkeypatch):
    """Queries of different lengths (so the student's prompts are padded to different widths): every completion token
    the loss trains on gets the teacher's score of that very token, and the teacher's sequences carry the prompt.
    (Before the fix, the teacher's scores sat over the student's prompt and the loss trained on nothing.)"""
    import trl.generation.vllm_client
    from trl.experimental.server_distillation import server_distillation_trainer as server

    monkeypatch.setattr(trl.generation.vllm_client, "VLLMClient", TokenCodingTeacherClient)
    monkeypatch.setattr(TokenCodingTeacherClient, "sequences", [])
    seen = []
    original = server.ServerDistillationTrainer._compute_server_sparse_top_1_divergence_loss

    def spy(self, teacher_result, student_log_probs, completion_tokens, labels):
        seen.append((teacher_result["actual_logprobs"].clone(), labels.clone()))
        return original(self, teacher_result=teacher_result, student_log_probs=student_log_probs,
                        completion_tokens=completion_tokens, labels=labels)

    monkeypatch.setattr(server.ServerDistillationTrainer, "_compute_server_sparse_top_1_divergence_loss", spy)
    with socket.socket() as listener:  # something answers the start-up probe; the client itself is the stand-in
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        out = tmp_path / "opd"
        run_main("train_opd_trl.py", "--config", "recipes/opd_cpu.yaml", "--model_name_or_path", tiny_model,
                 "--teacher_server_url", f"http://127.0.0.1:{listener.getsockname()[1]}", "--prompt_file", IN_SHORT,
                 "--teacher_tokenizer_name_or_path", tiny_model,  # the stand-in server answers no /v1/models
                 "--dataset_name", queries_file(tmp_path), "--max_steps", 2, "--per_device_train_batch_size", 4,
                 "--max_completion_length", 8, "--learning_rate", 1e-2, "--output_dir", out, "--report_to", "none")
    assert len(seen) == 2
    for teacher_scores, labels in seen:
        trained = labels != -100
        assert trained.sum() > 0
        expected = torch.tensor([[token_code(int(t)) if keep else 0.0 for t, keep in zip(row, mask)]
                                 for row, mask in zip(labels.tolist(), trained.tolist())])
        assert torch.equal(teacher_scores[trained], expected[trained].to(teacher_scores.dtype))
    from transformers import AutoTokenizer

    prefix = shared_prefix(AutoTokenizer.from_pretrained(tiny_model), load_prompt(IN_SHORT))
    from distill.onpolicy import PROMPT_CHECK_ROWS

    sent = TokenCodingTeacherClient.sequences
    with_prompt = [sequence for sequence in sent if sequence[:len(prefix)] == prefix]
    bare = [sequence for sequence in sent if sequence[:len(prefix)] != prefix]  # the first step's prompt check
    assert len(with_prompt) >= 8 and 0 < len(bare) <= PROMPT_CHECK_ROWS and all(len(s) < len(prefix) for s in bare)
    record = json.loads((out / "distill_run.json").read_text())
    assert record["teacher_checks"]["prompt_effect"]["mean_abs_difference"] == pytest.approx(0.5)
    assert lora_b_norm(out) > 0


def test_held_out_kl_and_drift_measure_what_they_say(tiny):
    """bench/onpolicy.py's columns: kl_to_teacher against a plain forward of each side's whole input (the student
    with its own side of the prompt file, the teacher with the prompt), and drift_from_base zero for the base
    itself and positive once the student's weights move."""
    import dataclasses

    from bench.measures import answer_ids, drift_from_base, kl_to_teacher
    from distill.prompts import StudentSide

    model, tokenizer = tiny
    prompt = dataclasses.replace(tiny_prompt(), student=StudentSide("Be brief.", "Q: {query}"))
    queries, answers = ["Why is the sea salty?", "What is a fox?"], ["In short: rivers.", "In short: a wild dog."]
    got = kl_to_teacher(model, model, tokenizer, prompt, queries, answers)

    reverse = forward = tokens = 0.0
    with torch.no_grad():
        for query, answer in zip(queries, answers):
            completion = answer_ids(tokenizer, answer)
            # By hand, both sides in the final-answer state (the tiny hybrid template: enable_thinking=False).
            teacher_chat = [{"role": "system", "content": prompt.text}]
            for user, assistant in prompt.example_turns:
                teacher_chat += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            teacher_ids = tokenizer.apply_chat_template(teacher_chat + [{"role": "user", "content": query}],
                                                        add_generation_prompt=True, enable_thinking=False,
                                                        tokenize=True, return_dict=True)["input_ids"]
            student_ids = tokenizer.apply_chat_template(
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Q: {query}"}],
                add_generation_prompt=True, enable_thinking=False, tokenize=True, return_dict=True)["input_ids"]
            log_t = torch.log_softmax(model(torch.tensor([teacher_ids + completion])).logits[0], -1)
            log_s = torch.log_softmax(model(torch.tensor([student_ids + completion])).logits[0], -1)
            log_t = log_t[len(teacher_ids) - 1: len(teacher_ids) - 1 + len(completion)]
            log_s = log_s[len(student_ids) - 1: len(student_ids) - 1 + len(completion)]
            reverse += (log_s.exp() * (log_s - log_t)).sum().item()
            forward += (log_t.exp() * (log_t - log_s)).sum().item()
            tokens += len(completion)
    assert got["tokens"] == tokens and reverse > 0 and forward > 0
    assert got["reverse_kl"] == pytest.approx(reverse / tokens, rel=1e-3)
    assert got["forward_kl"] == pytest.approx(forward / tokens, rel=1e-3)
    bare = kl_to_teacher(model, model, tokenizer, tiny_prompt(), queries, answers)
    assert bare["reverse_kl"] != pytest.approx(got["reverse_kl"], rel=1e-3)  # the student side is what it read

    texts = ["Bonjour tout le monde.", "Das ist ein Haus."]
    assert drift_from_base(model, model, tokenizer, texts)["kl_base_to_student"] == pytest.approx(0.0, abs=1e-6)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.lm_head.weight.add_(0.05 * torch.randn_like(moved.lm_head.weight))
    assert drift_from_base(moved, model, tokenizer, texts)["kl_base_to_student"] > 1e-4


def test_a_keep_all_stage1_file_gives_each_query_once(tmp_path):
    """--keep all writes a row per answer (<id>#<k>, query_id <id>); on-policy training samples its own answers,
    so each query trains once, whichever of its rows comes first."""
    from types import SimpleNamespace

    from distill.opd_setup import training_queries

    rows = [{"id": f"q{i}#{k}", "query_id": f"q{i}", "group": "g",
             "messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"A{k}."}],
             "teacher": {"sample": k, "samples_kept": 3}} for i in range(2) for k in range(3)]
    stage1 = tmp_path / "teacher.jsonl"
    stage1.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = SimpleNamespace(dataset_name=str(stage1), text_field="text", messages_field="messages",
                           dataset_split="train", heldout_fraction=0.0, split_seed=0, max_train_rows=None)
    queries, note = training_queries(args)
    assert [row["text"] for row in queries.rows] == ["Question 0?", "Question 1?"]
    assert queries.counts["rows_used"] == 2 and "teacher answers are ignored" in note


def test_a_warm_start_adapter_must_share_the_prompt_files_student_side(tmp_path):
    import dataclasses

    from distill.opd_setup import check_warm_start
    from distill.prompts import StudentSide
    from distill.records import InputError

    adapter = tmp_path / "sft"
    adapter.mkdir()
    with pytest.raises(InputError, match="no adapter_config.json"):
        check_warm_start(str(adapter), tiny_prompt())
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "distill_run.json").write_text(json.dumps({"student": {"system_prompt": None, "template": "{query}"}}))
    check_warm_start(str(adapter), tiny_prompt())  # the bare student on both sides
    with pytest.raises(ValueError, match="student_system_prompt / student_template"):
        check_warm_start(str(adapter), dataclasses.replace(tiny_prompt(), student=StudentSide("Be brief.")))


# ---- the teacher reads its prompt in the settings users run (issue 27) -----------------------------------------


def build_opd_trainer(model, prompt_file, output_dir, *extra, prompt=None):
    """Stage 2b's trainer as train_opd_trl.main builds it, in this process (no training yet)."""
    import train_opd_trl
    from distill import opd_setup
    from distill.trainer_setup import lora_config

    script_args, training_args, model_args = train_opd_trl.parse_args([
        "--config", "recipes/opd_cpu.yaml", "--model_name_or_path", str(model), "--prompt_file", str(prompt_file),
        "--dataset_name", str(REPO / "example-data" / "general_questions.jsonl"), "--output_dir", str(output_dir),
        "--report_to", "none", "--max_completion_length", "8", "--per_device_train_batch_size", "4", *map(str, extra)])
    prompt = prompt or opd_setup.task_prompt(script_args.prompt_file)
    opd_setup.check_settings(script_args, training_args, model_args)
    queries, _ = opd_setup.training_queries(script_args)
    tokenizers = opd_setup.check_teacher(script_args, training_args, model_args)
    peft = lora_config(model_args, script_args.train_router, training_args.trust_remote_code)
    return opd_setup.build_trainer(script_args, training_args, model_args, peft, prompt, queries.rows[:8], tokenizers)


def reverse_kl_by_hand(trainer, batch) -> float:
    """Mean per-token KL(student || teacher) over the batch's completion tokens, from plain eval-mode forwards of
    whole inputs: the student's prompt + completion, the teacher's prompt-holding input + completion (adapter off)."""
    from distill.render import teacher_ids

    model = trainer.model
    model.eval()
    total = tokens = 0.0
    with torch.no_grad():
        for i, row in enumerate(trainer.train_dataset.select(range(len(batch["completion_ids"])))):
            prompt = [t for t, keep in zip(batch["prompt_ids"][i].tolist(), batch["prompt_mask"][i].tolist()) if keep]
            answer = [t for t, keep in zip(batch["completion_ids"][i].tolist(), batch["completion_mask"][i].tolist())
                      if keep]
            teacher = teacher_ids(trainer.teacher_tokenizer, trainer.task_prompt, row["query"], scoring=True)
            log_s = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1: -1], -1)
            with model.disable_adapter():
                log_t = torch.log_softmax(model(torch.tensor([teacher + answer])).logits[0, len(teacher) - 1: -1], -1)
            total += (log_s.exp() * (log_s - log_t)).sum().item()
            tokens += len(answer)
    model.train()
    return total / tokens


@pytest.mark.parametrize("checkpointing", [True, False])
def test_the_teacher_reads_its_cached_prompt_under_gradient_checkpointing(tiny_model, tmp_path, checkpointing):
    """TRL's DistillationConfig turns gradient checkpointing on, and transformers then drops past_key_values in
    training mode: the self-teacher read each query without its cached prompt (a loss towards the unprompted base,
    no error). The first loss must be the reverse KL to the prompted teacher, computed by hand, with checkpointing on
    as with it off; the run's own checks pass and are kept."""
    trainer = build_opd_trainer(tiny_model, IN_SHORT, tmp_path / "opd", "--gradient_checkpointing", checkpointing)
    assert trainer.args.gradient_checkpointing == checkpointing
    trainer.model.train()
    if checkpointing:  # what Trainer.train does before the first step
        trainer.model.gradient_checkpointing_enable(trainer.args.gradient_checkpointing_kwargs)
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(4)])
    loss = trainer.compute_loss(trainer.model, batch).item()
    assert trainer.model.training, "the student's training mode is restored after the teacher's forward"
    checks = trainer.teacher_checks()
    assert checks["prefix_cache"] == {"prefix_tokens": len(trainer.teacher_prefix),
                                      "cached_tokens": len(trainer.teacher_prefix), "passed": True}
    assert checks["prompt_effect"]["passed"] and checks["prompt_effect"]["rows"] == 4
    assert loss == pytest.approx(reverse_kl_by_hand(trainer, batch), rel=1e-3) and loss > 1e-3


def test_a_cache_built_in_training_mode_under_checkpointing_is_refused(tiny):
    """What the fix prevents, shown at its source: the prefix forwarded in training mode under checkpointing leaves
    an empty cache, and the run stops instead of reading queries without the prompt."""
    from distill.onpolicy import PromptNotRead

    model, tokenizer = tiny
    prompt = tiny_prompt()
    prefix = shared_prefix(tokenizer, prompt)
    suffixes = TeacherInputs.build(tokenizer, prompt, ["What is rain?"], prefix).suffixes
    completion_ids, completion_mask = completion_batch(tokenizer, ["In short: water."])
    model.gradient_checkpointing_enable()
    model.train()
    try:
        with torch.no_grad(), pytest.raises(PromptNotRead, match=f"holds 0 tokens, not the prompt's {len(prefix)}"):
            teacher_hidden_states(model.model, suffixes, completion_ids, completion_mask, prefix, PrefixCache(prefix))
    finally:
        model.gradient_checkpointing_disable()
        model.eval()


def test_a_teacher_that_reads_no_prompt_stops_the_run(tiny_model, tmp_path):
    """A prompt with no system text, no example turns and a bare query template gives the teacher the student's own
    input: the first step's check finds the same log-probabilities with and without the prompt and stops."""
    import dataclasses

    from distill.onpolicy import PromptNotRead
    from distill.prompts import load_prompt

    empty = dataclasses.replace(load_prompt(IN_SHORT), text="", example_turns=(), query_template="{query}")
    trainer = build_opd_trainer(tiny_model, IN_SHORT, tmp_path / "opd", prompt=empty)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(4)])
    with pytest.raises(PromptNotRead, match="not reading its prompt"):
        trainer.compute_loss(trainer.model, batch)


@pytest.mark.parametrize("flags, message", [
    (["--use_peft", "false"], "--use_peft false with the self-teacher"),
    (["--use_liger_kernel", "true"], "--use_liger_kernel"),
])
def test_settings_that_would_skip_the_prompted_teacher_are_refused_before_weights_load(tiny_model, tmp_path, flags,
                                                                                       message):
    result = run_main("train_opd_trl.py", "--config", "recipes/opd_cpu.yaml", "--model_name_or_path", tiny_model,
                      "--prompt_file", IN_SHORT, "--dataset_name", REPO / "example-data" / "general_questions.jsonl",
                      "--output_dir", tmp_path / "out", "--report_to", "none", *flags, check=False)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


class ModelsEndpoint:
    """A stand-in for a vLLM server's GET /v1/models (what the server says it serves), on 127.0.0.1."""

    def __init__(self, root: str):
        import http.server
        import threading

        served = json.dumps({"object": "list", "data": [{"id": "teacher", "root": root}]}).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200 if self.path == "/v1/models" else 404)
                self.end_headers()
                self.wfile.write(served)

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self):
        self.server.shutdown()


def server_teacher_tokenizers(tiny_model, tmp_path, *extra, served=None):
    import train_opd_trl
    from distill import opd_setup

    endpoint = ModelsEndpoint(str(served or tiny_model))
    try:
        script_args, training_args, model_args = train_opd_trl.parse_args([
            "--config", "recipes/opd_cpu.yaml", "--model_name_or_path", str(tiny_model), "--teacher_server_url",
            endpoint.url, "--output_dir", str(tmp_path / "out"), *map(str, extra)])
        return opd_setup.check_teacher(script_args, training_args, model_args)
    finally:
        endpoint.close()


def test_a_server_teacher_is_rendered_with_its_own_tokenizer_and_template(tiny_model, tmp_path):
    """The 8xH100 recipe's teacher is Qwen3-30B-A3B-Thinking-2507 on a server, its student an Instruct-2507 model.
    The teacher's input is rendered with the teacher's own chat template (named by --teacher_tokenizer_name_or_path,
    else the model the server serves); before, it was rendered with the student's and scored the answer where the
    teacher expects to start thinking."""
    from distill.render import teacher_text
    from tests.tiny_model import with_template

    student = with_template(tiny_model, "instruct-2507", tmp_path / "student")
    thinking = with_template(tiny_model, "thinking-2507", tmp_path / "teacher")
    for flags, served in (((), thinking), (("--teacher_tokenizer_name_or_path", thinking), tiny_model)):
        tokenizers = server_teacher_tokenizers(student, tmp_path, *flags, served=served)
        assert tokenizers.teacher.chat_template != tokenizers.student.chat_template
        text = teacher_text(tokenizers.teacher, load_prompt(IN_SHORT), "What is rain?", scoring=True)
        assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_a_server_teachers_tokenizer_with_another_vocabulary_is_refused(tiny_model, tmp_path):
    from distill.records import InputError
    from tests.tiny_model import build_tokenizer

    other = tmp_path / "other"
    build_tokenizer(900).save_pretrained(other)
    with pytest.raises(InputError, match="--teacher_tokenizer_name_or_path .*its tokenizer is not the student's"):
        server_teacher_tokenizers(tiny_model, tmp_path, served=other)
