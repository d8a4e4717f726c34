"""distill.records: reading queries from awkward files, crash-safe JSONL output and run records."""

import json
import re

import pytest

from distill.records import (
    InputError,
    RunRecord,
    append_jsonl,
    read_jsonl,
    read_queries,
    repair_torn_tail,
    text_id,
    write_json,
)


def write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def jsonl(*rows) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


# ---- read_queries ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_empty_file_has_no_rows(tmp_path, suffix):
    queries = read_queries(write(tmp_path / f"empty{suffix}", b""))
    assert queries.rows == [] and queries.lines == 0 and queries.empty == 0 and queries.duplicates == 0


def test_bom_is_stripped(tmp_path):
    for name, data in (("bom.txt", "\ufeffHallo Welt\nzwei\n"), ("bom.jsonl", '\ufeff{"text": "Hallo Welt"}\n'),
                       ("bom.csv", "\ufefftext,lang\nHallo Welt,de\n")):
        rows = read_queries(write(tmp_path / name, data.encode("utf-8"))).rows
        assert rows[0]["text"] == "Hallo Welt", name
        assert not any("\ufeff" in key or "\ufeff" in str(value) for row in rows for key, value in row.items())


def test_crlf_line_endings(tmp_path):
    txt = read_queries(write(tmp_path / "crlf.txt", b"one line\r\ntwo line\r\n")).rows
    assert [row["text"] for row in txt] == ["one line", "two line"]
    js = read_queries(write(tmp_path / "crlf.jsonl", b'{"text": "a b"}\r\n{"text": "c"}\r\n')).rows
    assert [row["text"] for row in js] == ["a b", "c"]
    csv_rows = read_queries(write(tmp_path / "crlf.csv", b"text,lang\r\nx y,en\r\nz,en\r\n")).rows
    assert [(row["text"], row["lang"]) for row in csv_rows] == [("x y", "en"), ("z", "en")]
    assert not any("\r" in str(value) for row in txt + js + csv_rows for value in row.values())


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_invalid_utf8_names_path_and_line(tmp_path, suffix):
    lines = [b'{"text": "fine"}', b'{"text": "also fine"}', b'{"text": "caf\xe9 latin-1"}', b'{"text": "after"}']
    if suffix == ".txt":
        lines = [b"fine", b"also fine", b"caf\xe9 latin-1", b"after"]
    path = write(tmp_path / f"bad{suffix}", b"\n".join(lines) + b"\n")
    with pytest.raises(InputError) as error:
        read_queries(path)
    assert f"{path}:3:" in str(error.value)
    assert "UTF-8" in str(error.value)


def test_invalid_utf8_in_csv_names_line(tmp_path):
    path = write(tmp_path / "bad.csv", b"text\nok\nok2\n\xff\xfe broken\n")
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}:4:"):
        read_queries(path)


def test_long_line_is_one_query(tmp_path):
    long_text = ("Der Hund läuft über die Straße. " * 4000)[:100_000].strip()
    path = write(tmp_path / "long.txt", f"short one\n{long_text}\nshort two\n".encode())
    rows = read_queries(path).rows
    assert [row["text"] for row in rows] == ["short one", long_text, "short two"]
    jpath = write(tmp_path / "long.jsonl", jsonl({"text": long_text}))
    assert read_queries(jpath).rows[0]["text"] == long_text


def test_duplicates_kept_once_and_counted(tmp_path):
    path = write(tmp_path / "dups.txt", b"hola\nhello\nhola\n\n   \nhello\nhola\nbye\n")
    queries = read_queries(path)
    assert [row["text"] for row in queries.rows] == ["hola", "hello", "bye"]
    assert queries.duplicates == 3 and queries.empty == 2 and queries.lines == 8


def test_ids_from_text_are_stable(tmp_path):
    first = read_queries(write(tmp_path / "a.txt", b"alpha\nbeta\n")).rows
    second = read_queries(write(tmp_path / "b.txt", b"gamma\nbeta\nalpha\n")).rows
    assert {r["text"]: r["id"] for r in first} == {r["text"]: r["id"] for r in second if r["text"] != "gamma"}
    assert first[0]["id"] == text_id("alpha") != text_id("beta")


def test_malformed_jsonl_row_names_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", b'{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}:2: malformed JSON"):
        read_queries(path)


def test_jsonl_row_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "list.jsonl", b'{"text": "one"}\n["two"]\n')
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}:2:.*JSON object"):
        read_queries(path)


def test_missing_text_field_names_line_and_columns(tmp_path):
    path = write(tmp_path / "fields.jsonl",
                 jsonl({"text": "one"}, {"text": "two"}, {"sentence": "three", "lang": "en"}))
    with pytest.raises(InputError) as error:
        read_queries(path)
    assert f"{path}:3:" in str(error.value) and "'text'" in str(error.value) and "sentence" in str(error.value)


def test_other_text_field(tmp_path):
    path = write(tmp_path / "fields.jsonl", jsonl({"sentence": "three", "lang": "en"}))
    rows = read_queries(path, text_field="sentence").rows
    assert rows[0]["text"] == "three" and rows[0]["lang"] == "en"


def test_non_string_text_is_an_error(tmp_path):
    path = write(tmp_path / "num.jsonl", jsonl({"text": "ok"}, {"text": 42}))
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}:2:.*string"):
        read_queries(path)


def test_duplicate_explicit_ids_are_an_error(tmp_path):
    path = write(tmp_path / "ids.jsonl", jsonl({"id": "a", "text": "one"}, {"id": "b", "text": "two"},
                                               {"id": "a", "text": "three"}))
    with pytest.raises(InputError) as error:
        read_queries(path)
    assert f"{path}:3:" in str(error.value) and "'a'" in str(error.value) and "line 1" in str(error.value)


def test_explicit_ids_kept_and_numbers_stringified(tmp_path):
    path = write(tmp_path / "ids.jsonl", jsonl({"id": 7, "text": "one"}, {"id": "", "text": "two"}))
    rows = read_queries(path).rows
    assert rows[0]["id"] == "7" and rows[1]["id"] == text_id("two")


def test_blank_jsonl_lines_are_counted_empty(tmp_path):
    path = write(tmp_path / "blank.jsonl", b'{"text": "one"}\n\n{"text": "  "}\n{"text": "two"}\n')
    queries = read_queries(path)
    assert [row["text"] for row in queries.rows] == ["one", "two"] and queries.empty == 2


def test_csv_extra_columns_are_carried(tmp_path):
    data = 'id,text,label,note\nr1,"Bonjour, le monde",fr,greeting\nr2,"multi\nline text",en,\n'
    rows = read_queries(write(tmp_path / "in.csv", data.encode())).rows
    assert rows[0] == {"id": "r1", "text": "Bonjour, le monde", "label": "fr", "note": "greeting"}
    assert rows[1]["text"] == "multi\nline text" and rows[1]["label"] == "en"


def test_csv_without_text_column_names_line(tmp_path):
    path = write(tmp_path / "in.csv", b"sentence,label\nhello,en\n")
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}:2:"):
        read_queries(path)


def test_unsupported_file_type(tmp_path):
    path = write(tmp_path / "in.xlsx", b"PK")  # .parquet, this test's first example, is read now
    with pytest.raises(InputError, match="unsupported input type '.xlsx'"):
        read_queries(path)


def test_unicode_line_separators_stay_inside_a_query(tmp_path):
    # U+2028, U+0085 and form feeds are line breaks for str.splitlines, not for a JSONL or .txt reader.
    text = "first\u2028second\x85third\x0cfourth"
    assert read_queries(write(tmp_path / "u.jsonl", jsonl({"text": text}))).rows[0]["text"] == text
    assert read_queries(write(tmp_path / "u.txt", (text + "\n").encode())).rows[0]["text"] == text


# ---- output -------------------------------------------------------------------------------------------------


def test_append_and_read_jsonl_roundtrip(tmp_path):
    path = tmp_path / "out.jsonl"
    rows = [{"id": "1", "text": "Привет\u2028мир"}, {"id": "2", "text": "東京駅 🚉"}]
    with open(path, "a", encoding="utf-8") as handle:
        append_jsonl(handle, rows[:1])
        append_jsonl(handle, [])
        append_jsonl(handle, rows[1:])
    assert read_jsonl(path) == rows
    assert path.read_bytes().count(b"\n") == 2


def test_read_jsonl_names_bad_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": \n')
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}:3:"):
        read_jsonl(path)


def test_repair_torn_tail(tmp_path):
    path = tmp_path / "out.jsonl"
    assert repair_torn_tail(path) == 0 and not path.exists()
    path.write_bytes(b"")
    assert repair_torn_tail(path) == 0
    whole = jsonl({"id": "1"}, {"id": "2"})
    path.write_bytes(whole)
    assert repair_torn_tail(path) == 0 and path.read_bytes() == whole
    torn = b'{"id": "3", "messages": [{"role": "us'
    path.write_bytes(whole + torn)
    assert repair_torn_tail(path) == len(torn)
    assert path.read_bytes() == whole
    assert [row["id"] for row in read_jsonl(path)] == ["1", "2"]


def test_repair_torn_only_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes('{"id": "ü'.encode())
    assert repair_torn_tail(path) == len('{"id": "ü'.encode())
    assert path.read_bytes() == b"" and read_jsonl(path) == []


def test_write_json_is_atomic_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "run.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2, "b": "é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": 2, "b": "é"}
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]


def test_run_record(tmp_path):
    record = RunRecord("stage", {"x": 1})
    result = record.write(tmp_path / "run.json", status="finished", counts={"n": 3})
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved == result
    assert saved["stage"] == "stage" and saved["args"] == {"x": 1} and saved["counts"] == {"n": 3}
    assert saved["wall_seconds"] >= 0 and saved["git_revision"]


def test_text_field_names_the_column_of_a_txt_file_too(tmp_path):
    path = write(tmp_path / "in.txt", b"hello\n\nworld\n")
    queries = read_queries(path, text_field="sentence")
    assert [row["text"] for row in queries.rows] == ["hello", "world"] and queries.empty == 1


# ---- conversations and datasets -----------------------------------------------------------------------------------


def turns(*pairs) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


def test_conversations_are_queries_with_ids_groups_and_dedup_by_content(tmp_path):
    from distill.records import conversation_key
    from distill.splits import split_of

    chat = turns(("system", "A cooking app."), ("user", "Can I freeze rice?"), ("assistant", "Yes."),
                 ("user", "How long does it keep?"))
    path = write(tmp_path / "chats.jsonl", jsonl(
        {"group": "kitchen", "messages": chat, "note": "carried"},
        {"id": "other", "group": "kitchen", "messages": chat},  # the same turns again: a duplicate, whatever its id
        {"id": 7, "group": "space", "messages": turns(("user", "Why is Mars red?"))},
    ) + b"\n")
    queries = read_queries(path)
    assert queries.kind == "conversations" and (queries.lines, queries.empty, queries.duplicates) == (4, 1, 1)
    first, second = queries.rows
    # the id comes from the content (roles and texts), so a re-run finds it again; the group decides the split
    assert first["id"] == text_id(conversation_key(chat)) == read_queries(path).rows[0]["id"]
    assert first["messages"] == chat and first["text"] == "How long does it keep?" and first["note"] == "carried"
    assert second == {"id": "7", "group": "space", "text": "Why is Mars red?",
                      "messages": turns(("user", "Why is Mars red?"))}
    assert split_of(first) == split_of({"id": "unrelated", "group": "kitchen"})


@pytest.mark.parametrize("row, message", [
    ({"messages": turns(("user", "Hi?"), ("assistant", "Hello."))}, "ends in an assistant turn"),
    ({"messages": turns(("user", "Hi?"), ("moderator", "x"), ("user", "And?"))}, "turn 2 has an unknown role"),
    ({"messages": []}, "an empty conversation"),
    ({"messages": turns(("user", "Hi?"), ("system", "Late."), ("user", "And?"))}, "turn 2 is a system turn"),
    ({"messages": [{"role": "user"}]}, "turn 1 must be"),
    ({"text": "a text row"}, "the input mixes text rows and conversations"),
])
def test_a_bad_conversation_names_file_and_line(tmp_path, row, message):
    path = write(tmp_path / "chats.jsonl", jsonl({"messages": turns(("user", "Fine?"))}, row))
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}:2: .*{re.escape(message)}"):
        read_queries(path)


def test_a_conversation_in_a_file_of_texts_names_its_line(tmp_path):
    path = write(tmp_path / "mixed.jsonl", jsonl({"text": "one"}, {"messages": turns(("user", "Two?"))}))
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}:2: .*mixes text rows and conversations"):
        read_queries(path)


def test_parquet_file_and_saved_dataset_splits_are_read_and_name_their_rows(tmp_path):
    import datasets

    rows = [{"id": "a", "group": "g1", "messages": turns(("user", "Why is the sea salty?"))},
            {"id": "b", "group": "g2", "messages": turns(("system", "Be brief."), ("user", "What is a comet?"))}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "chats.parquet"))
    assert [row["messages"] for row in read_queries(str(tmp_path / "chats.parquet")).rows] == [r["messages"]
                                                                                             for r in rows]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train_sft": datasets.Dataset.from_list(rows),
                          "test_sft": datasets.Dataset.from_list([{"text": "Only a text.", "id": "t"}])}
                         ).save_to_disk(str(saved))
    assert [row["id"] for row in read_queries(str(saved), split="train_sft").rows] == ["a", "b"]
    assert read_queries(str(saved), split="test_sft").rows == [{"id": "t", "text": "Only a text."}]
    with pytest.raises(InputError, match="no split 'train'.*train_sft, test_sft"):
        read_queries(str(saved))
    ends_in_an_answer = {"id": "c", "group": "g3", "messages": turns(("user", "Ok?"), ("assistant", "Ok."))}
    datasets.Dataset.from_list(rows + [ends_in_an_answer]).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(InputError, match=rf"^{re.escape(str(tmp_path / 'bad.parquet'))}: row 3: .*assistant turn"):
        read_queries(str(tmp_path / "bad.parquet"))


def test_resume_cuts_a_query_that_a_crash_left_short(tmp_path):
    """--keep all writes a query's rows in one write; a crash that tears it leaves some whole lines of that query,
    which resume must drop (else the query counts as done with fewer rows)."""
    from distill.run_files import cut_partial_query

    def row(query, k, kept):
        return json.dumps({"id": f"{query}#{k}", "query_id": query, "teacher": {"samples_kept": kept}}) + "\n"

    path = tmp_path / "teacher.jsonl"
    whole = row("a", 0, 2) + row("a", 1, 2)
    path.write_text(whole + row("b", 0, 3) + row("b", 1, 3) + '{"id": "b#2", "que')
    assert repair_torn_tail(path) > 0
    assert cut_partial_query(path) == ("b", 2, 3)
    assert path.read_text() == whole  # query a kept whole, every line of b gone
    assert cut_partial_query(path) is None and path.read_text() == whole
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"id": "x", "teacher": {}}) + "\n")
    assert cut_partial_query(plain) is None
