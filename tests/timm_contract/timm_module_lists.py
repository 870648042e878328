"""timm's per-model tests that select models by timm's own module names or name patterns, run for
every DynaMixer model (collected only when named on the pytest command line, next to timm's
tests/test_models.py: see run_timm_tests.py).

timm picks the models of `test_model_forward_intermediates*` and
`test_prune_intermediate_layers_contract` from a list of its own modules (FEAT_INTER_FILTERS; it
runs the last without a CI marker, as it is slow) and leaves '*mixer_*' names out of `test_model_forward_features`
(NON_STD_FILTERS, meant for its MLP-Mixer family), so `-k dynamixer` alone never runs them for
an outside package's models. Here they are called as timm wrote them.
"""
import inspect

import pytest
import test_models  # timm's tests/test_models.py, collected first from the same folder
import timm

import dynamixer  # noqa: F401  (registers the models)

TIMM_TESTS = ['test_model_forward_features', 'test_model_forward_intermediates',
              'test_model_forward_intermediates_features', 'test_prune_intermediate_layers_contract']


@pytest.mark.parametrize('model_name', timm.list_models('dynamixer_*'))
@pytest.mark.parametrize('timm_test', TIMM_TESTS)
def test_dynamixer_in_timm_test(timm_test, model_name):
    test = getattr(test_models, timm_test)
    kwargs = {'batch_size': 1} if 'batch_size' in inspect.signature(test).parameters else {}
    test(model_name, **kwargs)
