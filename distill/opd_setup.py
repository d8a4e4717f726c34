"""Stage 2b's inputs and checks, all before any weights load, and the trainer they assemble (train_opd_trl.py).

    prompt = task_prompt("prompts/in_short.md")                      # a bad prompt file fails here
    queries, note = training_queries(script_args)                    # train side of the split only
    tokenizers = check_teacher(script_args, training_args, model_args)   # tokenizer match / server reachable
    trainer = build_trainer(script_args, training_args, model_args, peft_config, prompt, queries.rows, tokenizers)
"""

import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from distill.prompts import load_prompt, student_messages
from distill.records import InputError, read_jsonl, read_queries
from distill.splits import select

SERVER_PROBE_SECONDS = 3.0


def task_prompt(path: str):
    if not Path(path).exists():
        raise InputError(f"--prompt_file {path}: no such file")
    return load_prompt(path)


@dataclass
class TrainingQueries:
    rows: list[dict]
    counts: dict = field(default_factory=dict)


def training_queries(script_args) -> tuple[TrainingQueries, str]:
    """The train side of the split, as rows with id, text (the query) and group. A stage-1 JSONL gives its user
    turns: on-policy training learns from the teacher's grades of the student's own answers, not from the answers
    stage 1 wrote, and the note returned says so."""
    path = Path(script_args.dataset_name)
    if not path.exists():
        raise InputError(f"--dataset_name {path}: no such file")
    note = f"queries of {path}"
    if path.suffix == ".jsonl" and first_row_has_messages(path):
        rows = []
        for number, row in enumerate(read_jsonl(path), start=1):
            user = next((m["content"] for m in row.get("messages", []) if m.get("role") == "user"), None)
            if not isinstance(user, str) or not user.strip():
                raise InputError(f"{path}:{number}: a stage-1 row without a user turn")
            rows.append({**{k: v for k, v in row.items() if k not in ("messages", "teacher")}, "text": user})
        note = f"the user turns of the stage-1 file {path}; its teacher answers are ignored"
    else:
        rows = read_queries(str(path), script_args.text_field).rows
    train = select(rows, "train", script_args.heldout_fraction, script_args.split_seed)
    dropped = len(rows) - len(train)
    if script_args.max_train_rows:
        train = train[: script_args.max_train_rows]
    if not train:
        raise InputError(f"{path}: no training queries left after the held-out split ({dropped} held out)")
    return TrainingQueries(train, {"rows_in_file": len(rows), "heldout_rows_dropped": dropped,
                                   "rows_used": len(train)}), note


def first_row_has_messages(path: Path) -> bool:
    with open(path, encoding="utf-8-sig") as handle:
        for line in handle:
            if line.strip():
                try:
                    return "messages" in json.loads(line)
                except json.JSONDecodeError:
                    raise InputError(f"{path}:1: malformed JSON") from None
    return False


@dataclass
class Tokenizers:
    student: object
    teacher: object  # the student's, for the self-teacher and a server (whose tokenizer is checked the same way)


def check_teacher(script_args, training_args, model_args) -> Tokenizers:
    """The student's tokenizer, and the teacher's: it must be the same vocabulary (the loss compares distributions
    token by token), checked from the tokenizer files alone. A server must answer a TCP probe within seconds."""
    from transformers import AutoTokenizer

    student = AutoTokenizer.from_pretrained(model_args.model_name_or_path,
                                            trust_remote_code=training_args.trust_remote_code)
    if script_args.teacher_server_url:
        probe_server(script_args.teacher_server_url)
        return Tokenizers(student, student)
    name = training_args.teacher_model_name_or_path
    if not name:
        return Tokenizers(student, student)
    teacher = AutoTokenizer.from_pretrained(name, trust_remote_code=training_args.trust_remote_code)
    difference = tokenizer_difference(student, teacher)
    if difference:
        raise InputError(f"--teacher_model_name_or_path {name}: its tokenizer is not the student's "
                         f"({model_args.model_name_or_path}): {difference}. On-policy distillation compares the two "
                         f"models' next-token distributions token by token, so they must share one vocabulary")
    return Tokenizers(student, teacher)


def tokenizer_difference(student, teacher) -> str | None:
    ours, theirs = student.get_vocab(), teacher.get_vocab()
    if len(ours) != len(theirs):
        return f"{len(ours)} tokens against {len(theirs)}"
    differing = [token for token, index in ours.items() if theirs.get(token) != index]
    if differing:
        return f"{len(differing)} tokens map to other ids (e.g. {differing[0]!r})"
    if student.eos_token != teacher.eos_token:
        return f"end-of-sequence token {student.eos_token!r} against {teacher.eos_token!r}"
    return None


def probe_server(url: str) -> None:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InputError(f"--teacher_server_url {url}: expected http://HOST:PORT")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=SERVER_PROBE_SECONDS).close()
    except OSError as error:
        raise InputError(f"--teacher_server_url {url}: unreachable ({error}); start it with "
                         f"`vllm serve MODEL --max-logprobs K --port {port}`") from None


def probe_server_in(argv: list[str]) -> None:
    """--teacher_server_url (or --teacher-server-url, =value or a separate value) probed straight from the command
    line, before the heavy imports that parsing it properly needs."""
    for i, arg in enumerate(argv):
        name, _, value = arg.partition("=")
        if name.replace("-", "_") == "__teacher_server_url":
            value = value or (argv[i + 1] if i + 1 < len(argv) else "")
            if value:
                probe_server(value)


def adapter_config(adapter_dir: str | None):
    if not adapter_dir:
        return None
    from peft import LoraConfig

    if not (Path(adapter_dir) / "adapter_config.json").exists():
        raise InputError(f"--init_adapter {adapter_dir}: no adapter_config.json there")
    return LoraConfig.from_pretrained(adapter_dir)


def teacher_config(script_args, training_args):
    """The config of a teacher held in this process besides the student (for the memory plan), else None."""
    name = training_args.teacher_model_name_or_path
    if not name or script_args.teacher_server_url:
        return None
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name, trust_remote_code=training_args.trust_remote_code)


def build_trainer(script_args, training_args, model_args, peft_config, prompt, rows: list[dict],
                  tokenizers: Tokenizers):
    """TRL's DistillationTrainer (in-process teacher) or ServerDistillationTrainer (vLLM server), each with the
    teacher reading the prompt (distill/onpolicy.py). The dataset is TRL's conversational "prompt" (the student's
    [user: query], no prompt) and our "query", which the teacher's input is built from."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from distill.onpolicy import in_process_trainer_class, server_trainer_class

    dataset = Dataset.from_list([{"prompt": student_messages(row["text"]), "query": row["text"]} for row in rows])
    dtype = getattr(torch, model_args.dtype) if model_args.dtype not in (None, "auto") else "auto"
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=dtype,
                                                 trust_remote_code=training_args.trust_remote_code)
    if script_args.init_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, script_args.init_adapter, is_trainable=True)
    kwargs = dict(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizers.student,
                  peft_config=peft_config)
    if script_args.teacher_server_url:
        from dataclasses import fields

        from trl import DistillationConfig
        from trl.experimental.server_distillation import ServerDistillationConfig

        # The same settings, plus the server: loss_top_k 1 is what TRL's server path supports with beta > 0.
        settings = {f.name: getattr(training_args, f.name) for f in fields(DistillationConfig) if f.init}
        server_args = ServerDistillationConfig(**settings, teacher_model_server_url=script_args.teacher_server_url,
                                               loss_top_k=1)
        trainer = server_trainer_class()(**{**kwargs, "args": server_args})
        trainer.setup_teacher(prompt, tokenizers.teacher, split_prefix=True, cache=False)
        return trainer
    teacher = None
    if training_args.teacher_model_name_or_path:
        teacher = AutoModelForCausalLM.from_pretrained(training_args.teacher_model_name_or_path, dtype=dtype,
                                                       trust_remote_code=training_args.trust_remote_code)
        teacher.requires_grad_(False)
    trainer = in_process_trainer_class()(teacher_model=teacher, **kwargs)
    trainer.setup_teacher(prompt, tokenizers.teacher, split_prefix=script_args.prompt_cache,
                          cache=script_args.prompt_cache)
    return trainer
