"""Owns every model input's rendering (messages, chat template, thinking state); must not read files or load models.

How a model's input is rendered: the one place a teacher's and a student's input become text and token ids.

It owns the messages each side reads, the chat template's system role (or its merge into the first user turn) and the
thinking state; it must not read files or load models. Stages 1, 2, 2b, 3 and the fingerprint render through it and
nowhere else (tests/test_render.py renders one row through each and compares the ids).

The messages:
  - teacher: [system: the prompt file's system prompt, a blank line, the conversation's own system turn], then the
    prompt's example turns (user: query_template(example), assistant: answer), then the conversation's turns, its last
    user turn through query_template. The prompt and the examples come first, so they are a prefix that vLLM's prefix
    cache and stage 2b's prompt cache compute once;
  - student: the prompt file's student side, never its system prompt or example turns: [system:
    student_system_prompt, a blank line, the conversation's own system turn] (none if both are absent), then the
    conversation's turns, its last user turn through student_template.
A text query is the conversation [user: text].

The system role: a chat template without one (it raises on a system turn, or drops it: Gemma's, older Mistral's) gets
the system text at the head of the first user turn, a blank line after it; run records say `system_merged_into_user`.

The thinking state: what the model writes next.
  - a model that writes its answer next (the student always; a teacher scoring an answer given to it, stage 2b) is in
    the final-answer state: a hybrid Qwen3 template gets enable_thinking=False (its generation prompt closes an empty
    think block), a thinking template (Qwen3 Thinking-2507, whose generation prompt opens <think>) gets that block
    closed, and a template without think blocks (Qwen3 Instruct-2507, SmolLM2) is rendered as it is. So an answer is
    never scored or trained as the start of a thought;
  - a teacher that generates (stage 1, evaluate.py --with_prompt, the query writer) gets its template's default: a
    thinking teacher thinks first, and stage 1 keeps the answer after its reasoning.
"""

import weakref

from distill.prompts import BARE_STUDENT, StudentSide, TaskPrompt

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Template kinds, by what their generation prompt does (template_kind).
NO_THINK, THINKING, HYBRID = "no_think", "thinking", "hybrid"
FINAL_ANSWER_STATE = {NO_THINK: "final answer (the template has no think block)",
                      THINKING: "final answer after an empty think block (closed by us)",
                      HYBRID: "final answer after an empty think block (enable_thinking=False)"}


# ---- the messages -------------------------------------------------------------------------------------------------


def conversation(query: str | list[dict]) -> list[dict]:
    """A query's turns: a text is the conversation [user: text]."""
    return [{"role": "user", "content": query}] if isinstance(query, str) else list(query)


def query_of(row: dict) -> str | list[dict]:
    """An input row's query (records.read_queries): its conversation, or its text."""
    return row["messages"] if "messages" in row else row["text"]


def split_system(turns: list[dict]) -> tuple[str | None, list[dict]]:
    """(the conversation's own system text or None, its other turns)."""
    if turns and turns[0]["role"] == "system":
        return turns[0]["content"], turns[1:]
    return None, turns


def joined(*systems: str | None) -> str:
    return "\n\n".join(system for system in systems if system)


def teacher_messages(prompt: TaskPrompt, query: str | list[dict]) -> list[dict]:
    own_system, turns = split_system(conversation(query))
    system = joined(prompt.text, own_system)
    messages = [{"role": "system", "content": system}] * bool(system)
    for user, assistant in prompt.example_turns:
        messages += [{"role": "user", "content": prompt.query_template.format(query=user)},
                     {"role": "assistant", "content": assistant}]
    last = {"role": "user", "content": prompt.query_template.format(query=turns[-1]["content"])}
    return messages + turns[:-1] + [last]


def student_messages(query: str | list[dict], student: StudentSide = BARE_STUDENT) -> list[dict]:
    own_system, turns = split_system(conversation(query))
    system = joined(student.system_prompt, own_system)
    last = {"role": "user", "content": student.template.format(query=turns[-1]["content"])}
    return [{"role": "system", "content": system}] * bool(system) + turns[:-1] + [last]


# ---- the chat template: system role and thinking state ---------------------------------------------------------

SYSTEM_PROBE = "<system-role-probe>"
# Asked once per tokenizer (and chat template): a probe render per query doubled stage 1's rendering cost.
_system_role = weakref.WeakKeyDictionary()


def takes_system_role(tokenizer) -> bool:
    """Whether the chat template renders a system turn; some (Gemma's, older Mistral's) raise on one or drop it."""
    from jinja2 import TemplateError

    template = getattr(tokenizer, "chat_template", None)
    try:
        known = _system_role.get(tokenizer)
    except TypeError:  # not weak-referenceable: ask every time
        known = None
    if known and known[0] == template:
        return known[1]
    try:
        text = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PROBE},
                                              {"role": "user", "content": "?"}], tokenize=False)
        answer = SYSTEM_PROBE in text
    except TemplateError:
        answer = False
    try:
        _system_role[tokenizer] = (template, answer)
    except TypeError:
        pass
    return answer


def merges_system(tokenizer, chats) -> bool:
    """Whether `fit_system` moves a system turn into a user turn for any of `chats`: what run records report."""
    return any(chat and chat[0]["role"] == "system" for chat in chats) and not takes_system_role(tokenizer)


def fit_system(tokenizer, messages: list[dict]) -> list[dict]:
    """`messages` as the chat template takes them: without a system role, the system turn's text goes at the head of
    the first user turn, a blank line after it."""
    if not messages or messages[0]["role"] != "system" or takes_system_role(tokenizer):
        return messages
    system, turns = messages[0]["content"], [dict(turn) for turn in messages[1:]]
    first_user = next(turn for turn in turns if turn["role"] == "user")
    first_user["content"] = joined(system, first_user["content"])
    return turns


def template_kind(tokenizer) -> str:
    """NO_THINK, THINKING (the generation prompt opens <think>) or HYBRID (enable_thinking changes the render)."""
    probe = [{"role": "user", "content": "?"}]
    default = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    switched = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    if switched != default:
        return HYBRID
    return THINKING if default.rstrip().endswith(THINK_OPEN) else NO_THINK


def chat_text(tokenizer, messages: list[dict], answer_next: bool) -> str:
    """The input text for a chat, up to and including the assistant header. answer_next: the model writes its final
    answer next (the module docstring: the student, a scoring teacher), else it generates as its template says."""
    messages = fit_system(tokenizer, messages)
    if not answer_next:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    if text.rstrip().endswith(THINK_OPEN):  # a thinking template has no switch: close the block it opened
        text = text.rstrip() + f"\n\n{THINK_CLOSE}\n\n"
    return text


def token_ids(tokenizer, text: str) -> list[int]:
    """A rendered text's ids: the chat template wrote every special token itself."""
    return tokenizer(text, add_special_tokens=False).input_ids


def chat_ids(tokenizer, messages: list[dict], answer_next: bool) -> list[int]:
    return token_ids(tokenizer, chat_text(tokenizer, messages, answer_next))


# ---- the two sides ------------------------------------------------------------------------------------------------


def student_text(tokenizer, query: str | list[dict], student: StudentSide = BARE_STUDENT) -> str:
    return chat_text(tokenizer, student_messages(query, student), answer_next=True)


def student_ids(tokenizer, query: str | list[dict], student: StudentSide = BARE_STUDENT) -> list[int]:
    """The student's input ids for a query (a text or a conversation) with its own side of the prompt file: what
    stage 2 trains on, stage 2b samples from, stage 3 serves and the fingerprint probes."""
    return token_ids(tokenizer, student_text(tokenizer, query, student))


def student_example(tokenizer, query, answer: str, student: StudentSide = BARE_STUDENT) -> dict:
    """A training row's input_ids and completion_mask: the student's input (student_ids), then the answer and the
    end-of-turn token, which alone carry loss. The completion is the chat template's own rendering of the answer turn,
    so it must extend the input exactly (ValueError otherwise: the answer could not be masked reliably)."""
    messages = student_messages(query, student)
    prompt = chat_text(tokenizer, messages, answer_next=True)
    full = tokenizer.apply_chat_template(fit_system(tokenizer, messages + [{"role": "assistant", "content": answer}]),
                                         tokenize=False, enable_thinking=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with and without the answer; "
                         f"cannot mask it reliably:\n{prompt!r}\nvs\n{full!r}")
    completion = full[len(prompt):]
    eos = tokenizer.eos_token
    # Keep the end-of-turn token (the student must learn to stop), drop the newline the template prints after it.
    completion = completion[: completion.rindex(eos) + len(eos)] if eos in completion else completion + eos
    prompt_ids, completion_ids = token_ids(tokenizer, prompt), token_ids(tokenizer, completion)
    return {"input_ids": prompt_ids + completion_ids,
            "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids)}


def teacher_text(tokenizer, prompt: TaskPrompt, query: str | list[dict], scoring: bool = False) -> str:
    """The teacher's input: the prompt, its example turns and the query. scoring: the teacher scores an answer given
    to it (stage 2b), in the final-answer state; else it generates (stage 1, evaluate.py --with_prompt)."""
    return chat_text(tokenizer, teacher_messages(prompt, query), answer_next=scoring)


def teacher_ids(tokenizer, prompt: TaskPrompt, query: str | list[dict], scoring: bool = False) -> list[int]:
    return token_ids(tokenizer, teacher_text(tokenizer, prompt, query, scoring))


def generates_reasoning(tokenizer) -> bool:
    """A generating teacher's output starts inside a think block its prompt opened (Qwen3 Thinking-2507): the output
    then holds only </think>."""
    return chat_text(tokenizer, [{"role": "user", "content": "x"}], answer_next=False).rstrip().endswith(THINK_OPEN)


def holds_prompt(prompt: TaskPrompt, text: str) -> bool:
    """Whether a rendered input holds the prompt file's system prompt or any of its example answers."""
    return bool(prompt.text) and prompt.text in text or any(answer in text for _, answer in prompt.example_turns)


def rendering_record(prompt: TaskPrompt, query, student_tokenizer, teacher_tokenizer) -> dict:
    """For stage 2b's run record, from one of the run's queries: per side, its template kind, the state it is
    rendered in (both write or score a final answer, so the states agree by construction; this says how each template
    got there), whether its input holds the prompt (the teacher's must, the student's must not) and how it ends."""
    texts = {"student": (student_tokenizer, student_text(student_tokenizer, query, prompt.student)),
             "teacher": (teacher_tokenizer, teacher_text(teacher_tokenizer, prompt, query, scoring=True))}
    return {side: {"template": template_kind(tok), "state": FINAL_ANSWER_STATE[template_kind(tok)],
                   "holds_prompt": holds_prompt(prompt, text), "input_ends_with": text[-48:]}
            for side, (tok, text) in texts.items()}
