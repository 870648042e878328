"""`dynamixer.onnx_graph`: the softmax rewrite of exported graphs keeps the function (ONNX Runtime
outputs before and after, on models whose mixing is far from uniform) and touches only its pattern."""
import collections
import warnings

import numpy as np
import pytest
import timm
import torch

import dynamixer  # noqa: F401  (registers the models)
from dynamixer.onnx_graph import softmax_on_last_axis

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')


def _raw_export(model: torch.nn.Module, opset: int = 20):
    """torch's dynamo export, without the project's rewrites (`export_onnx` applies them)."""
    x = torch.randn(2, model.in_chans, *model.img_size)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        program = torch.onnx.export(model.eval(), (x,), dynamo=True, input_names=['input'],
                                    output_names=['logits'], opset_version=opset, verbose=False,
                                    dynamic_shapes={'x': {0: torch.export.Dim('batch', min=1)}})
    return program.model_proto


def _run(proto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=['CPUExecutionProvider'])
    return sess.run(None, {'input': x})[0]


def _ops(proto):
    return collections.Counter(n.op_type for n in proto.graph.node)


@pytest.fixture(scope='module')
def peaked_model():
    """dynamixer_nano at 40x56 (non-square grids: 10 x 14, then 5 x 7 tokens) whose generators give
    peaked, input-dependent mixing matrices; the generator biases of the first op stay zero, so
    the exporter shares that initializer with other zero vectors (the rewrite must copy, not edit)."""
    torch.manual_seed(0)
    model = timm.create_model('dynamixer_nano', img_size=(40, 56), num_classes=7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if '.generate.' in name:
                if name.endswith('bias') and 'stages.0.blocks.0.' in name:
                    continue
                p.normal_(0, 1.0)
    return model.eval()


@pytest.mark.parametrize('opset', [20])
def test_rewrite_keeps_outputs_and_moves_every_mixing_softmax(peaked_model, opset):
    proto = _raw_export(peaked_model, opset)
    x = np.random.default_rng(0).standard_normal((3, 3, 40, 56)).astype(np.float32)
    before, ops_before = _run(proto, x), _ops(proto)
    dynamic_ops = sum(1 for m in peaked_model.modules() if type(m).__name__ == 'DynaMixerOp')
    assert softmax_on_last_axis(proto) == dynamic_ops
    onnx.checker.check_model(proto, full_check=True)
    after = _run(proto, x)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(after, peaked_model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-4)
    assert np.abs(before - before.mean(0)).max() > 1e-2, 'outputs should depend on the input'
    assert _ops(proto)['Transpose'] == ops_before['Transpose'] - dynamic_ops
    axes = [a.i for n in proto.graph.node if n.op_type == 'Softmax' for a in n.attribute if a.name == 'axis']
    assert -2 not in axes
    # nothing left behind: every initializer is read by a node
    used = {i for n in proto.graph.node for i in n.input}
    assert all(t.name in used for t in proto.graph.initializer)


def test_rewrite_leaves_other_graphs_alone():
    # static mixing: the softmax reads learned logits, not a generator -> not the pattern
    model = timm.create_model('dynamixer_nano', mixing='static', num_classes=5).eval()
    proto = _raw_export(model)
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    before, text = _run(proto, x), proto.SerializeToString()
    assert softmax_on_last_axis(proto) == 0
    assert proto.SerializeToString() == text
    np.testing.assert_array_equal(_run(proto, x), before)
