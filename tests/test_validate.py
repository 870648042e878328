"""`dynamixer validate`: accuracy against independent evaluations; damaged and malicious checkpoints."""
import json
import os

import pytest
import torch
from PIL import Image

from dynamixer.cli import main as cli_main
from dynamixer.data import DataError
from dynamixer.files import CheckpointError, read_checkpoint
from helpers import make_folder

pytestmark = pytest.mark.usefixtures('one_thread')



def _manual_eval(model, folder, class_names, logits_fn=None):
    """Independent top-1 / loss: the model's eval transform built by hand from its pretrained config."""
    import torchvision.transforms as T
    cfg = model.pretrained_cfg
    size = cfg['input_size'][-1]
    tf = T.Compose([T.Resize(int(size / cfg['crop_pct']), interpolation=T.InterpolationMode.BICUBIC),
                    T.CenterCrop(size), T.ToTensor(), T.Normalize(cfg['mean'], cfg['std'])])
    xs, ys = [], []
    for c, name in enumerate(class_names):
        for f in sorted(os.listdir(folder / 'val' / name)):
            with Image.open(folder / 'val' / name / f) as im:
                xs.append(tf(im.convert('RGB')))
            ys.append(c)
    with torch.no_grad():
        logits = (logits_fn or model)(torch.stack(xs))
    y = torch.tensor(ys)
    return (logits.argmax(1) == y).float().mean().item() * 100, torch.nn.functional.cross_entropy(logits, y).item()


def test_validate_authors_checkpoint_against_the_reference(folder, tmp_path):
    """An authors'-layout checkpoint ('module.' keys, pickled Namespace), labelled in folder order,
    scored against the slow float64 transcription of the spec (tests/reference.py)."""
    import argparse

    import timm

    from dynamixer.commands.validate import validate
    from reference import NANO, make_authors_state_dict, reference_logits
    w64 = make_authors_state_dict(**NANO, num_classes=2, scale=0.1)
    path = tmp_path / 'authors.pth.tar'
    torch.save({'state_dict': {'module.' + k: v.float() for k, v in w64.items()},
                'args': argparse.Namespace(model='dynamixer_nano')}, path)
    r = validate(str(path), str(folder), workers=0)
    top1, loss = _manual_eval(timm.create_model('dynamixer_nano', num_classes=2), folder, ['a', 'b'],
                              logits_fn=lambda x: reference_logits(w64, x.double()))
    assert r['images'] == 8 and r['top1'] == pytest.approx(top1) and r['loss'] == pytest.approx(loss, rel=1e-4)


def test_validate_matches_an_independent_evaluation(trained, folder, capsys):
    from dynamixer.checkpoint import load_model
    from dynamixer.commands.validate import validate
    ckpt = os.path.join(trained['output'], 'last.pth')
    r = validate(ckpt, str(folder), workers=0)
    model, info = load_model(ckpt)
    top1, loss = _manual_eval(model, folder, info['class_names'])
    assert r['images'] == 8 and r['top1'] == pytest.approx(top1) and r['loss'] == pytest.approx(loss, rel=1e-5)
    assert r['top5'] == 100.0  # two classes
    # the same through the command line, on the val folder itself and on the safetensors export
    assert cli_main(['validate', ckpt, str(folder / 'val'), '--workers', '0', '--json']) == 0
    assert json.loads(capsys.readouterr().out)['top1'] == pytest.approx(top1)
    st = os.path.join(trained['output'], 'model.safetensors')
    assert validate(st, str(folder), workers=0)['loss'] == pytest.approx(loss, rel=1e-5)


def test_validate_bare_state_dict_in_folder_order(trained, folder, tmp_path):
    """A checkpoint without class names (like the authors') labels by sorted folder names."""
    from dynamixer.commands.validate import validate
    sd = read_checkpoint(os.path.join(trained['output'], 'last.pth'))['state_dict']
    torch.save({'state_dict': {'module.' + k: v for k, v in sd.items()}}, tmp_path / 'bare.pth')
    r = validate(str(tmp_path / 'bare.pth'), str(folder), workers=0)
    r0 = validate(os.path.join(trained['output'], 'last.pth'), str(folder), workers=0)
    assert r['top1'] == r0['top1'] and r['loss'] == pytest.approx(r0['loss'])


def test_bad_checkpoints_for_validate_predict_resume(trained, folder, tmp_path, capsys):
    from dynamixer.commands.validate import validate
    good = os.path.join(trained['output'], 'last.pth')
    data = open(good, 'rb').read()
    (tmp_path / 'trunc.pth').write_bytes(data[: len(data) // 2])
    (tmp_path / 'zero.pth').write_bytes(b'')
    img = str(folder / 'val' / 'a' / '0.png')
    for bad in ('trunc.pth', 'zero.pth'):
        p = str(tmp_path / bad)
        with pytest.raises(CheckpointError):
            validate(p, str(folder), workers=0)
        assert cli_main(['predict', '-c', p, img]) == 2
        assert cli_main(['validate', p, str(folder)]) == 2
        assert cli_main(['train', '--resume', p]) == 2
    err = capsys.readouterr().err
    assert 'truncated' in err and 'empty' in err and 'Traceback' not in err
    # another model
    assert cli_main(['predict', '-c', good, '--model', 'dynamixer_s', img]) == 2
    assert 'does not fit' in capsys.readouterr().err
    assert cli_main(['train', str(folder), '--resume', good, '--model', 'dynamixer_s']) == 2
    assert 'resume with --model dynamixer_nano' in capsys.readouterr().err
    # another class count: the data has three classes, the checkpoint two
    three = make_folder(tmp_path / 'three', classes=('a', 'b', 'c'), n_train=4, n_val=2)
    assert cli_main(['train', str(three), '--resume', good]) == 2
    err = capsys.readouterr().err   # other data: refused before the classes are compared
    assert 'was trained on image folder' in err and f'--pretrained {good}' in err
    with pytest.raises(DataError, match='classes the checkpoint does not know: c'):
        validate(good, str(three), workers=0)
    # pickled code is refused, not run
    marker = tmp_path / 'pwned'
    torch.save({'state_dict': {}, 'evil': _Evil(str(marker))}, tmp_path / 'pickle.pth')
    with pytest.raises(CheckpointError, match='refused'):
        validate(str(tmp_path / 'pickle.pth'), str(folder), workers=0)
    assert cli_main(['predict', '-c', str(tmp_path / 'pickle.pth'), img]) == 2
    assert not marker.exists()


class _Evil:
    """Unpickling this would create a file: what a malicious checkpoint could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))

