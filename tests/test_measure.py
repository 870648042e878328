"""dynamixer.measure: interleaved rounds, multiply-adds, agreement checks, markers in documents.
No timings asserted: only what is called, in which order, and what is counted."""
import math

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from dynamixer import measure
from dynamixer.commands import hub, info
from dynamixer.errors import DynaMixerError


def test_rounds_interleave_in_alternating_order_after_warmup():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in 'abc'}
    rounds = []
    times = measure.interleaved_rounds(fns, 3, warmup=1, timer=lambda fn: (fn(), len(calls))[1],
                                       after_round=rounds.append)
    assert calls == list('abc') + list('abc') + list('cba') + list('abc')
    assert rounds == [0, 1, 2] and times['a'] == [4, 9, 10] and times['c'] == [6, 7, 12]


def test_rounds_skip_and_report_a_failing_function():
    failed = {}

    def boom():
        raise MemoryError('out of memory')
    times = measure.interleaved_rounds({'ok': lambda: None, 'bad': boom, 'off': lambda: None}, 2,
                                       skip=lambda k: k == 'off', on_error=lambda k, e: failed.setdefault(k, e))
    assert len(times['ok']) == 2 and times['bad'] == [] and times['off'] == []
    assert list(failed) == ['bad'] and isinstance(failed['bad'], MemoryError)
    with pytest.raises(MemoryError):
        measure.interleaved_rounds({'bad': boom}, 1)
    assert math.isnan(measure.median([])) and measure.median([3.0, 1.0, 2.0]) == 2.0


def test_machine_info_says_what_a_figure_was_measured_on():
    data = measure.machine_info(torch.device('cpu'))
    assert {'torch', 'timm', 'dynamixer', 'threads', 'cpus', 'date', 'load_avg', 'allocator_env'} <= set(data)
    wall, cpu, (user, system, faults) = measure.timed_with_usage(lambda: sum(range(1000)))
    assert wall >= 0 and cpu >= 0 and user >= 0 and system >= 0 and faults >= 0


def test_count_macs_is_half_the_flop_count_and_the_same_for_every_caller():
    """One counter: info's GMACs and the hub card's MACs come from it."""
    m = timm.create_model('dynamixer_nano', num_classes=10).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        m(torch.randn(1, 3, 32, 32))
    assert measure.count_macs(m) == c.get_total_flops() // 2 == measure.count_macs(m, (3, 32, 32))
    assert hub.count_macs is measure.count_macs
    assert info.model_stats('dynamixer_nano')['gmacs'] == pytest.approx(measure.count_macs(
        timm.create_model('dynamixer_nano')) / 1e9, rel=0, abs=0)


def test_macs_match_an_independent_count():
    """A plain conv + Linear model: the arithmetic; forward + backward is three times forward for
    the Linear (output, input and weight gradients) and twice for a first conv (no input gradient)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10))
    conv, linear = 8 * 8 * 8 * 3 * 16, 8 * 8 * 8 * 10
    assert measure.count_macs(model, (3, 32, 32)) == conv + linear
    assert measure.count_macs(model.train(), (3, 32, 32), backward=True) == 2 * conv + 3 * linear
    assert all(p.grad is None for p in model.parameters())


def test_check_same_function_passes_copies_and_refuses_a_change():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))
    b = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4)
    assert max(measure.check_same_function(a, b, x, 1e-6).values()) == 0
    with torch.no_grad():
        b[2].bias += 1e-3
    with pytest.raises(DynaMixerError, match='differ'):
        measure.check_same_function(a, b, x, 1e-6)
    assert measure.max_abs_error(torch.ones(3), torch.zeros(3).numpy()) == 1.0


def test_update_markdown_replaces_only_its_section(tmp_path):
    doc = tmp_path / 'doc.md'
    assert measure.update_markdown(str(doc), 's', 'first') is False
    assert doc.read_text() == '<!-- dynamixer benchmark: s -->\nfirst\n<!-- /dynamixer benchmark: s -->\n'
    doc.write_text('before\n' + doc.read_text() + 'after\n')
    assert measure.update_markdown(str(doc), 's', 'second\n') is True
    assert doc.read_text() == ('before\n<!-- dynamixer benchmark: s -->\nsecond\n'
                               '<!-- /dynamixer benchmark: s -->\nafter\n')
    with pytest.raises(DynaMixerError, match='other'):
        measure.update_markdown(str(doc), 'other', 'x')
