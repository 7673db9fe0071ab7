"""What the plan reads of a run: the data's longest rows (from Arrow, never whole Python lists), the
caps when there is no data, the dtype the run's GPU would load, and a folder it cannot plan."""

import random
from types import SimpleNamespace

import pytest
import torch

from chatglm3_finetune.data.packing import pack_features
from chatglm3_finetune.plan.inputs import PlanInputError, TokenizedRecords, cap_rows, planned_dtype, read_config


def records(count=40, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randrange(5, 90)
        prompt = rng.randrange(1, n)
        ids = [rng.randrange(3, 500) for _ in range(n)]
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def targets(labels):
    return sum(1 for label in labels[1:] if label != -100)


@pytest.fixture(scope="module")
def dataset():
    import datasets

    # filtered, so that the dataset has an indices mapping over its Arrow table (as a truncation filter leaves it)
    return datasets.Dataset.from_list(records(60)).filter(lambda row: len(row["input_ids"]) != 17)


def test_lengths_and_targets_come_from_the_arrow_data(dataset):
    data = TokenizedRecords(dataset, batch_size=7)
    rows = dataset.to_list()
    assert data.lengths.tolist() == [len(r["input_ids"]) for r in rows]
    assert data.targets.tolist() == [targets(r["labels"]) for r in rows]
    typical = data.typical()
    assert typical["records"] == len(rows) and typical["tokens"] == pytest.approx(sum(data.lengths) / len(rows))


def test_the_planned_batch_is_the_longest_records(dataset):
    rows = dataset.to_list()
    longest = TokenizedRecords(dataset).longest_rows(3)
    assert [len(r.input_ids) for r in longest] == sorted((len(r["input_ids"]) for r in rows), reverse=True)[:3]
    assert list(longest[0].input_ids) in [r["input_ids"] for r in rows]


def test_packed_rows_are_finetunes_packing_fullest_rows(dataset):
    expected = sorted(pack_features(dataset.to_list(), 128), key=lambda r: -len(r["input_ids"]))[:2]
    planned = TokenizedRecords(dataset).packed_rows(128, 2)
    assert [len(r.input_ids) for r in planned] == [len(r["input_ids"]) for r in expected]
    assert all(sum(r.seq_lens) == len(r.input_ids) <= 128 for r in planned)


def test_without_data_the_rows_are_as_long_as_the_caps():
    caps = SimpleNamespace(train_format="input-output", resolved_format=None, max_seq_length=2048,
                           max_source_length=100, max_target_length=20)
    rows, source = cap_rows(caps, 2, 1000)
    assert len(rows) == 2 and len(rows[0].input_ids) == 121 and targets(rows[0].labels) == 21  # answer + eos
    caps.train_format = "multi-turn"
    rows, _ = cap_rows(caps, 1, 1000)
    assert len(rows[0].input_ids) == 2048 and targets(rows[0].labels) == 2046 and "caps" in source


def test_the_dtype_is_the_one_the_runs_gpu_loads():
    from chatglm3_finetune.model.loading import resolve_dtype

    assert planned_dtype("auto", frozen_base=True, use_cpu=False) == torch.bfloat16
    assert planned_dtype("auto", frozen_base=True, use_cpu=False, gpu_bf16=False) == torch.float16
    assert planned_dtype("auto", frozen_base=False, use_cpu=False) == torch.float32
    assert planned_dtype("float16", frozen_base=False, use_cpu=False) == torch.float16
    # full fine-tuning under DeepSpeed loads in its precision
    assert planned_dtype("auto", frozen_base=False, use_cpu=False, deepspeed_dtype=torch.bfloat16) == torch.bfloat16
    assert planned_dtype("auto", frozen_base=False, use_cpu=False, deepspeed_dtype=torch.float32) == torch.float32
    # on this machine (no GPU) a CPU run plans what loading does
    for frozen in (True, False):
        assert planned_dtype("auto", frozen, use_cpu=True) == resolve_dtype("auto", frozen, use_cpu=True)
        assert planned_dtype("auto", frozen, use_cpu=True, deepspeed_dtype=torch.bfloat16) == resolve_dtype(
            "auto", frozen, use_cpu=True, deepspeed_dtype=torch.bfloat16)


def test_an_original_chatglm3_folder_is_sent_to_the_converter():
    from conftest import shared_path

    with pytest.raises(PlanInputError, match="convert it once"):
        read_config(str(shared_path("chatglm3-tiny-original", "model")))


def test_a_folder_without_config_says_so(tmp_path):
    with pytest.raises(PlanInputError, match="no config.json"):
        read_config(str(tmp_path))
