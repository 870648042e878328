"""dynamixer.engine: devices, RNG state, evaluate, one training epoch, multiply-add counting."""
import copy
import random

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode
from timm.task import ClassificationTask, TrainingTask

from dynamixer import engine
from dynamixer.commands import hub, info
from dynamixer.engine import (NonFiniteLoss, Process, count_macs, evaluate, resolve_device, rng_state,
                              set_rng_state, train_one_epoch)


def test_count_macs_is_half_the_flop_count_and_the_same_for_every_caller():
    """One counter: info's GMACs and the hub card's MACs (README / BENCHMARKS numbers) come from it."""
    m = timm.create_model('dynamixer_nano', num_classes=10).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        m(torch.randn(1, 3, 32, 32))
    assert count_macs(m) == c.get_total_flops() // 2 == count_macs(m, (3, 32, 32))
    assert hub.count_macs is engine.count_macs
    assert info.model_stats('dynamixer_nano')['gmacs'] == pytest.approx(count_macs(
        timm.create_model('dynamixer_nano')) / 1e9, rel=0, abs=0)


def test_evaluate_matches_a_direct_computation():
    torch.manual_seed(0)
    model = nn.Linear(6, 7)
    x, y = torch.randn(23, 6), torch.randint(0, 7, (23,))
    loader = [(x[i:i + 5], y[i:i + 5]) for i in range(0, 23, 5)]
    r = evaluate(model, loader, torch.device('cpu'))
    logits = model(x).detach()
    top5 = logits.topk(5, 1).indices
    assert r['top1'] == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
    assert r['top5'] == pytest.approx(100 * (top5 == y[:, None]).any(1).float().mean().item())
    assert r['loss'] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-6)


def test_rng_state_round_trip():
    g = torch.Generator().manual_seed(5)
    engine.seed_epoch(1, 2, 0, g)
    state = rng_state(g)
    a = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=g))
    torch.manual_seed(99), np.random.seed(99), random.seed(99), g.manual_seed(99)
    set_rng_state(state, g)
    b = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=g))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and torch.equal(a[3], b[3])


class _ConstantLR:
    def step_update(self, step):
        pass


def _epoch(model, batches, accum=1, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    task = ClassificationTask(model, nn.CrossEntropyLoss(), verbose=False)
    return train_one_epoch(task, batches, len(batches) // accum, opt, _ConstantLR(), Process(), epoch=0, step=0,
                           accum=accum, **kw)


def test_train_one_epoch_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    ra = _epoch(a, [(x, y)])
    rb = _epoch(b, [(x[:4], y[:4]), (x[4:], y[4:])], accum=2)
    assert ra['step'] == rb['step'] == 1 and ra['images'] == rb['images'] == 8
    assert ra['train_loss'] == pytest.approx(rb['train_loss'], rel=1e-6)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_train_one_epoch_stops_on_a_non_finite_loss():
    model = nn.Linear(4, 3)
    batches = [(torch.randn(2, 4), torch.tensor([0, 1]))] * 3
    with pytest.raises(NonFiniteLoss) as e:
        _epoch(model, batches, loss_hook=lambda loss, step: loss * float('nan') if step == 1 else loss)
    assert e.value.step == 1 and e.value.epoch == 0


def test_resolve_device():
    assert resolve_device('cpu') == torch.device('cpu')
    if not torch.cuda.is_available():
        assert resolve_device('auto') == torch.device('cpu')
        with pytest.raises(engine.DeviceError, match='no CUDA'):
            resolve_device('cuda')


def test_to_device_recurses_into_lists_tuples_and_dicts():
    batch = ([torch.zeros(2), torch.ones(1)], [{'boxes': torch.zeros(1, 4), 'labels': torch.tensor([1]), 'id': 7}])
    moved = engine.to_device(batch, torch.device('meta'))
    assert isinstance(moved, tuple) and isinstance(moved[0], list) and isinstance(moved[1][0], dict)
    assert moved[0][0].device.type == moved[1][0]['boxes'].device.type == 'meta' and moved[1][0]['id'] == 7


class _ListTask(TrainingTask):
    """A detection-like task: a list of images and a list of target dicts; the loss is a regression."""

    def __init__(self, model):
        super().__init__(verbose=False)
        self.trainable_module = model

    def forward(self, images, targets):
        out = torch.stack([self.trainable_module(x) for x in images])
        return {'loss': ((out - torch.stack([t['y'] for t in targets])) ** 2).mean()}


def test_train_one_epoch_drives_any_task_and_counts_images_from_the_batch():
    """Lists of inputs and of target dicts reach the task; images are counted from the batch; the EMA
    follows the task's eval model; a task's loss is what is optimised."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    batches = [([torch.randn(3) for _ in range(5)], [{'y': torch.randn(2)} for _ in range(5)]) for _ in range(4)]
    ema = timm.utils.ModelEmaV3(model, decay=0.5)
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []  # the weights after each update
    r = train_one_epoch(_ListTask(model), batches, 2, opt, _ConstantLR(), Process(), epoch=0, step=0, accum=2, ema=ema,
                        on_step=lambda *a: seen.append(model.weight.detach().clone()))
    assert r['step'] == 2 and r['images'] == 20
    assert not torch.equal(seen[0], before['weight']) and not torch.equal(seen[1], seen[0])
    # timm's EMA copies the model at update 1 (step-based decay 0), then moves half-way (decay 0.5)
    expected = 0.5 * seen[0] + 0.5 * seen[1]
    assert torch.allclose(ema.module.weight, expected, atol=1e-6)
