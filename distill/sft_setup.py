"""Owns stage 2's inputs and trainer before any weights load; must not parse flags or write run files.

Stage 2's inputs and trainer, before and without any weights (train_sft_trl.py): the stage-1 rows of the train side,
tokenized with the completion mask (and the teacher's targets for KD), the micro-batch sized from them, and TRL's
SFTTrainer (or its KD subclass) over them. It must not parse flags or write run files: the stage script does.

    data = prepare(script_args, training_args, model_args)       # bad input fails here: no model has loaded
    trainer = build_trainer(script_args, training_args, model_args, data, peft_config)
"""

from dataclasses import dataclass
from pathlib import Path

from distill.records import InputError, load_dataset_rows, read_jsonl, row_place
from distill.trainer_setup import lora_config


def load_rows(script_args) -> list[dict]:
    path = Path(script_args.dataset_name)
    if path.is_file() and path.suffix.lower() not in (".parquet", ".arrow"):
        rows = read_jsonl(path)
    else:
        rows = list(load_dataset_rows(script_args.dataset_name, script_args.dataset_split))
    field_name = script_args.messages_field
    if field_name != "messages":  # distill.training reads `messages`
        missing = next((row for row in rows if field_name not in row), None)
        if missing:
            raise InputError(f"{row_place(script_args.dataset_name, rows, missing)}: no '{field_name}' column "
                             f"(--messages_field names the column of turns)")
        rows = [{**row, "messages": row[field_name]} for row in rows]
    return rows


@dataclass
class TrainingData:
    examples: list[dict]  # input_ids and completion_mask (plus the teacher's targets for KD) of each training row
    tokenizer: object
    counts: dict  # rows in the file, dropped, used, the answer source, the batch, KD coverage: for the run record
    probes: list[dict]  # the first --fingerprint_probes training rows, tokenized, for the fingerprint
    student: dict  # the student's own side of the prompt file (stage 1's run record) and whether a system turn
    # had to be merged into the first user turn: for the run record, which evaluate.py checks the prompt file against


def prepare(script_args, training_args, model_args) -> TrainingData:
    """The train side of the split, tokenized with the completion mask (and the teacher's targets for KD), then the
    micro-batch sized from it: the last change to training_args, so the run record written after this holds
    exactly what trains. Reads files and the tokenizer only; no model loads."""
    from transformers import AutoTokenizer

    from distill.fingerprint import probes
    from distill.render import merges_system, student_example, student_messages
    from distill.soft_targets import check_tokenizer, find_targets, row_targets
    from distill.training import query_and_answer, stage1_student_side, training_rows

    rows = load_rows(script_args)
    if not rows:
        raise InputError(f"{script_args.dataset_name}: empty, no rows to train on; give a stage-1 output with rows "
                         f"(--dataset_name)")
    train, dropped = training_rows(rows, script_args.heldout_fraction, script_args.split_seed)
    if script_args.max_train_rows:
        train = train[: script_args.max_train_rows]
    if not train:
        raise InputError(f"{script_args.dataset_name}: no training rows left after the held-out split")
    targets = find_targets(script_args.dataset_name, train) if script_args.distill_loss != "ce" else None
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path,
                                              trust_remote_code=training_args.trust_remote_code)
    if targets:
        check_tokenizer(targets, tokenizer, model_args.model_name_or_path)
    student = stage1_student_side(script_args.dataset_name)
    examples, queries = [], []
    for row in train:
        try:
            queries.append(query_and_answer(row, script_args.answer_field))
            examples.append(student_example(tokenizer, *queries[-1], student))
        except (KeyError, IndexError, StopIteration, TypeError) as error:
            raise InputError(f"{row_place(script_args.dataset_name, rows, row)}: row {row.get('id')} lacks a user "
                             f"turn or its answer ({error!r})") from None
        except ValueError as error:  # turns in the wrong order, or a chat template that cannot be masked
            raise InputError(f"{row_place(script_args.dataset_name, rows, row)}: row {row.get('id')}: {error}") \
                from None
    counts = {"rows_in_file": len(rows), "heldout_rows_dropped": dropped, "rows_used": len(train),
              "answer_source": script_args.answer_field or "assistant turn (teacher)",
              "batch": size_micro_batches(script_args, training_args, examples)}
    if targets:
        for example, row in zip(examples, train):
            example.update(row_targets(targets, row, tokenizer, example))
        distilled = sum(example["teacher_start"] >= 0 for example in examples)
        # A row falls back to CE when the student's tokens of the answer are not the teacher's (or it has no targets).
        counts["distillation"] = {"loss": script_args.distill_loss, "source": targets.source,
                                  "rows_distilled": distilled, "rows_ce_fallback": len(examples) - distilled,
                                  "temperature": script_args.kd_temperature, "alpha": kd_weight(script_args)}
    probe_rows = probes(tokenizer, [(row.get("id"), *query) for row, query in
                                    zip(train[: script_args.fingerprint_probes], queries)], student)
    merged = merges_system(tokenizer, (student_messages(query, student) for query, _ in queries))
    return TrainingData(examples, tokenizer, counts, probe_rows,
                        {"student": student.to_dict(), "system_merged_into_user": merged})


def build_trainer(script_args, training_args, model_args, data: TrainingData, peft_config=None):
    """The SFTTrainer (or, for --distill_loss kd, its KD subclass) over the prepared rows; changes no argument."""
    from datasets import Dataset
    from trl import SFTTrainer

    from distill.training import kd_trainer

    trainer_kwargs = dict(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=Dataset.from_list(data.examples),
        processing_class=data.tokenizer,
        peft_config=peft_config or lora_config(model_args, script_args.train_router, training_args.trust_remote_code),
    )
    if "distillation" not in data.counts:
        return SFTTrainer(**trainer_kwargs)
    return kd_trainer(script_args.kd_temperature, kd_weight(script_args), **trainer_kwargs)


def kd_weight(script_args) -> float:
    """The KD weight: 1 for kd (no CE on the distilled tokens), --kd_alpha for kd+ce."""
    return 1.0 if script_args.distill_loss == "kd" else script_args.kd_alpha


def size_micro_batches(script_args, training_args, examples) -> dict:
    """Sets the micro-batch from --micro_batch_tokens and the data's mean row length, and the accumulation steps
    that keep --global_batch_size exact; returns the resulting batch shape for the run record."""
    from distill.training import derive_batch, micro_batch_for_tokens

    world_size = training_args.world_size
    mean_tokens = sum(len(example["input_ids"]) for example in examples) / len(examples)
    if script_args.micro_batch_tokens:
        training_args.per_device_train_batch_size = micro_batch_for_tokens(
            script_args.global_batch_size // world_size, mean_tokens, script_args.micro_batch_tokens)
        training_args.gradient_accumulation_steps = derive_batch(
            script_args.global_batch_size, world_size, training_args.per_device_train_batch_size)
    micro = training_args.per_device_train_batch_size
    return {"world_size": world_size, "micro_batch": micro, "gradient_accumulation_steps":
            training_args.gradient_accumulation_steps, "global_batch": micro * training_args.gradient_accumulation_steps
            * world_size, "mean_row_tokens": round(mean_tokens, 1)}
