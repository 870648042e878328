"""torch.compile of the model (fullgraph, inference and training)."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from helpers import NUM_CLASSES


def _compile_inference_and_training(backend, model_kwargs=None):
    torch.manual_seed(0)
    torch._dynamo.reset()
    eager = timm.create_model('dynamixer_nano', num_classes=NUM_CLASSES, **(model_kwargs or {}))
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 3, 5, 9])

    eager.eval()
    compiled = torch.compile(eager, fullgraph=True, backend=backend)  # fullgraph: a graph break raises
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)

    # one training step: same loss, gradients and updated weights as eager
    eager_t = copy.deepcopy(eager).train()
    comp_t = copy.deepcopy(eager).train()
    compiled_t = torch.compile(comp_t, fullgraph=True, backend=backend)
    # SGD: the update is linear in the gradient (Adam would blow float noise in tiny gradients up to lr)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager_t, comp_t)]
    losses = []
    for m, opt in zip((eager_t, compiled_t), opts):
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p0), p1 in zip(eager_t.named_parameters(), comp_t.parameters()):
        torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f'{name}: {m}')
        torch.testing.assert_close(p1, p0, rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_aot_eager():
    """No graph breaks in forward or backward (dynamo + AOTAutograd, no code generation)."""
    _compile_inference_and_training('aot_eager')


@pytest.mark.slow
def test_compile_fullgraph_inductor_nano():
    """Inductor's CPU code generation (the default backend); minutes of C++ compilation on 2 cores."""
    _compile_inference_and_training('inductor')

