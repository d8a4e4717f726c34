"""Owns a judge model's yes/no verdicts on generative answers; must not score by rules (rules.py, checks.py).

A judge model grades generative answers: does each one respond to its question and follow the prompt's rules?

    verdicts = judge_answers(llm, tokenizer, task_prompt, questions, answers, params)   # [True, False, None, ...]

The judge is a label task (prompts/judge.md, labels yes/no) whose query is a question and an answer, with the task's
`judge_rubric` (its front matter) written into the judge's system prompt. It runs through the one teacher path
(distill.teacher: rendering, the model's sampling defaults, the answer constrained to the labels, parsing), so a
thinking judge reasons first and is read only from its final answer. A judge output that breaks the contract gives
None, counted apart. With a real judge this grades meaning; with the embedded 135M model it only proves the plumbing.
"""

import dataclasses
from pathlib import Path

from distill import engine
from distill.prompts import TaskPrompt, load_prompt

JUDGE_PROMPT = Path(__file__).resolve().parent.parent / "prompts" / "judge.md"
DEFAULT_RUBRIC = "it is a complete, on-topic answer."


def judge_prompt(task: TaskPrompt, path: str | Path = JUDGE_PROMPT) -> TaskPrompt:
    judge = load_prompt(path)
    return dataclasses.replace(judge, text=judge.text.replace("{rubric}", task.judge_rubric or DEFAULT_RUBRIC))


def judge_query(question: str, answer: str) -> str:
    return f"Question:\n<<<\n{question}\n>>>\n\nAnswer:\n<<<\n{answer or '(no answer)'}\n>>>"


def judge_answers(llm, tokenizer, task: TaskPrompt, questions: list[str], answers: list[str], params) -> list:
    """True (yes), False (no) or None (the judge's output broke the contract) per answer, in order."""
    from distill.teacher import Teacher, VllmEngine, stream

    judge = Teacher(tokenizer, judge_prompt(task), llm.model_config.max_model_len, constrain_labels=True)
    rows = [{"id": str(i), "text": judge_query(q, a)} for i, (q, a) in enumerate(zip(questions, answers))]
    vllm_engine = VllmEngine(llm)
    verdicts = {a.row["id"]: a.answer for a in stream(vllm_engine, judge, rows, params,
                                                      max_in_flight=vllm_engine.max_num_seqs)}
    return [None if verdicts[row["id"]] is None else verdicts[row["id"]] == "yes" for row in rows]


def agreement(judged: list, strict: list[bool]) -> dict:
    """The judged pass rate, and how often the judge and the rule-based strict pass agree (on answers it judged)."""
    pairs = [(j, s) for j, s in zip(judged, strict) if j is not None]
    n = len(pairs)
    return {
        "judged_pass_rate": sum(j for j, _ in pairs) / n if n else None,
        "n_judged": n,
        "judge_unparsed": len(judged) - n,
        "agreement_with_strict": sum(j == s for j, s in pairs) / n if n else None,
        "judge_yes_strict_no": sum(j and not s for j, s in pairs),
        "judge_no_strict_yes": sum(s and not j for j, s in pairs),
    }


def judge_examples(args, prompt, examples: list[dict]) -> dict:
    """--judge_model: each answer graded by the judge (examples gain "judge": True/False/None), the judged pass
    rate and its agreement with the strict pass; then each judged rule of the prompt, its rubric in place of the
    judge_rubric (examples' "rules" gain its verdicts), and the per-rule scores again with them."""
    import gc

    from transformers import AutoTokenizer

    from distill.metrics import score_rules
    from distill.sampling import sampling_params

    gc.collect()
    llm = engine.build_llm(args, model=args.judge_model)
    tokenizer = AutoTokenizer.from_pretrained(args.judge_model, trust_remote_code=args.trust_remote_code)
    params = sampling_params(llm.get_default_sampling_params(), {"temperature": 0.0}, max_tokens=args.judge_max_tokens)
    verdicts = judge_answers(llm, tokenizer, prompt, [e["text"] for e in examples], [e["answer"] for e in examples],
                             params)
    for example, verdict in zip(examples, verdicts):
        example["judge"] = verdict
    questions, answers = [e["text"] for e in examples], [e["answer"] for e in examples]
    for rule in prompt.rules:
        if rule.judge:
            rubric = dataclasses.replace(prompt, judge_rubric=rule.judge)
            for example, verdict in zip(examples, judge_answers(llm, tokenizer, rubric, questions, answers, params)):
                example["rules"][rule.id] = verdict
    return {"judge_model": args.judge_model, **agreement(verdicts, [e["passed"] for e in examples]),
            **score_rules(prompt.rules, examples)}
