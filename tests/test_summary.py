import json

import pytest

from distill.summary import generative_table, label_table, main


def label_results(accuracy, agreement, tokens, latency, n=233, lingua=None, ratio=None):
    cost = {"input_tokens_per_request": tokens, "median_latency_seconds": latency}
    if ratio:
        cost["vs_teacher_with_prompt"] = ratio
    baselines = {"majority_class": {"label": "ot", "accuracy": 0.25}}
    if lingua:
        baselines["lingua"] = lingua
    return {"accuracy_vs_gold": accuracy, "agreement_with_teacher": agreement, "cost": cost, "baselines": baselines,
            "split": "heldout", "test_file": "example-data/language_id.jsonl", "n": n}


def generative_results(mode, n_passed, chrf, answer_tokens, input_tokens, latency, n=70, ratio=None, n_check=None):
    """A generative evaluate.py results JSON as the generative evaluation writes it, trimmed of what the table
    does not read. n_passed answers pass strictly, n_check (default: n_passed + 2) pass the check alone."""
    n_check = n_passed + 2 if n_check is None else n_check
    cost = {"input_tokens_per_request": input_tokens, "median_latency_seconds": latency}
    if ratio:
        cost["vs_teacher_with_prompt"] = ratio
    return {"task": "generative", "check": {"answer_language": "fr"},
            "check_description": "answer in language 'fr' (lingua)", "mode": mode, "model_path": "models/x",
            "split": "heldout", "test_file": "example-data/general_questions.jsonl", "n": n,
            "strict_pass_rate": n_passed / n, "n_strict_passed": n_passed, "check_pass_rate": n_check / n,
            "n_check_passed": n_check, "non_answers": {"echo": n_check - n_passed} if n_check > n_passed else {},
            "agreement_with_teacher_chrf": chrf,
            "n_with_teacher": n if chrf is not None else 0, "mean_answer_chars": 4.0 * answer_tokens,
            "mean_answer_tokens": answer_tokens, "empty_answers": 0, "failures": [], "cost": cost,
            "examples": [{"id": f"gq-{i:04d}", "text": f"Question {i}?", "answer": f"{mode} answers {i}",
                          "passed": i % 2 == 0, "reason": "ok" if i % 3 else "echo"} for i in range(8)]}


def rows_of(text: str) -> dict[str, str]:
    return {line[:28].strip(): line for line in text.splitlines()}


def flat(text: str) -> str:
    """The notes under a table are wrapped; their sentences are checked with the line breaks undone."""
    return " ".join(text.split())


def french_trio():
    base = generative_results("base", 0, 12.5, 60.2, 40.0, 0.5)
    teacher = generative_results("teacher", 66, None, 41.0, 1210.0, 0.9)
    student = generative_results("student", 63, 48.31, 39.5, 40.0, 0.3,
                                 ratio={"input_tokens": 30.25, "median_latency": 3.0})
    return base, teacher, student


def test_generative_table_shows_each_system_strict_and_check_rates_and_the_share_of_the_teacher():
    text = generative_table(*french_trio())
    rows, notes = rows_of(text), flat(text)
    assert text.splitlines()[0].split()[:2] == ["strict", "pass"] and "check alone: answers in French" in text
    base, teacher, student = (rows["base model, no prompt"], rows["teacher + prompt"],
                              rows["distilled student, no prompt"])
    assert base.split()[4:10] == ["0.0%", "2.9%", "12.5", "60.2", "40.0", "500.0"]  # 2/70 pass the check alone
    assert teacher.split()[3:9] == ["94.3%", "97.1%", "n/a", "41.0", "1210.0", "900.0"]  # 66/70, 68/70
    assert student.split()[4:10] == ["90.0%", "92.9%", "48.3", "39.5", "40.0", "300.0"]  # 63/70, 65/70
    # 63/66 of the teacher's strict passes: 95.5%, over the 90% goal
    assert ("The distilled student reaches 95% of the teacher's strict pass rate (90.0% vs 94.3%); goal >= 90%: met."
            in notes)
    assert "heldout split of example-data/general_questions.jsonl, n=70 questions" in notes
    assert "Strict pass = answer in language 'fr' (lingua), and the answer is an answer" in notes
    assert "Not answers: base model, no prompt echo 2; teacher + prompt echo 2;" in notes
    assert "30x fewer input tokens" in notes and "3.0x faster" in notes


def test_generative_table_ends_with_five_seeded_questions_and_every_models_answer():
    base, teacher, student = french_trio()
    # A question the base run lacks is never drawn: all answers shown are to the same question.
    student["examples"].append({"id": "gq-0100", "text": "What is a black hole?", "answer": "Un trou noir est...",
                                "passed": True, "reason": "ok"})
    teacher["examples"][0]["answer"] = "Le ciel est bleu parce que " + "l'air disperse la lumière bleue, " * 5
    lines = generative_table(base, teacher, student).splitlines()
    first = lines.index("5 held-out questions drawn with seed 0 (✓ strict pass, ✗ with the reason):")
    shown = lines[first + 1:]
    assert len(shown) == 5 * 4
    drawn = [line.split(":")[0].strip() for line in shown[0::4]]
    import random

    assert drawn == random.Random(0).sample([f"gq-{i:04d}" for i in range(8)], 5)  # seeded, not picked
    for question, (b, t, s) in zip(drawn, zip(shown[1::4], shown[2::4], shown[3::4])):
        i = int(question[3:])
        verdict = "✓" if i % 2 == 0 else ("✗ echo" if i % 3 == 0 else "✗ check failed")
        assert b.split(":")[0].strip() == "base model, no prompt" and f"base answers {i}" in b and verdict in b
        assert t.strip().startswith("teacher + prompt:") and len(t) <= 4 + 30 + 1 + 16 + 1 + 70
        assert s.strip().endswith(f"student answers {i}")
    assert "gq-0100" not in "\n".join(shown)


def test_generative_share_line_says_when_the_goal_is_missed_and_when_it_is_undefined():
    base, teacher, student = french_trio()
    student["strict_pass_rate"] = 0.5
    assert "reaches 53% of the teacher's strict pass rate (50.0% vs 94.3%); goal >= 90%: not met." in flat(
        generative_table(base, teacher, student))
    teacher["strict_pass_rate"] = 0.0
    assert "the student's share of its strict pass rate is undefined" in flat(generative_table(base, teacher, student))


def test_the_rule_goal_counts_only_rules_the_base_does_not_follow():
    base, teacher, student = french_trio()
    on_policy = generative_results("on_policy", 64, 50.0, 39.0, 40.0, 0.3)
    rates = {"teacher": (0.8, 0.5, 1.0), "student": (0.76, 0.3, 1.0), "on_policy": (0.8, 0.48, 0.2)}
    for results in (teacher, student, on_policy):
        results["rules"] = {rule_id: {"pass_rate": rate, "baseline_follows": rule_id == "english"}
                            for rule_id, rate in zip(("check", "no_commas", "english"), rates[results["mode"]])}
    text = flat(generative_table(base, teacher, student, {"SFT, then on-policy": on_policy}))
    # english is marked baseline_follows: the on-policy student's 20% there does not count against the goal
    assert ("Distilled student, no prompt: on each rule the base does not follow, check 95%, no_commas 60% of the "
            "teacher's pass rate (goal >= 90% on each): not met (no_commas).") in text
    assert "SFT, then on-policy: on each rule the base does not follow, check 100%, no_commas 96% of the" in text
    assert "(goal >= 90% on each): met." in text


def test_label_table_has_one_row_per_system_with_each_number_and_what_it_shows():
    teacher = label_results(0.06, None, 2400.0, 0.9)
    student = label_results(0.07, 0.9, 60.0, 0.05, lingua={"accuracy": 0.95, "agreement_with_teacher": 0.05},
                            ratio={"input_tokens": 40.0, "median_latency": 18.0})
    gold = label_results(0.8, 0.1, 60.0, 0.05)
    text = label_table(teacher, student, gold)
    rows = rows_of(text)
    assert "6.0%" in rows["teacher + prompt"] and "2400.0" in rows["teacher + prompt"]
    assert "90.0%" in rows["distilled student, no prompt"] and "50.0 ms" in rows["distilled student, no prompt"]
    assert rows["distilled student, no prompt"].endswith("copies its teacher (agreement)")
    assert "80.0%" in rows["student on gold labels"]
    assert rows["student on gold labels"].endswith("the student can learn the task")
    assert "95.0%" in rows["lingua (classical baseline)"]
    assert "student on gold labels" not in rows_of(label_table(teacher, student))  # the demo's default
    assert "25.0%" in rows["majority class"]
    assert "n=233 rows no student trained on;" in flat(text)
    assert "40x fewer input tokens" in flat(text) and "18.0x faster" in flat(text)


def test_label_table_says_when_the_teacher_was_scored_on_fewer_rows():
    teacher = label_results(0.06, None, 2400.0, 0.9, n=120)
    student = label_results(0.07, 0.9, 60.0, 0.05)
    assert "n=233 rows no student trained on (the teacher: the first 120 of them);" in flat(label_table(
        teacher, student, label_results(0.8, 0.1, 60.0, 0.05)))


def test_a_student_that_timed_slower_than_its_teacher_is_called_slower():
    student = label_results(0.07, 0.9, 60.0, 0.2, ratio={"input_tokens": 32.0, "median_latency": 0.25})
    text = flat(label_table(label_results(0.06, None, 2400.0, 0.05), student, label_results(0.8, 0.1, 60.0, 0.2)))
    assert "32x fewer input tokens per request but answers 4.0x slower (median, batch 1)." in text


def write(tmp_path, name, results) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(results))
    return str(path)


def test_cli_detects_the_task_from_the_results(tmp_path, capsys):
    base, teacher, student = french_trio()
    main(["--base", write(tmp_path, "b.json", base), "--teacher", write(tmp_path, "t.json", teacher),
          "--student", write(tmp_path, "s.json", student)])
    assert "answers in French" in capsys.readouterr().out
    labels = [label_results(0.06, None, 2400.0, 0.9), label_results(0.07, 0.9, 60.0, 0.05),
              label_results(0.8, 0.1, 60.0, 0.05)]
    main(["--teacher", write(tmp_path, "lt.json", labels[0]), "--student", write(tmp_path, "ls.json", labels[1]),
          "--gold_student", write(tmp_path, "lg.json", labels[2])])
    assert "acc vs gold" in capsys.readouterr().out


def test_cli_refuses_missing_files_for_the_task_and_results_from_different_rows(tmp_path, capsys):
    base, teacher, student = french_trio()
    paths = {name: write(tmp_path, f"{name}.json", r) for name, r in [("b", base), ("t", teacher), ("s", student)]}
    with pytest.raises(SystemExit):
        main(["--teacher", paths["t"], "--student", paths["s"]])
    assert "give --base" in capsys.readouterr().err
    student["split"] = "train"
    with pytest.raises(SystemExit):
        main(["--base", paths["b"], "--teacher", paths["t"], "--student", write(tmp_path, "s2.json", student)])
    assert "do not share one split" in capsys.readouterr().err
