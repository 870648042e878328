"""layout.py: the authors' key layout both ways, architecture from shapes, infer_variant."""
import pytest
import timm
import torch

from dynamixer import MODEL_ARGS, layout
from dynamixer.checkpoint import infer_variant
from helpers import nano, to_authors
from reference import MEDIUM, NANO, SMALL, make_authors_state_dict


@pytest.mark.parametrize('cfg', [NANO, SMALL, MEDIUM])
def test_authors_layout_round_trip(cfg):
    w = make_authors_state_dict(**cfg, num_classes=4, dtype=torch.float32) if cfg is NANO else {
        k: torch.empty(0) for k in make_authors_state_dict(**cfg, num_classes=4, dtype=torch.float32)}
    ours = layout.authors_to_ours(w)
    assert not layout.is_authors_layout(ours) and layout.is_authors_layout(w)
    assert to_authors(ours).keys() == w.keys()
    assert all(to_authors(ours)[k] is w[k] for k in w)


@pytest.mark.parametrize('name', list(MODEL_ARGS))
def test_converted_keys_are_the_models_keys_and_variant_is_inferred(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    sd = model.state_dict()
    authors = to_authors(sd)
    assert all(k.startswith(('patch_embed.', 'network.', 'norm.', 'head.')) for k in authors)
    assert layout.authors_to_ours(authors).keys() == sd.keys()
    assert infer_variant(sd) == name and infer_variant(authors) == name
    assert infer_variant({'state_dict': {'module.' + k: v for k, v in sd.items()}}) == name


def test_authors_names_match_the_spec():
    sd = nano().state_dict()
    a = to_authors(sd)
    assert a['patch_embed.proj.weight'] is sd['stem.proj.weight']
    assert a['network.1.proj.weight'] is sd['stages.1.downsample.proj.weight']       # a transition
    assert a['network.2.0.attn.mix_h.compress.weight'] is sd['stages.1.blocks.0.token_mixer.mix_h.reduce.weight']
    assert a['network.4.1.attn.mix_w.out.bias'] is sd['stages.3.blocks.1.token_mixer.mix_w.proj.bias']
    assert a['network.0.0.attn.mlp_c.weight'] is sd['stages.0.blocks.0.token_mixer.mix_c.weight']
    assert a['network.0.1.attn.reweight.fc1.weight'] is sd['stages.0.blocks.1.token_mixer.reweight.fc1.weight']
    assert a['network.3.1.mlp.fc2.weight'] is sd['stages.2.blocks.1.mlp.fc2.weight']


def test_architecture_read_from_shapes():
    arch = layout.architecture(nano(num_classes=7, in_chans=1, img_size=48).state_dict())
    args = MODEL_ARGS['dynamixer_nano']
    assert arch['depths'] == args['depths'] and arch['embed_dims'] == args['embed_dims']
    assert arch['downsamples'] == args['downsamples'] and arch['num_segments'] == args['num_segments']
    assert (arch['reduced_dim'], arch['patch_size'], arch['in_chans'], arch['num_classes']) == (2, 4, 1, 7)
    assert arch['mixing'] == 'dynamic' and arch['reweight'] is True
    static = layout.architecture(nano(mixing='static', reweight=False).state_dict())
    assert static['mixing'] == 'static' and static['reweight'] is False and static['num_segments'] == (4, 8, 8, 8)
    # other sizes, classes and channels are the same variant; other widths, d or mixing are not
    assert infer_variant(nano(num_classes=7, in_chans=1, img_size=48).state_dict()) == 'dynamixer_nano'
    assert infer_variant(nano(reduced_dim=4).state_dict()) is None
    assert infer_variant(nano(mixing='static').state_dict()) is None
    assert infer_variant(nano(embed_dims=(32, 128, 128, 128)).state_dict()) is None


def test_describe_and_mismatch():
    sd = nano(num_classes=3).state_dict()
    assert layout.describe(sd) == layout.describe(to_authors(sd)) == (
        'layers per stage (2, 2, 2, 2), widths (64, 128, 128, 128), transition before stage 2, 3 classes')
    assert layout.mismatch(sd, sd) is None
    other = nano(num_classes=5, in_chans=1).state_dict()
    assert 'stem.proj.weight' in layout.mismatch(sd, other)
    assert layout.mismatch(sd, other, first_conv='stem.proj') is None          # timm adapts it
    del other['norm.weight']
    assert 'checkpoint weights the model does not have (first: norm.weight)' in layout.mismatch(sd, other)


def test_unwrap_state_dict():
    w = {'a': torch.ones(1)}
    assert layout.unwrap_state_dict({'state_dict': {'module.a': w['a']}, 'state_dict_ema': w}) == w
    assert layout.unwrap_state_dict({'model': {'module.a': w['a']}}) == w
    assert layout.unwrap_state_dict(w) == w
