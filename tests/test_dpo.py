"""Preference data and the DPO loss (issue 16): the pair ids equal transformers' own chat-template rendering
and assistant mask, bad pairs are counted (strict: file:line), truncation keeps the prompt, the loss on a
hand-made batch is the DPO formula, one step raises the chosen-minus-rejected margin, and LoRA runs without
a second model."""
from __future__ import annotations

import copy
import inspect
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from lmtrain.arguments import DPO_LOSS_TYPES, DPOTrainArguments, ModelArguments, PreferenceDataArguments
from lmtrain.data.preference import encode_pair, prepare_preference_data, record_to_pair
from lmtrain.data.sources import DataError

SYSTEM = {"role": "system", "content": "Answer briefly."}
PAIRS = [
    {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"},
    {"prompt": [SYSTEM, {"role": "user", "content": "What is 7 + 1?"}, {"role": "assistant", "content": "8"},
                {"role": "user", "content": "And plus 2?"}],
     "chosen": [{"role": "assistant", "content": "10"}], "rejected": [{"role": "assistant", "content": "9"}]},
    {"chosen": [{"role": "user", "content": "Repeat after me: to be"}, {"role": "assistant", "content": "to be"}],
     "rejected": [{"role": "user", "content": "Repeat after me: to be"}, {"role": "assistant", "content": "to to be"}]},
]


def reference_ids(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """prompt + reply ids and the reply's mask by transformers' apply_chat_template ({% generation %}
    markers), cut after the reply's end-of-turn token; only the last assistant turn is the reply."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    end = max(i for i, m in enumerate(mask) if m) + 1
    start = end - 1
    while mask[start - 1]:
        start -= 1
    return ids[:end], [int(start <= i < end) for i in range(end)]


@pytest.fixture(scope="module")
def plain_template_tokenizer(tiny_tokenizer):
    """The same ChatML template without {% generation %} markers: the spans come from prefix renderings."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", tokenizer.chat_template)
    return tokenizer


@pytest.mark.parametrize("marked", [True, False], ids=["generation_markers", "no_markers"])
def test_pair_ids_and_masks_equal_apply_chat_template(tiny_tokenizer, plain_template_tokenizer, marked):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    assert "generation" in tiny_tokenizer.chat_template  # the reference needs the markers
    tokenizer = tiny_tokenizer if marked else plain_template_tokenizer
    encoded = [encode_pair(tokenizer, *record_to_pair(p, f"pairs.jsonl:{i}"), max_length=256)
               for i, p in enumerate(PAIRS)]
    batch = DataCollatorForPreference(pad_token_id=tiny_tokenizer.pad_token_id)(
        [{k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for e in encoded])
    for i, pair in enumerate(PAIRS):
        prompt, chosen, rejected = record_to_pair(pair, "x")
        for row, reply in ((i, chosen), (len(PAIRS) + i, rejected)):  # the batch is [chosen..., rejected...]
            ids, mask = reference_ids(tiny_tokenizer, prompt + [reply])
            length = int(batch["attention_mask"][row].sum())
            assert batch["input_ids"][row, :length].tolist() == ids
            assert batch["completion_mask"][row, :length].tolist() == mask
            assert not batch["completion_mask"][row, length:].any()
        assert tiny_tokenizer.decode(encoded[i]["chosen_ids"]) == chosen["content"] + "<|im_end|>"


def test_truncation_keeps_the_prompt_and_cuts_the_replies_from_the_end(tiny_tokenizer):
    prompt, chosen, rejected = record_to_pair(
        {"prompt": "What is two plus three?", "chosen": "five " * 60, "rejected": "six " * 60}, "x")
    whole = encode_pair(tiny_tokenizer, prompt, chosen, rejected, max_length=1024)
    cut = encode_pair(tiny_tokenizer, prompt, chosen, rejected, max_length=40)
    assert not whole["truncated"] and cut["truncated"] and not cut["prompt_truncated"]
    assert cut["prompt_ids"] == whole["prompt_ids"]
    room = 40 - len(whole["prompt_ids"])
    assert cut["chosen_ids"] == whole["chosen_ids"][:room] and cut["rejected_ids"] == whole["rejected_ids"][:room]
    # A prompt too long to leave the replies a quarter of max_length loses its oldest tokens.
    long_prompt = record_to_pair({"prompt": "to be or not " * 40, "chosen": "yes", "rejected": "no"}, "x")
    full = encode_pair(tiny_tokenizer, *long_prompt, max_length=1024)
    short = encode_pair(tiny_tokenizer, *long_prompt, max_length=48)
    reply = max(len(full["chosen_ids"]), len(full["rejected_ids"]))
    assert short["prompt_truncated"] and short["prompt_ids"] == full["prompt_ids"][-(48 - min(reply, 48 // 4)):]
    assert short["chosen_ids"] == full["chosen_ids"] and short["rejected_ids"] == full["rejected_ids"]


BAD = {
    "identical_replies": {"prompt": "hi", "chosen": "hello", "rejected": "hello"},
    "empty_reply": {"prompt": "hi", "chosen": "  ", "rejected": "hello"},
    "bad_format": {"prompt": "hi", "chosen": "hello"},
    "unknown_role": {"prompt": [{"role": "usr", "content": "hi"}], "chosen": "a", "rejected": "b"},
    "non_string_content": {"prompt": [{"role": "user", "content": 3}], "chosen": "a", "rejected": "b"},
}


def test_bad_pairs_are_counted_and_strict_mode_names_file_and_line(tiny_tokenizer, write_jsonl):
    good = [PAIRS[0]] * 3
    path = write_jsonl(good + list(BAD.values()) + ['{"prompt": "broken', {"chosen": [], "rejected": "x"}])
    args = PreferenceDataArguments(train_files=[path], validation_split_percentage=0, max_length=64)
    data, report = prepare_preference_data(args, tiny_tokenizer)
    assert len(data["train"]) == report["train_pairs"] == 3
    assert report["dropped"] == {"identical_replies": 1, "empty_reply": 1, "bad_format": 2, "unknown_role": 1,
                                 "non_string_content": 1, "malformed_json": 1}
    for reason in BAD:
        strict = PreferenceDataArguments(train_files=[write_jsonl(good + [BAD[reason]], f"{reason}.jsonl")],
                                         validation_split_percentage=0, lenient=False)
        with pytest.raises(DataError, match=re.escape(f"{reason}.jsonl:{len(good) + 1}: ")):
            prepare_preference_data(strict, tiny_tokenizer)
    sft_file = write_jsonl([{"messages": [{"role": "user", "content": "hi"}]}] * 3, "sft.jsonl")
    with pytest.raises(DataError, match="no record is a preference pair"):
        prepare_preference_data(PreferenceDataArguments(train_files=[sft_file]), tiny_tokenizer)


def test_loss_types_are_trls():
    from trl.trainer.dpo_trainer import DPOTrainer

    source = inspect.getsource(DPOTrainer._compute_loss)
    assert set(re.findall(r'loss_type == "(\w+)"', source)) == set(DPO_LOSS_TYPES)
    with pytest.raises(ValueError, match="not a DPO loss"):
        DPOTrainArguments(output_dir="unused", loss_type=["sigmod"], report_to="none")


@pytest.mark.parametrize("options", [{"label_smoothing": 0.1}, {"label_smoothing_factor": 0.1}],
                         ids=["label_smoothing_with_sigmoid", "label_smoothing_factor"])
def test_loss_options_the_dpo_loss_ignores_are_refused(options):
    """TRL's sigmoid loss never reads label_smoothing, nor DPOTrainer's loss the Trainer's label smoother."""
    with pytest.raises(ValueError, match="ignore"):
        DPOTrainArguments(output_dir="unused", report_to="none", **options)
    DPOTrainArguments(output_dir="unused", report_to="none", loss_type=["robust"], label_smoothing=0.1)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from conftest import TINY_MODEL
    from lmtrain.model.config import resolve_config

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_model")
    config = resolve_config("qwen2-tiny", f"{TINY_MODEL},vocab_size={len(tiny_tokenizer)}")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


def make_trainer(model_dir, tokenizer, tmp_path, pairs, lora: bool = False, **options):
    from datasets import Dataset

    from lmtrain.arguments import LoraArguments
    from lmtrain.model.building import build_model
    from lmtrain.model.lora import apply_lora
    from lmtrain.training.preference import build_preference_trainer, build_reference_model

    args = DPOTrainArguments(**{"output_dir": str(tmp_path / "out"), "report_to": "none", "max_steps": 1,
                                "per_device_train_batch_size": len(pairs), "learning_rate": 1e-2,
                                "save_strategy": "no", "plot_curves": False, "logging_steps": 1, "disable_tqdm": True,
                                "dataloader_num_workers": 0, **options})
    model_args = ModelArguments(model_name_or_path=str(model_dir))
    model = build_model(model_args, tokenizer)
    if lora:
        model = apply_lora(model, LoraArguments(use_lora=True, lora_r=4, lora_dropout=0.0))
    reference = build_reference_model(model_args, tokenizer, args, lora)
    encoded = [encode_pair(tokenizer, *record_to_pair(p, "x"), max_length=128) for p in pairs]
    dataset = Dataset.from_list([{k: e[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for e in encoded])
    return build_preference_trainer(model, reference, tokenizer, args, dataset)


def sequence_logps(model, batch) -> torch.Tensor:
    """Sum of the log-probs of the completion tokens, from full logits (independent of TRL's fused head)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    token_logps = torch.gather(F.log_softmax(logits.float(), -1), 2, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * batch["completion_mask"][:, 1:]).sum(-1)


def first_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_on_a_hand_made_batch_is_the_dpo_formula(tiny_model_dir, tiny_tokenizer, tmp_path, loss_type):
    beta = 0.3
    trainer = make_trainer(tiny_model_dir, tiny_tokenizer, tmp_path, PAIRS, beta=beta, loss_type=[loss_type])
    torch.manual_seed(1)
    with torch.no_grad():  # move the policy away from the reference, so the log-ratios are not all 0
        for parameter in trainer.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    batch = first_batch(trainer)
    batch.pop("num_real_tokens", None)
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    policy, reference = sequence_logps(trainer.model, batch), sequence_logps(trainer.ref_model, batch)
    pc, pr = policy.chunk(2)
    rc, rr = reference.chunk(2)
    if loss_type == "sigmoid":
        expected = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    else:  # IPO, per-token normalized as TRL (and the IPO authors) do
        chosen_len, rejected_len = batch["completion_mask"].sum(-1).chunk(2)
        expected = (((pc - rc) / chosen_len - (pr - rr) / rejected_len) - 1 / (2 * beta)).pow(2).mean()
    assert abs(expected.item()) > 1e-3
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)


def test_one_step_raises_the_chosen_minus_rejected_margin(tiny_model_dir, tiny_tokenizer, tmp_path):
    trainer = make_trainer(tiny_model_dir, tiny_tokenizer, tmp_path, PAIRS, warmup_steps=0,
                           lr_scheduler_type="constant")
    batch = first_batch(trainer)
    before = sequence_logps(trainer.model, batch)
    torch.testing.assert_close(before, sequence_logps(trainer.ref_model, batch))  # the reference is the start
    trainer.train()
    after = sequence_logps(trainer.model, batch)
    margin = lambda logps: (logps.chunk(2)[0] - logps.chunk(2)[1])  # noqa: E731
    assert (margin(after) > margin(before)).all()
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # step 1: policy == reference, rewards 0
    assert {"rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
            "tokens_per_second_per_device"} <= set(first)


def test_lora_dpo_has_no_second_model(tiny_model_dir, tiny_tokenizer, tmp_path, caplog):
    with caplog.at_level("INFO", logger="lmtrain.training.preference"):
        trainer = make_trainer(tiny_model_dir, tiny_tokenizer, tmp_path, PAIRS, lora=True, warmup_steps=0,
                               lr_scheduler_type="constant")
    assert "reference: the base model with the LoRA adapter switched off" in caplog.text
    assert trainer.ref_model is None
    assert list(trainer.model.peft_config) == ["default"]  # no frozen copy of the adapter either
    batch = first_batch(trainer)
    base = sequence_logps(trainer.model.get_base_model(), batch)
    trainer.train()
    with trainer.model.disable_adapter():  # what DPOTrainer scores the reference with
        torch.testing.assert_close(sequence_logps(trainer.model, batch), base)
    after = sequence_logps(trainer.model, batch)
    assert ((after.chunk(2)[0] - after.chunk(2)[1]) > (base.chunk(2)[0] - base.chunk(2)[1])).all()


def test_json_array_and_parquet_pairs_read_like_jsonl(tiny_tokenizer, write_jsonl, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(PAIRS[:2])
    array = tmp_path / "pairs.json"
    array.write_text(json.dumps(PAIRS[:2]))
    parquet = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
                                         for p in PAIRS[1:2]] * 2), parquet)  # message-list columns
    read = [prepare_preference_data(PreferenceDataArguments(train_files=[str(path)], validation_split_percentage=0),
                                        tiny_tokenizer)[0]["train"] for path in (jsonl, array)]
    assert read[0].to_list() == read[1].to_list()
    from_parquet = prepare_preference_data(PreferenceDataArguments(train_files=[str(parquet)],
                                                                   validation_split_percentage=0), tiny_tokenizer)
    assert from_parquet[0]["train"].to_list() == [read[0][1]] * 2


def test_validation_files_without_an_eval_strategy_are_reported(caplog):
    """The held-out pairs are scored only with an --eval_strategy; a run given them without one says so."""
    from lmtrain.cli.dpo import warn_unused_validation

    data = PreferenceDataArguments(train_files=["train.jsonl"], validation_files=["held_out.jsonl"])
    with caplog.at_level("WARNING", logger="dpo"):
        assert warn_unused_validation(data, DPOTrainArguments(output_dir="unused", report_to="none"))
    assert "held_out.jsonl: not evaluated" in caplog.text and "--eval_strategy" in caplog.text
    evaluating = DPOTrainArguments(output_dir="unused", report_to="none", eval_strategy="steps", eval_steps=5)
    assert not warn_unused_validation(data, evaluating)


def test_validation_files_of_a_dataset_dict_read_its_held_out_split(tiny_tokenizer, tmp_path):
    """The same save_to_disk DatasetDict (or hub dataset) as train and validation files: train pairs from its
    train split, held-out pairs from its test split, not the train split twice."""
    from datasets import Dataset, DatasetDict

    saved = tmp_path / "pairs_dict"
    DatasetDict({"train": Dataset.from_list([PAIRS[0]] * 3), "test": Dataset.from_list([PAIRS[1]])}).save_to_disk(saved)
    args = PreferenceDataArguments(train_files=[str(saved)], validation_files=[str(saved)])
    data, report = prepare_preference_data(args, tiny_tokenizer, evaluate=True)
    assert (report["train_pairs"], report["validation_pairs"]) == (3, 1)
    expected = encode_pair(tiny_tokenizer, *record_to_pair(PAIRS[1], "x"), max_length=args.max_length)
    assert data["validation"][0]["chosen_ids"] == expected["chosen_ids"]
    DatasetDict({"train": Dataset.from_list([PAIRS[0]] * 3)}).save_to_disk(tmp_path / "train_only")
    with pytest.raises(DataError, match="no validation or test split"):
        prepare_preference_data(PreferenceDataArguments(train_files=[str(saved)],
                                                        validation_files=[str(tmp_path / "train_only")]),
                                tiny_tokenizer, evaluate=True)


def test_a_tokenizer_without_a_chat_template_is_a_data_error(tiny_tokenizer, write_jsonl):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    args = PreferenceDataArguments(train_files=[write_jsonl(PAIRS)], validation_split_percentage=0)
    with pytest.raises(DataError, match="has no chat template"):
        prepare_preference_data(args, tokenizer)


def test_lora_with_precomputed_reference_says_so(tiny_model_dir, tiny_tokenizer, tmp_path, caplog):
    with caplog.at_level("INFO", logger="lmtrain.training.preference"):
        trainer = make_trainer(tiny_model_dir, tiny_tokenizer, tmp_path, PAIRS, lora=True,
                               precompute_ref_log_probs=True)
    assert "ref_chosen_logps" in trainer.train_dataset.column_names  # scored before training, not per step
    assert "reference: log-probs of the starting model, computed before training" in caplog.text


def test_compile_layers_reaches_the_policy_not_the_reference(tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    """dpo.py accepted --compile_layers and did nothing with it: the policy's layers are compiled, the frozen
    reference (no backward) is left as loaded."""
    import lmtrain.model.compiling as compiling

    compiled = []
    monkeypatch.setattr(compiling, "compile_decoder_layers", lambda model: compiled.append(model) or 2)
    trainer = make_trainer(tiny_model_dir, tiny_tokenizer, tmp_path, PAIRS, compile_layers=True)
    assert compiled == [trainer.model] and trainer.ref_model is not trainer.model
