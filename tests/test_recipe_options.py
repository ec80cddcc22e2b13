"""Recipe options of pretraining: the group-aware validation split (whole plays held out of the demo corpus,
both editions), document-aware packing, label smoothing and z-loss against hand computations."""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest

from lmtrain.arguments import DataArguments
from lmtrain.data.demo_corpus import PLAY_FIELD, play_key
from lmtrain.data.sources import DataError
from lmtrain.data.splitting import resolve_split_field

# Small plays of the demo corpus, each in two editions (one with a Folio spelling of its file name).
SUBSET_PLAYS = ("comedy_of_errors", "midsummer_nights_dream", "tempest", "hamlet", "romeo_and_juliet",
                "much_ado_about_nothing")


@pytest.fixture(scope="module")
def demo_records(demo_corpus_path) -> list[dict]:
    with open(demo_corpus_path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def plays_subset(demo_records, tmp_path_factory):
    """A jsonl of SUBSET_PLAYS' scenes (both editions), and those records."""
    records = [r for r in demo_records if r[PLAY_FIELD] in SUBSET_PLAYS]
    path = tmp_path_factory.mktemp("subset") / "plays.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path, records


def test_every_folio_play_has_its_modern_edition_in_the_same_group(demo_records):
    editions = defaultdict(set)
    for record in demo_records:
        assert record[PLAY_FIELD] == play_key(record["play_file"])
        editions[record[PLAY_FIELD]].add(record["play_file"].endswith("_f"))
    folio_only = [play for play, kinds in editions.items() if kinds == {True}]
    assert folio_only == [], f"Folio plays without a modern partner (add them to _FOLIO_SPELLINGS): {folio_only}"
    assert sum(kinds == {True, False} for kinds in editions.values()) == 35
    assert all(len(editions[play]) == 2 for play in SUBSET_PLAYS)


def test_auto_split_is_by_play_for_the_demo_corpus_only():
    assert resolve_split_field("auto", ["shakespeare"]) == PLAY_FIELD
    assert resolve_split_field("auto", ["shakespeare", "data/web.jsonl"]) is None
    assert resolve_split_field("document", ["shakespeare"]) is None
    assert resolve_split_field("book_id", ["data/web.jsonl"]) == "book_id"


def _texts(tokenizer, documents):
    return [tokenizer.decode(doc[:-1]) for doc in documents]


def test_held_out_plays_are_absent_from_training_in_both_editions(plays_subset, prepare_data, tiny_tokenizer,
                                                                  packed_documents):
    path, records = plays_subset
    # clean=False: documents come back out of the blocks byte for byte, so "absent" is checked exactly.
    data, report = prepare_data([path], split_by=PLAY_FIELD, validation_split_percentage=30, clean=False)
    held = set(report.split["validation_groups"])
    assert report.split["by"] == PLAY_FIELD and 0 < len(held) < len(SUBSET_PLAYS)
    held_texts = {r["text"] for r in records if r[PLAY_FIELD] in held}
    train_texts = _texts(tiny_tokenizer, packed_documents(data["train"]))
    validation_texts = _texts(tiny_tokenizer, packed_documents(data["validation"]))
    assert set(validation_texts) == held_texts  # every scene of both editions, and nothing else
    assert not held_texts & set(train_texts)
    assert {r["text"] for r in records} - held_texts == set(train_texts)
    # Both editions of every held-out play are there (no play held out in one edition only).
    files = {r["play_file"] for r in records if r[PLAY_FIELD] in held}
    assert len(files) == 2 * len(held)
    # The share is counted in tokens, whole plays at a time: at least the 30% asked for.
    assert report.tokens["validation"] / (report.tokens["validation"] + report.tokens["train"]) >= 0.3


def test_named_validation_groups_and_cleaning(plays_subset, prepare_data):
    path, records = plays_subset
    data, report = prepare_data([path], split_by=PLAY_FIELD, validation_groups=["hamlet", "tempest"])
    assert report.split["validation_groups"] == ["hamlet", "tempest"]
    held = [r for r in records if r[PLAY_FIELD] in ("hamlet", "tempest")]
    dropped = sum(report.dropped.values())
    assert report.documents_kept["validation"] <= len(held)
    assert report.documents_kept["validation"] + report.documents_kept["train"] + dropped == len(records)
    with pytest.raises(DataError, match="no document has that group value"):
        prepare_data([path], split_by=PLAY_FIELD, validation_groups=["hamlet", "othello"])


def test_split_by_a_missing_field_is_counted_or_named(write_jsonl, prepare_data):
    words = " ".join(f"word{i}" for i in range(40))
    path = write_jsonl([{"text": f"{words} {i}", "site": f"s{i % 3}"} for i in range(12)] + [{"text": words + " x"}])
    _, report = prepare_data([path], split_by="site", validation_split_percentage=20, clean=False)
    assert report.dropped == {"missing_split_field": 1}
    assert len(report.split["validation_groups"]) >= 1
    with pytest.raises(DataError, match=r"data.jsonl:13.*no field 'site'"):
        prepare_data([path], split_by="site", validation_split_percentage=20, clean=False, lenient=False)


def test_split_by_file_keeps_each_txt_file_on_one_side(tmp_path, prepare_data, tiny_tokenizer, packed_documents):
    for name in "abcd":
        paragraphs = [f"Paragraph {i} of file {name}: " + " ".join(f"{name}{j}" for j in range(30)) for i in range(5)]
        (tmp_path / f"{name}.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    data, report = prepare_data([tmp_path / "*.txt"], split_by="file", txt_unit="paragraph",
                                validation_split_percentage=10, clean=False)
    held = report.split["validation_groups"]
    assert len(held) == 1 and held[0].endswith(".txt")
    held_name = held[0][-5]
    validation = _texts(tiny_tokenizer, packed_documents(data["validation"]))
    train = _texts(tiny_tokenizer, packed_documents(data["train"]))
    assert len(validation) == 5 and all(f"of file {held_name}:" in t for t in validation)
    assert len(train) == 15 and not any(f"of file {held_name}:" in t for t in train)


def test_split_options_are_checked():
    with pytest.raises(ValueError, match="--validation_files is the validation split"):
        DataArguments(validation_files=["v.jsonl"], split_by="play")


def test_every_group_held_out_is_refused(write_jsonl, prepare_data):
    path = write_jsonl([{"text": "a sentence long enough to be kept " * 3, "site": "one"}] * 1)
    with pytest.raises(DataError, match="would hold every group"):
        prepare_data([path], split_by="site", validation_split_percentage=10, clean=False)


# ------------------------------------------------------------------------------------- document-aware packing

def test_document_pieces_cut_only_what_does_not_fit():
    from lmtrain.data.best_fit import document_pieces

    doc, start, length = document_pieces(np.array([5, 8, 17, 1]), block_size=8)
    assert doc.tolist() == [0, 1, 2, 2, 2, 3]
    assert start.tolist() == [0, 0, 0, 8, 16, 0]
    assert length.tolist() == [5, 8, 8, 8, 1, 1]


def _segments(block: dict) -> list[list[int]]:
    """The position segments of a block's real (labelled) tokens."""
    ids, labels, positions = (np.asarray(block[k]) for k in ("input_ids", "labels", "position_ids"))
    starts = np.flatnonzero(positions == 0).tolist() + [len(ids)]
    pieces = [(ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:])]
    real = []
    for piece_ids, piece_labels in pieces:
        if (piece_labels == -100).all():
            continue  # the padding segment
        assert (piece_labels == piece_ids).all()  # pretraining: every real token is a label
        real.append(piece_ids.tolist())
    return real


def test_best_fit_keeps_fitting_documents_whole(write_jsonl, prepare_data, tiny_tokenizer):
    from lmtrain.data.best_fit import document_pieces

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(300)]
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.choice([2, 5, 10, 20, 70], size=80)]
    path = write_jsonl([{"text": t} for t in texts])
    data, report = prepare_data([path], packing_strategy="best_fit", clean=False, block_size=64)
    grouped, grouped_report = prepare_data([path], clean=False, block_size=64)
    train = data["train"].with_format("numpy")
    documents = [tiny_tokenizer(t)["input_ids"] + [tiny_tokenizer.eos_token_id] for t in texts]
    assert all(d[-1] == tiny_tokenizer.eos_token_id for d in documents)
    lengths = np.array([len(d) for d in documents])
    doc, start, length = document_pieces(lengths, 64)
    expected = sorted(documents[d][s:s + n] for d, s, n in zip(doc.tolist(), start.tolist(), length.tolist()))
    found = [segment for block in train for segment in _segments(block)]
    assert sorted(found) == expected  # every piece once: fitting documents whole, longer ones cut per block
    assert sum(n <= 64 for n in lengths) > 40 and sum(n > 64 for n in lengths) > 5
    pad = tiny_tokenizer.pad_token_id
    for block in train:
        masked = np.asarray(block["labels"]) == -100
        assert (np.asarray(block["input_ids"])[masked] == pad).all()
        assert not masked.any() or masked[-1]  # padding only at the tail
    assert report.padded_tokens == len(train) * 64 - lengths.sum()
    assert grouped_report.padded_tokens < 64 and len(grouped["train"]) <= len(train)


def test_best_fit_validation_bytes_add_up(write_jsonl, prepare_data):
    rng = np.random.default_rng(1)
    texts = [" ".join(f"ü{int(i)}" for i in rng.integers(0, 99, size=int(n))) for n in rng.integers(5, 120, size=60)]
    path = write_jsonl([{"text": t} for t in texts])
    data, report = prepare_data([path], packing_strategy="best_fit", clean=False, validation_split_percentage=40)
    held = report._validation_documents["text"]
    assert sum(data["validation"]["num_bytes"]) == pytest.approx(sum(len(t.encode()) for t in held), rel=1e-9)
    with pytest.raises(ValueError, match="best_fit pads every block"):
        DataArguments(packing_strategy="best_fit", drop_remainder=True)


# ----------------------------------------------------------------------------------- label smoothing, z-loss

def hand_loss(rows: list[dict], logits: list, eps: float, z: float) -> float:
    """Token by token: (1 - eps) * NLL + eps * mean over the vocabulary of -log p, + z * logsumexp**2, summed
    over every predicted token (label of the next position not -100) of every row, / their number."""
    import math

    total, count = 0.0, 0
    for row, row_logits in zip(rows, logits):
        for t in range(len(row["labels"]) - 1):
            target = row["labels"][t + 1]
            if target == -100:
                continue
            values = row_logits[t].tolist()
            top = max(values)
            log_z = top + math.log(sum(math.exp(v - top) for v in values))
            log_p = [v - log_z for v in values]
            total += (1 - eps) * -log_p[target] + eps * -sum(log_p) / len(log_p) + z * log_z ** 2
            count += 1
    return total / count


def test_causal_lm_loss_matches_the_hand_computation():
    import torch

    from lmtrain.training.losses import CausalLMLoss

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 11, generator=generator) * 3
    labels = torch.tensor([[1, 2, 3, -100, -100, 4, 5], [6, -100, 7, 8, 9, 10, -100]])
    rows = [{"labels": row.tolist()} for row in labels]
    for eps, z in ((0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.2, 1e-3)):
        loss = CausalLMLoss(eps, z)({"logits": logits}, labels, num_items_in_batch=None)
        assert loss.item() == pytest.approx(hand_loss(rows, logits, eps, z), rel=1e-5)
    # Normalized by the step's count, not the micro-batch's: two halves with the step's count sum to the whole.
    whole = CausalLMLoss(0.1, 1e-3)({"logits": logits}, labels)
    count = torch.tensor(sum(1 for row in rows for target in row["labels"][1:] if target != -100))
    halves = sum(CausalLMLoss(0.1, 1e-3)({"logits": logits[i:i + 1]}, labels[i:i + 1], count) for i in range(2))
    assert halves.item() == pytest.approx(whole.item(), rel=1e-6)


def packed_rows(rng: np.random.Generator, vocab: int, length: int) -> list[dict]:
    """Rows in the packed format: pretraining blocks (every token a label, a padded tail) and SFT rows (the
    prompt of each sample masked), positions restarting per segment."""
    rows = []
    for kind in ("block", "block_padded", "sft", "sft"):
        ids, labels, positions = [], [], []
        while len(ids) < length:
            size = int(min(rng.integers(3, 9), length - len(ids)))
            segment = rng.integers(1, vocab, size=size).tolist()
            if kind == "block_padded" and len(ids) + size == length:
                segment_labels = [-100] * size  # the padding segment
            elif kind == "sft":
                prompt = size // 2
                segment_labels = [-100] * prompt + segment[prompt:]
            else:
                segment_labels = list(segment)
            ids += segment
            labels += segment_labels
            positions += list(range(size))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return rows


@pytest.mark.parametrize("eps, z", [(0.1, 0.0), (0.0, 1e-3), (0.1, 1e-3)])
def test_trainer_loss_is_the_smoothed_cross_entropy_over_the_step(tmp_path, eps, z):
    """One optimizer step of two micro-batches (gradient accumulation), rows of uneven label counts: the
    logged loss is the hand-computed loss over all four rows' predicted tokens, so every token weighs the
    same (the Trainer's num_items_in_batch), and learning_rate 0 leaves the model as it was scored."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Qwen2Config

    from lmtrain.arguments import TrainArguments
    from lmtrain.training.trainer import build_trainer

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaked predictions, so smoothing and z-loss move the loss visibly
    rows = packed_rows(np.random.default_rng(3), 64, 24)
    with torch.no_grad():  # use_cache=False as in training: with a cache, packed segments would see each other
        logits = [model(input_ids=torch.tensor([r["input_ids"]]), position_ids=torch.tensor([r["position_ids"]]),
                        use_cache=False).logits[0] for r in rows]
    expected = hand_loss(rows, logits, eps, z)
    args = TrainArguments(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=2,
                          gradient_accumulation_steps=2, max_steps=1, learning_rate=0.0, logging_steps=1,
                          label_smoothing_factor=eps, z_loss_coefficient=z, plot_curves=False, save_strategy="no",
                          disable_tqdm=True, dataloader_num_workers=0, lr_scheduler_type="constant",
                          warmup_steps=0)
    trainer = build_trainer(model, None, args, Dataset.from_list(rows))
    trainer.train()
    logged_row = next(row for row in trainer.state.log_history if "loss" in row)
    assert logged_row["loss"] == pytest.approx(expected, rel=1e-4)
    if z:  # the z-loss part of that loss is logged beside it
        assert logged_row["z_loss"] == pytest.approx(expected - hand_loss(rows, logits, eps, 0.0), rel=1e-3)
    else:
        assert "z_loss" not in logged_row
    unsmoothed = hand_loss(rows, logits, 0.0, 0.0)
    assert abs(expected - unsmoothed) > 5e-4 * expected  # several times the tolerance: the options are seen


def test_loss_options_are_checked(tmp_path):
    from lmtrain.arguments import TrainArguments
    from lmtrain.training.losses import loss_function_for

    assert loss_function_for(TrainArguments(output_dir=str(tmp_path), report_to="none")) is None
    with pytest.raises(ValueError, match="z_loss_coefficient"):
        TrainArguments(output_dir=str(tmp_path), report_to="none", z_loss_coefficient=-1)
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        TrainArguments(output_dir=str(tmp_path), report_to="none", label_smoothing_factor=1.0)
