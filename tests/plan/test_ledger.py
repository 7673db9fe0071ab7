"""The storage ledger and the fake-tensor machinery the plan runs on."""

import torch

from chatglm3_finetune.plan.fake_tensors import RealIndexTensors, fake_mode, on_meta, to_fake
from chatglm3_finetune.plan.ledger import StorageLedger


def test_a_view_is_counted_once_and_freed_with_its_last_tensor():
    ledger = StorageLedger()
    with ledger:
        x = torch.empty(1000, dtype=torch.float32)
        view = x.view(10, 100)[2:5]
        y = x.reshape(100, 10).t()
        x.add_(1)  # in place: the same storage
    assert ledger.total == 4000
    del x, y
    assert ledger.total == 4000  # the view keeps the storage alive
    del view
    assert ledger.total == 0
    assert ledger.peak.total == 4000


def test_parts_follow_the_phase_and_the_vocabulary_width():
    ledger = StorageLedger(vocab_size=50)
    with ledger:
        ledger.phase = "forward"
        kept = torch.empty(10, 8)
        ledger.phase = "backward"
        transient = torch.empty(4, 8)
        logits = torch.empty(3, 50)
    assert ledger.live["activations_saved"] == 320
    assert ledger.live["activations_transient"] == 128
    assert ledger.live["logits_and_loss"] == 600
    ledger.book(transient, "gradients")  # a storage booked again moves to the new part
    assert ledger.live["gradients"] == 128 and ledger.live["activations_transient"] == 0
    del kept, transient, logits


def test_allocations_round_up_to_the_allocator_block():
    ledger = StorageLedger(round_to=512)
    with ledger:
        small = torch.empty(3)  # 12 bytes
    assert ledger.total == 512
    del small


def test_a_fake_6b_sized_layer_costs_no_memory_but_is_counted():
    mode = fake_mode()
    with on_meta():
        layer = torch.nn.Linear(4096, 13696 * 2)
    to_fake(layer, mode)
    ledger = StorageLedger()
    ledger.book(layer.weight, "weights")
    with mode, RealIndexTensors(), ledger:
        out = layer(torch.empty(2048, 4096))
    assert ledger.live["weights"] == 4096 * 13696 * 2 * 4
    assert ledger.total == ledger.live["weights"] + 2048 * 4096 * 4 + 2048 * 27392 * 4  # + input + output
    assert out.shape == (2048, 27392)


def test_integer_tensors_stay_real_so_the_code_can_read_their_values():
    mode = fake_mode()
    with on_meta():
        embedding = torch.nn.Embedding(100, 16)
    to_fake(embedding, mode)
    labels = torch.tensor([[-100, -100, 5, 6, -100, 7]])
    with mode, RealIndexTensors():
        hidden = embedding(torch.tensor([[1, 2, 3, 4, 5, 6]]))
        is_target = labels != -100
        targets = hidden[is_target]  # a boolean mask over a fake tensor: its real positions decide the shape
        count = int(is_target.sum())
    assert not isinstance(is_target, torch._subclasses.fake_tensor.FakeTensor)
    assert count == 3 and targets.shape == (3, 16)


def test_on_meta_keeps_explicit_devices_off_real_memory():
    with on_meta():
        module = torch.nn.Linear(8, 8).to(torch.device("cpu"), torch.float64)
        made = torch.zeros(4, device="cpu")
    assert module.weight.is_meta and module.weight.dtype == torch.float64 and made.is_meta
