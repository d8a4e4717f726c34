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


def generative_results(mode, n_passed, chrf, answer_tokens, input_tokens, latency, n=70, ratio=None):
    """A generative evaluate.py results JSON as the generative evaluation writes it, trimmed of what the table
    does not read."""
    cost = {"input_tokens_per_request": input_tokens, "median_latency_seconds": latency}
    if ratio:
        cost["vs_teacher_with_prompt"] = ratio
    return {"task": "generative", "check": {"answer_language": "fr"},
            "check_description": "answer in language 'fr' (lingua)", "mode": mode, "model_path": "models/x",
            "split": "heldout", "test_file": "example-data/general_questions.jsonl", "n": n,
            "pass_rate": n_passed / n, "n_passed": n_passed, "agreement_with_teacher_chrf": chrf,
            "n_with_teacher": n if chrf is not None else 0, "mean_answer_chars": 4.0 * answer_tokens,
            "mean_answer_tokens": answer_tokens, "empty_answers": 0, "failures": [], "cost": cost,
            "examples": [{"id": "gq-0007", "text": "Why is the sky blue?", "answer": f"{mode} answers"}]}


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


def test_generative_table_shows_each_system_pass_rate_and_the_share_of_the_teacher():
    text = generative_table(*french_trio())
    rows, notes = rows_of(text), flat(text)
    assert text.splitlines()[0].split()[:3] == ["answers", "in", "French"]
    base, teacher, student = (rows["base model, no prompt"], rows["teacher + prompt"],
                              rows["distilled student, no prompt"])
    assert base.split()[4:9] == ["0.0%", "12.5", "60.2", "40.0", "500.0"]
    assert teacher.split()[3:8] == ["94.3%", "n/a", "41.0", "1210.0", "900.0"]  # 66/70
    assert student.split()[4:9] == ["90.0%", "48.3", "39.5", "40.0", "300.0"]  # 63/70
    # 63/66 of the teacher's passes: 95.5%, over the 90% goal
    assert "The distilled student reaches 95% of the teacher's pass rate (90.0% vs 94.3%); goal >= 90%: met." in notes
    assert "heldout split of example-data/general_questions.jsonl, n=70 questions" in notes
    assert "pass = answer in language 'fr' (lingua)" in notes
    assert "30x fewer input tokens" in notes and "3.0x faster" in notes


def test_generative_table_ends_with_the_three_answers_to_one_question():
    base, teacher, student = french_trio()
    # The student's first question the base run lacks is skipped: all three answers must be to the same question.
    student["examples"].insert(0, {"id": "gq-0001", "text": "What is a black hole?", "answer": "Un trou noir est..."})
    teacher["examples"][0]["answer"] = "Le ciel est bleu parce que " + "l'air disperse la lumière bleue, " * 5
    lines = generative_table(base, teacher, student).splitlines()[-4:]
    assert lines[0] == "One held-out question (gq-0007): Why is the sky blue?"
    assert lines[1].split() == ["base", "model,", "no", "prompt:", "base", "answers"]
    assert lines[2].startswith("  teacher + prompt:") and lines[2].endswith(" ...") and len(lines[2]) <= 2 + 30 + 1 + 86
    assert lines[3].split()[-2:] == ["student", "answers"]


def test_generative_share_line_says_when_the_goal_is_missed_and_when_it_is_undefined():
    base, teacher, student = french_trio()
    student["pass_rate"] = 0.5
    assert "reaches 53% of the teacher's pass rate (50.0% vs 94.3%); goal >= 90%: not met." in flat(generative_table(
        base, teacher, student))
    teacher["pass_rate"] = 0.0
    assert "the student's share of its pass rate is undefined" in flat(generative_table(base, teacher, student))


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
