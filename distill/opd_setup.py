"""Owns stage 2b's inputs, checks and trainer before any weights load; must not parse flags or write run files.

Stage 2b's inputs and checks, all before any weights load, and the trainer they assemble (train_opd_trl.py).

    prompt = task_prompt("prompts/in_short.md")                      # a bad prompt file fails here
    check_settings(script_args, training_args, model_args)           # settings that would skip our teacher
    queries, note = training_queries(script_args)                    # train side of the split only
    tokenizers = check_teacher(script_args, training_args, model_args)   # tokenizer match / server reachable
    trainer = build_trainer(script_args, training_args, model_args, peft_config, prompt, queries.rows, tokenizers)
"""

import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from distill.prompts import load_prompt
from distill.records import InputError, query_id, read_jsonl, read_queries
from distill.render import (
    conversation,
    fit_system,
    merges_system,
    query_of,
    rendering_record,
    student_messages,
    takes_system_role,
)
from distill.splits import select
from distill.training import query_and_answer

SERVER_PROBE_SECONDS = 3.0


def task_prompt(path: str):
    """The prompt the teacher reads: refused without system text and example turns (the teacher would be the base
    model, unprompted), a note with example turns alone."""
    prompt = load_prompt(path)  # an InputError naming the flag if there is no such file
    if not prompt.text and not prompt.example_turns:
        raise InputError(f"--prompt_file {path}: no system text below the front matter and no example_turns, so the "
                         f"teacher would read only the query (in its query_template): the base model unprompted, "
                         f"nothing to distill. Write the prompt below the front matter")
    if not prompt.text:
        print(f"train_opd: note: --prompt_file {path} has no system text below its front matter; the teacher reads "
              f"its {len(prompt.example_turns)} example turns only")
    return prompt


@dataclass
class TrainingQueries:
    rows: list[dict]
    counts: dict = field(default_factory=dict)


def training_queries(script_args) -> tuple[TrainingQueries, str]:
    """The train side of the split, as rows with id, text (the query), group, and a conversation's turns. A stage-1
    JSONL gives its queries, the turns before each answer: on-policy training learns from the teacher's grades of the
    student's own answers, not from the answers stage 1 wrote, and the note returned says so."""
    path = Path(script_args.dataset_name)
    note = f"queries of {path}"
    if path.suffix == ".jsonl" and path.is_file() and is_stage1_file(path):
        rows, seen = [], set()
        for number, row in enumerate(read_jsonl(path), start=1):
            if query_id(row) not in seen:  # --keep all wrote a row per answer: the query trains once
                seen.add(query_id(row))
                rows.append(stage1_query(row, f"{path}:{number}"))
        note = f"the user turns of the stage-1 file {path}; its teacher answers are ignored"
    else:
        rows = read_queries(str(path), script_args.text_field, script_args.dataset_split,
                            script_args.messages_field).rows
    if not rows:
        raise InputError(f"{path}: empty, no queries to train on; give queries or a stage-1 output (--dataset_name)")
    train = select(rows, "train", script_args.heldout_fraction, script_args.split_seed)
    dropped = len(rows) - len(train)
    if script_args.max_train_rows:
        train = train[: script_args.max_train_rows]
    if not train:
        raise InputError(f"{path}: no training queries left after the held-out split ({dropped} held out)")
    return TrainingQueries(train, {"rows_in_file": len(rows), "heldout_rows_dropped": dropped,
                                   "rows_used": len(train)}), note


def stage1_query(row: dict, where: str) -> dict:
    """A stage-1 row as a query row: its turns before the answer (a lone user turn as "text"), its other columns."""
    try:
        query = query_and_answer(row, None)[0]
    except (KeyError, TypeError, ValueError, IndexError):
        query = None
    text = query and conversation(query)[-1]["content"]
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: a stage-1 row without a user turn")
    rest = {k: v for k, v in row.items() if k not in ("messages", "teacher")}
    return {**rest, "text": text, **({"messages": query} if isinstance(query, list) else {})}


def is_stage1_file(path: Path) -> bool:
    """A stage-1 file's rows end in the teacher's answer; a file of conversations to answer ends in a user turn."""
    with open(path, encoding="utf-8-sig") as handle:
        for line in handle:
            if line.strip():
                try:
                    messages = json.loads(line).get("messages")
                except (json.JSONDecodeError, AttributeError):
                    raise InputError(f"{path}:1: malformed JSON, or not a JSON object") from None
                return isinstance(messages, list) and bool(messages) and messages[-1].get("role") == "assistant"
    return False


def check_settings(script_args, training_args, model_args) -> None:
    """Settings under which our prompted teacher would not run, refused before any weights load: the self-teacher is
    the student's base with its LoRA adapter disabled, so it needs an adapter; Liger's kernels (--use_liger_kernel)
    replace the model's forward and loss with fused ones that never reach our teacher (_compute_loss)."""
    if training_args.use_liger_kernel:
        raise InputError("--use_liger_kernel: fused kernels would bypass the prompted teacher's loss "
                         "(distill/onpolicy.py); stage 2b trains without them")
    self_teacher = not (script_args.teacher_server_url or training_args.teacher_model_name_or_path)
    if self_teacher and not model_args.use_peft and not script_args.init_adapter:
        raise InputError("--use_peft false with the self-teacher: the teacher is the student's base with its LoRA "
                         "adapter disabled, and a full fine-tune has no adapter to disable. Keep LoRA, or name another "
                         "teacher (--teacher_model_name_or_path, --teacher_server_url)")


@dataclass
class Tokenizers:
    student: object
    teacher: object  # the student's for the self-teacher; the teacher's own for another model or a server


def check_teacher(script_args, training_args, model_args) -> Tokenizers:
    """The student's tokenizer, and the teacher's: its own (it renders the teacher's input in its own chat template)
    with the same vocabulary (the loss compares distributions token by token), checked from the tokenizer files
    alone. A server must answer a TCP probe within seconds; its tokenizer is --teacher_tokenizer_name_or_path, else
    the model the server says it serves."""
    from transformers import AutoTokenizer

    student = AutoTokenizer.from_pretrained(model_args.model_name_or_path,
                                            trust_remote_code=training_args.trust_remote_code)
    if script_args.teacher_server_url:
        probe_server(script_args.teacher_server_url)
        flag = "--teacher_tokenizer_name_or_path"
        name = script_args.teacher_tokenizer_name_or_path or served_model(script_args.teacher_server_url)
    else:
        flag, name = "--teacher_model_name_or_path", training_args.teacher_model_name_or_path
    if not name:
        return Tokenizers(student, student)
    try:
        teacher = AutoTokenizer.from_pretrained(name, trust_remote_code=training_args.trust_remote_code)
    except (OSError, ValueError) as error:
        raise InputError(f"{flag} {name}: cannot load the teacher's tokenizer ({str(error).splitlines()[0]}); give a "
                         f"local directory holding it") from None
    difference = tokenizer_difference(student, teacher)
    if difference:
        raise InputError(f"{flag} {name}: its tokenizer is not the student's ({model_args.model_name_or_path}): "
                         f"{difference}. On-policy distillation compares the two models' next-token distributions "
                         f"token by token, so they must share one vocabulary")
    return Tokenizers(student, teacher)


def served_model(url: str) -> str:
    """The model a vLLM server says it serves (GET /v1/models: its `root`, the path or name it was started with)."""
    from urllib.request import urlopen

    try:
        with urlopen(f"{url.rstrip('/')}/v1/models", timeout=SERVER_PROBE_SECONDS) as response:
            model = json.load(response)["data"][0]
        return model.get("root") or model["id"]
    except (OSError, ValueError, KeyError, IndexError) as error:
        raise InputError(f"--teacher_server_url {url}: cannot ask it which model it serves ({error}); pass "
                         f"--teacher_tokenizer_name_or_path (the teacher's tokenizer, a local dir offline)") from None


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
                         f"`python -m distill.teacher_server MODEL --max-logprobs 1 --port {port}` "
                         f"(or `vllm serve`)") from None


def probe_server_in(argv: list[str]) -> None:
    """--teacher_server_url (or --teacher-server-url, =value or a separate value) probed straight from the command
    line, before the heavy imports that parsing it properly needs."""
    for i, arg in enumerate(argv):
        name, _, value = arg.partition("=")
        if name.replace("-", "_") == "__teacher_server_url":
            value = value or (argv[i + 1] if i + 1 < len(argv) else "")
            if value:
                probe_server(value)


def check_warm_start(adapter_dir: str | None, prompt) -> None:
    """A stage-2 adapter to warm-start from must have trained with this prompt file's student side: stage 2b goes on
    training it on the student's prompts as this file renders them."""
    if adapter_dir:
        from distill.serving import check_student

        if not (Path(adapter_dir) / "adapter_config.json").exists():
            raise InputError(f"--init_adapter {adapter_dir}: no adapter_config.json there")
        check_student(Path(adapter_dir), prompt.student)


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
    query with its own side of the prompt file, no prompt) and our "query" (its turns), which the teacher's input is
    built from."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from distill.onpolicy import in_process_trainer_class, server_trainer_class, shared_prefix

    # "prompt": the student's messages, rendered by distill.render when TRL tokenizes them (_tokenize_prompts).
    dataset = Dataset.from_list([
        {"prompt": fit_system(tokenizers.student, student_messages(query_of(row), prompt.student)),
         "query": conversation(query_of(row))} for row in rows])
    # The prompt's tokens every row's teacher input starts with (their KV cache is computed once), from the rows
    # themselves before any weights load: a conversation may end it early (its own system turn, its earlier turns).
    prefix = shared_prefix(tokenizers.teacher, prompt, [conversation(query_of(row)) for row in rows])
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
        trainer.setup_teacher(prompt, tokenizers.teacher, prefix, cache=False)
        return trainer
    teacher = None
    if training_args.teacher_model_name_or_path:
        teacher = AutoModelForCausalLM.from_pretrained(training_args.teacher_model_name_or_path, dtype=dtype,
                                                       trust_remote_code=training_args.trust_remote_code)
        teacher.requires_grad_(False)
    trainer = in_process_trainer_class()(teacher_model=teacher, **kwargs)
    trainer.setup_teacher(prompt, tokenizers.teacher, prefix if script_args.prompt_cache else [],
                          cache=script_args.prompt_cache)
    return trainer


def student_record(prompt, rows: list[dict], tokenizers: Tokenizers) -> dict:
    """For the run record: the student's own side of the prompt file (evaluate.py checks its prompt file against
    it), whether a chat template without a system role had a system turn merged into the first user turn, and how
    each side's input is rendered (distill.render.rendering_record)."""
    merged = (bool(prompt.text) and not takes_system_role(tokenizers.teacher)) or merges_system(
        tokenizers.student, (student_messages(query_of(row), prompt.student) for row in rows))
    return {"student": prompt.student.to_dict(), "system_merged_into_user": merged,
            "rendering": rendering_record(prompt, query_of(rows[0]), tokenizers.student, tokenizers.teacher)}
