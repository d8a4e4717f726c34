"""Owns the numbers of an evaluation (accuracy, agreement, strict and per-rule rates, cost); must not print or log.

Accuracy against gold, agreement with the teacher, the confusion matrix and the baselines, computed one way
for every evaluation. A prediction of None (the output broke the answer contract) is counted as 'unparsed':
it stays in the denominator and gets its own confusion-matrix column.
"""

import statistics
from collections import Counter

UNPARSED = "unparsed"


def _rate(pairs) -> tuple[float | None, int]:
    pairs = list(pairs)
    return (sum(a == b for a, b in pairs) / len(pairs) if pairs else None), len(pairs)


def score(golds: list, preds: list, labels: tuple[str, ...], teacher_labels: list | None = None) -> dict:
    """golds and teacher_labels may hold None where a row has no gold or teacher label; such rows are left out of
    that metric, and the n beside it says how many rows it covers."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    preds_or_unparsed = [p if p is not None else UNPARSED for p in preds]
    accuracy, n_gold = _rate((p, g) for p, g in zip(preds_or_unparsed, golds) if g is not None)
    agreement, n_teacher = _rate((p, t) for p, t in zip(preds_or_unparsed, teacher_labels or []) if t is not None)
    result = {
        "n": len(preds),
        "accuracy_vs_gold": accuracy,
        "n_with_gold": n_gold,
        "agreement_with_teacher": agreement,
        "n_with_teacher": n_teacher,
        "parse_rate": sum(p is not None for p in preds) / len(preds) if preds else None,
        "unparsed": sum(p is None for p in preds),
    }
    gold_pairs = [(g, p) for g, p in zip(golds, preds_or_unparsed) if g is not None]
    if not gold_pairs:
        return result
    y_true, y_pred = zip(*gold_pairs)
    columns = list(labels) + [UNPARSED]
    matrix = confusion_matrix(y_true, y_pred, labels=columns)[: len(labels)]  # no row is gold 'unparsed'
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(labels), zero_division=0
    )
    counts = Counter(y_true)
    majority_label, majority_count = counts.most_common(1)[0]
    result.update(
        confusion_matrix={"rows_gold": list(labels), "columns_predicted": columns, "matrix": matrix.tolist(),
                          "as_dict": {g: {c: int(v) for c, v in zip(columns, row) if v}
                                      for g, row in zip(labels, matrix)}},
        per_label={
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s),
                    "accuracy": float(r)}  # share of this label's rows predicted right
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
        macro_f1=float(sum(f1) / len(f1)),
        baselines={
            "majority_class": {"label": majority_label, "accuracy": majority_count / len(y_true)},
            "chance": {"accuracy": 1 / len(labels)},
        },
    )
    return result


def worst_labels(result: dict, examples: list[dict], k: int = 3, per_label: int = 3) -> list[dict]:
    """The k labels with the lowest F1 among those present, each with a few misclassified examples."""
    present = [(label, s) for label, s in result.get("per_label", {}).items() if s["support"]]
    worst = sorted(present, key=lambda item: item[1]["f1"])[:k]
    return [
        {
            "label": label,
            **stats,
            "errors": [{"id": e["id"], "text": e["text"], "predicted": e["prediction"]}
                       for e in examples if e["gold"] == label and e["prediction"] != label][:per_label],
        }
        for label, stats in worst
    ]


def lingua_predictions(texts: list[str], labels: tuple[str, ...], other: str = "ot") -> list[str]:
    """The classical baseline: lingua over all its languages, mapped to our labels; a language outside the label
    set, or no detection at all (numbers, code, URLs), maps to `other`."""
    from lingua import LanguageDetectorBuilder

    detector = LanguageDetectorBuilder.from_all_languages().build()
    predictions = []
    for language in detector.detect_languages_in_parallel_of(texts):
        code = language.iso_code_639_1.name.lower() if language else None
        predictions.append(code if code in labels else other)
    return predictions


# ---- generative tasks: the prompt's check, and closeness to the teacher's answer ----------------------------------


def sentence_chrf(hypothesis: str, reference: str) -> float:
    """sacrebleu's sentence-level chrF (0-100) of one answer against one reference answer."""
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(hypothesis, [reference]).score


def strict_verdicts(prompt, questions: list[str], answers: list[str], contract_reasons: list[str],
                  teacher_answers: list[str | None]) -> list[dict]:
    """Per answer: whether the prompt's check passes, why the answer is no answer ("ok" when it is one: the output's
    contract reason, e.g. cut_at_max_tokens, else distill/checks.py's echo / loop / off_topic), the strict verdict
    (check passed and an answer), chrF against the teacher's answer (None without one), and {rule id: passed} for
    each verifiable rule of the prompt, on the answer ("rules") and on the teacher's answer ("teacher_rules")."""
    from distill.checks import non_answer_reason, passes_each
    from distill.rules import verdicts as rule_verdicts

    own_rules = rule_verdicts(prompt.rules, answers)
    known = [i for i, reference in enumerate(teacher_answers) if reference is not None]
    teacher_rules = dict(zip(known, rule_verdicts(prompt.rules, [teacher_answers[i] for i in known])))
    verdicts = []
    for i, (question, answer, check_passed, reason, reference) in enumerate(zip(
            questions, answers, passes_each(prompt.check, answers), contract_reasons, teacher_answers)):
        if reason == "ok":
            reason = non_answer_reason(prompt, question, answer) or "ok"
        verdicts.append({"passed": check_passed and reason == "ok", "check_passed": check_passed, "reason": reason,
                         "chrf": None if reference is None else round(sentence_chrf(answer, reference), 4),
                         "rules": own_rules[i], "teacher_rules": teacher_rules.get(i)})
    return verdicts


def score_generative(examples: list[dict], max_failures: int = 5) -> dict:
    """The generative summary from scored examples (each with answer, passed, check_passed, reason, answer_tokens and
    maybe chrf), so the summary can always be recomputed from the examples saved beside it. An empty answer stays in
    every denominator: it is an answer that fails. The strict rate is the headline; the check's rate alone is kept
    to compare with results from before strict scoring."""
    n = len(examples)
    chrfs = [e["chrf"] for e in examples if e.get("chrf") is not None]
    return {
        "n": n,
        "strict_pass_rate": sum(e["passed"] for e in examples) / n if n else None,
        "n_strict_passed": sum(e["passed"] for e in examples),
        "check_pass_rate": sum(e["check_passed"] for e in examples) / n if n else None,
        "n_check_passed": sum(e["check_passed"] for e in examples),
        "non_answers": dict(Counter(e["reason"] for e in examples if e["reason"] != "ok")),
        "non_answer_rate": sum(e["reason"] != "ok" for e in examples) / n if n else None,
        "agreement_with_teacher_chrf": sum(chrfs) / len(chrfs) if chrfs else None,
        "n_with_teacher": len(chrfs),
        "mean_answer_chars": sum(len(e["answer"]) for e in examples) / n if n else None,
        "mean_answer_tokens": sum(e["answer_tokens"] for e in examples) / n if n else None,
        "empty_answers": sum(not e["answer"] for e in examples),
        "failures": [{"id": e["id"], "text": e["text"], "answer": e["answer"], "reason": e["reason"],
                      "check_passed": e["check_passed"]} for e in examples if not e["passed"]][:max_failures],
    }


def score_rules(rules, examples: list[dict], broken_per_rule: int = 3) -> dict:
    """Per rule of the prompt: its pass rate, and with the teacher's verdicts on the same rows (examples'
    "teacher_rules") the teacher's rate, the transfer (this model's rate / the teacher's) and the answers the rule
    lost (the teacher's answer passes, this one fails) and gained; a few broken answers each. Then the all-rules
    pass rate: an answer passes when it passes every rule scored (IFEval's prompt-level strict). A judged rule is
    scored only once examples carry its verdicts (--judge_model); a verdict of None (the judge's output broke its
    contract) leaves the answer out of that rule's rate and fails it in the all-rules rate."""
    per_rule = {}
    for rule in rules:
        scored = [e for e in examples if e.get("rules", {}).get(rule.id) is not None]
        if not scored:
            continue
        passed = sum(e["rules"][rule.id] for e in scored)
        entry = {"text": rule.text, "verify": rule.verify, "judge": rule.judge,
                 "baseline_follows": rule.baseline_follows, "n": len(scored), "n_passed": passed,
                 "pass_rate": passed / len(scored),
                 "broken": [{"id": e["id"], "text": e["text"], "answer": e["answer"]}
                            for e in scored if not e["rules"][rule.id]][:broken_per_rule]}
        pairs = [(e["teacher_rules"][rule.id], e["rules"][rule.id]) for e in scored
                 if rule.id in (e.get("teacher_rules") or {})]
        if pairs:
            teacher_rate = sum(t for t, _ in pairs) / len(pairs)
            own_rate = sum(own for _, own in pairs) / len(pairs)
            entry.update(n_with_teacher=len(pairs), teacher_pass_rate=teacher_rate,
                         transfer=own_rate / teacher_rate if teacher_rate else None,
                         lost=sum(t and not own for t, own in pairs), gained=sum(own and not t for t, own in pairs))
        per_rule[rule.id] = entry
    if not per_rule:
        return {}
    all_passed = [all(e.get("rules", {}).get(rule_id) is True for rule_id in per_rule) for e in examples]
    return {"rules": per_rule, "all_rules_pass_rate": sum(all_passed) / len(examples) if examples else None,
            "n_all_rules_passed": sum(all_passed)}


# ---- cost ---------------------------------------------------------------------------------------------------


def cost(prompt_ids, generation, generative: bool) -> dict:
    """What answering cost: input tokens per request, median latency at batch 1, batched throughput (and, for free
    text, output tokens per request). `generation` is a distill.serving.Generation."""
    figures = {
        "input_tokens_per_request": statistics.mean(len(ids) for ids in prompt_ids),
        "median_latency_seconds": statistics.median(generation.latencies) if generation.latencies else None,
        "latency_requests": len(generation.latencies),
        "batch_seconds": round(generation.seconds, 2),
        "requests_per_second": round(len(prompt_ids) / generation.seconds, 2),
    }
    if generative:  # free text: what the model writes (reasoning included) costs as much as what it reads
        figures["output_tokens_per_request"] = statistics.mean(generation.output_tokens)
    return figures


def cost_ratio(teacher_cost: dict, student: dict) -> dict:
    """How many times cheaper the student without the prompt is than the teacher with it."""
    ratio = {"input_tokens": teacher_cost["input_tokens_per_request"] / student["input_tokens_per_request"]}
    if teacher_cost.get("median_latency_seconds") and student.get("median_latency_seconds"):
        ratio["median_latency"] = teacher_cost["median_latency_seconds"] / student["median_latency_seconds"]
    return ratio
