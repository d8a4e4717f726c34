from distill.summary import table


def results(accuracy, agreement, tokens, latency, lingua=None, ratio=None):
    cost = {"input_tokens_per_request": tokens, "median_latency_seconds": latency}
    if ratio:
        cost["vs_teacher_with_prompt"] = ratio
    baselines = {"majority_class": {"label": "ot", "accuracy": 0.25}}
    if lingua:
        baselines["lingua"] = lingua
    return {"accuracy_vs_gold": accuracy, "agreement_with_teacher": agreement, "cost": cost, "baselines": baselines,
            "split": "heldout", "test_file": "example-data/language_id.jsonl", "n": 233}


def test_table_has_one_row_per_system_with_each_number():
    teacher = results(0.06, None, 2400.0, 0.9)
    student = results(0.07, 0.9, 60.0, 0.05, lingua={"accuracy": 0.95, "agreement_with_teacher": 0.05},
                      ratio={"input_tokens": 40.0, "median_latency": 18.0})
    gold = results(0.8, 0.1, 60.0, 0.05)
    text = table(teacher, student, gold)
    rows = {line[:30].strip(): line for line in text.splitlines()}
    assert "6.0%" in rows["teacher + prompt"] and "2400.0" in rows["teacher + prompt"]
    assert "90.0%" in rows["distilled student, no prompt"] and "50.0 ms" in rows["distilled student, no prompt"]
    assert "80.0%" in rows["student on gold labels"]
    assert "95.0%" in rows["lingua (classical baseline)"]
    assert "25.0%" in rows["majority class"]
    assert "40x fewer input tokens" in text and "18.0x faster" in text
