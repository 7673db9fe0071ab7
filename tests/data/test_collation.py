"""Training batches: dynamic right padding, fixed padding, transformers' collators."""

from chatglm3_finetune.data.collation import DataCollatorForChatGLM

X = -100


def test_collator_pads_to_longest_or_to_max_length():
    features = [{"input_ids": [5, 6, 7], "labels": [X, 6, 7]}, {"input_ids": [8], "labels": [X]}]
    batch = DataCollatorForChatGLM()(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[X, 6, 7], [X, X, X]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert DataCollatorForChatGLM(pad_to_multiple_of=8)(features)["input_ids"].shape == (2, 8)
    assert DataCollatorForChatGLM(max_length=16)(features)["labels"].shape == (2, 16)


def test_works_with_transformers_data_collators(tiny_tokenizer):
    from transformers import DataCollatorForSeq2Seq

    features = [{"input_ids": [5, 6, 7], "labels": [X, 6, 7]}, {"input_ids": [8], "labels": [X]}]
    tiny_tokenizer.padding_side = "right"
    batch = DataCollatorForSeq2Seq(tiny_tokenizer, padding=True)(features)
    tiny_tokenizer.padding_side = "left"
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[X, 6, 7], [X, X, X]]
