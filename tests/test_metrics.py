"""distill.metrics on a hand-made fixture whose every number is worked out by hand below."""

import pytest

from distill.metrics import UNPARSED, lingua_predictions, score, worst_labels

LABELS = ("en", "fr", "de", "ot")  # 'de' has no gold row: it must stay out of worst_labels
GOLDS = ["en", "en", "en", "fr", "fr", "ot", None, "en"]
PREDS = ["en", "fr", None, "fr", "en", "ot", "fr", "en"]  # None: the output broke the answer contract
TEACHER = ["en", "fr", "en", "fr", None, "ot", "fr", "fr"]
# gold rows 0-5 and 7 (7 rows): right on 0, 3, 5, 7 -> 4/7
# teacher rows 0-3 and 5-7 (7 rows): agree on 0, 1, 3, 5, 6 -> 5/7 (row 2 is unparsed, row 7 says en vs fr)
# confusion (rows gold, columns en fr de ot unparsed):
#   en: rows 0, 1, 2, 7 -> en, fr, unparsed, en;  fr: rows 3, 4 -> fr, en;  ot: row 5 -> ot
MATRIX = [[2, 1, 0, 0, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 1, 0]]
# en: predicted on gold rows 0, 4, 7 (2 right) -> P 2/3, R 2/4, F1 4/7;  fr: predicted on 1, 3 -> P 1/2, R 1/2
PER_LABEL = {"en": (2 / 3, 1 / 2, 4 / 7, 4), "fr": (1 / 2, 1 / 2, 1 / 2, 2), "de": (0, 0, 0, 0), "ot": (1, 1, 1, 1)}


@pytest.fixture()
def result():
    return score(GOLDS, PREDS, LABELS, TEACHER)


def examples():
    return [{"id": f"r{i}", "text": f"text {i}", "gold": g, "prediction": p}
            for i, (g, p) in enumerate(zip(GOLDS, PREDS))]


def test_rates(result):
    assert result["n"] == 8
    assert result["accuracy_vs_gold"] == pytest.approx(4 / 7) and result["n_with_gold"] == 7
    assert result["agreement_with_teacher"] == pytest.approx(5 / 7) and result["n_with_teacher"] == 7
    assert result["parse_rate"] == pytest.approx(7 / 8) and result["unparsed"] == 1


def test_confusion_matrix(result):
    cm = result["confusion_matrix"]
    assert cm["rows_gold"] == list(LABELS)
    assert cm["columns_predicted"] == [*LABELS, UNPARSED]
    assert cm["matrix"] == MATRIX
    assert sum(map(sum, cm["matrix"])) == result["n_with_gold"]
    assert cm["as_dict"] == {"en": {"en": 2, "fr": 1, UNPARSED: 1}, "fr": {"en": 1, "fr": 1}, "de": {}, "ot": {"ot": 1}}


def test_per_label_matches_hand_and_sklearn(result):
    from sklearn.metrics import precision_recall_fscore_support

    kept = [(g, p if p is not None else UNPARSED) for g, p in zip(GOLDS, PREDS) if g is not None]
    sk = precision_recall_fscore_support([g for g, _ in kept], [p for _, p in kept], labels=list(LABELS),
                                         zero_division=0)
    for i, label in enumerate(LABELS):
        stats = result["per_label"][label]
        precision, recall, f1, support = PER_LABEL[label]
        assert stats["precision"] == pytest.approx(precision) == pytest.approx(sk[0][i])
        assert stats["recall"] == pytest.approx(recall) == pytest.approx(sk[1][i])
        assert stats["accuracy"] == pytest.approx(recall)
        assert stats["f1"] == pytest.approx(f1) == pytest.approx(sk[2][i])
        assert stats["support"] == support == sk[3][i]
    assert result["macro_f1"] == pytest.approx((4 / 7 + 1 / 2 + 0 + 1) / 4)


def test_baselines(result):
    assert result["baselines"]["majority_class"] == {"label": "en", "accuracy": pytest.approx(4 / 7)}
    assert result["baselines"]["chance"]["accuracy"] == pytest.approx(1 / len(LABELS))


def test_no_teacher_and_no_gold():
    without_teacher = score(GOLDS, PREDS, LABELS)
    assert without_teacher["agreement_with_teacher"] is None and without_teacher["n_with_teacher"] == 0
    assert without_teacher["accuracy_vs_gold"] == pytest.approx(4 / 7)
    no_gold = score([None] * 3, ["en", None, "fr"], LABELS, ["en", "en", "fr"])
    assert no_gold["accuracy_vs_gold"] is None and no_gold["n_with_gold"] == 0
    assert no_gold["agreement_with_teacher"] == pytest.approx(2 / 3)
    assert "confusion_matrix" not in no_gold and "baselines" not in no_gold


def test_worst_labels(result):
    worst = worst_labels(result, examples(), k=2)
    assert [w["label"] for w in worst] == ["fr", "en"]  # lowest F1 first; 'de' (F1 0, no rows) is not present
    assert worst[0]["f1"] == pytest.approx(1 / 2)
    assert worst[0]["errors"] == [{"id": "r4", "text": "text 4", "predicted": "en"}]
    assert [e["id"] for e in worst[1]["errors"]] == ["r1", "r2"]
    assert worst[1]["errors"][1]["predicted"] is None
    assert [w["label"] for w in worst_labels(result, examples(), k=5)] == ["fr", "en", "ot"]
    assert len(worst_labels(result, examples(), k=1, per_label=1)[0]["errors"]) == 1


def test_lingua_maps_to_label_set():
    texts = ["Je voudrais un café au lait, s'il vous plaît, et un croissant.",
             "Eu gostaria de um café com leite, por favor, e um pão de queijo.",  # Portuguese: not a label
             "Ich habe heute leider keine Zeit, vielleicht morgen.",
             "12345 + 678 = 13023"]  # no language at all
    assert lingua_predictions(texts, LABELS) == ["fr", "ot", "de", "ot"]
