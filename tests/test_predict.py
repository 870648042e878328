"""`dynamixer predict` and dynamixer.inference: top-k with class names, ImageNet names, ONNX files."""
import json
import os
import shutil

import pytest
import torch

from dynamixer.cli import main as cli_main
from dynamixer.data import preprocessing_transform
from dynamixer.inference import load_preprocessing, predict_onnx
from helpers import CLASS_NAMES, _image, _run_cli

pytestmark = pytest.mark.usefixtures('one_thread')



def test_predict_top_k_with_class_names(trained, folder, capsys, tmp_path):
    from dynamixer.data import eval_transform
    from dynamixer.inference import format_predictions, load_inference_model, preprocess, topk
    ckpt = os.path.join(trained['output'], 'last.pth')
    imgs = [str(folder / 'val' / 'a' / '0.png'), str(folder / 'val' / 'b' / '1.png')]
    gray = tmp_path / 'gray.png'
    _image(0, 3).convert('L').save(gray)
    assert cli_main(['predict', '-c', ckpt, *imgs, str(gray), '--json', '-k', '2']) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o['image'] for o in out] == imgs + [str(gray)]
    for o in out:
        assert {t['class'] for t in o['top']} == {'a', 'b'}
        assert sum(t['probability'] for t in o['top']) == pytest.approx(1.0, abs=1e-5)
    # the pieces agree with a plain forward pass
    model, info = load_inference_model(ckpt)
    batch, ok, failed = preprocess(imgs, eval_transform(model))
    assert batch.shape == (2, 3, 32, 32) and ok == imgs and not failed
    probs = model(batch).softmax(-1)
    ranked = topk(probs, info['class_names'], 1)
    assert ranked[0][0][1] == info['class_names'][int(probs[0].argmax())]
    text = format_predictions(imgs, ranked)
    assert text.splitlines()[0] == imgs[0] and text.splitlines()[1].strip().startswith('1. ')
    # a broken image among good ones: the others are still classified, the bad one reported
    (tmp_path / 'bad.jpg').write_text('nope')
    assert cli_main(['predict', '-c', ckpt, imgs[0], str(tmp_path / 'bad.jpg'), str(tmp_path / 'missing.png')]) == 1
    cap = capsys.readouterr()
    assert imgs[0] in cap.out and 'bad.jpg: not a readable image' in cap.err and 'image not found' in cap.err


def test_predict_imagenet_names_for_1000_classes(tmp_path, capsys):
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = timm.create_model('dynamixer_nano')  # 1000 classes, no class names saved
    save_file(model.state_dict(), str(tmp_path / 'w.safetensors'))
    _image(0, 0).save(tmp_path / 'x.png')
    assert cli_main(['predict', '-c', str(tmp_path / 'w.safetensors'), str(tmp_path / 'x.png'), '--json']) == 0
    top = json.loads(capsys.readouterr().out)[0]['top']
    from timm.data import ImageNetInfo
    names = [d.split(',')[0] for d in ImageNetInfo().label_descriptions()]
    assert all(t['class'] == names[t['index']] for t in top) and 'tench' in names[0]



def test_predict_onnx_matches_pytorch(onnx_export, model, image_files):
    from PIL import Image
    results = predict_onnx(onnx_export[0], image_files, topk=3, batch_size=2)
    transform = preprocessing_transform(load_preprocessing(onnx_export[0]))
    x = torch.stack([transform(Image.open(p)) for p in image_files])
    with torch.no_grad():
        probs = model(x).softmax(-1)
    top = probs.topk(3, dim=-1)
    assert len(results) == len(image_files)
    for res, p, idx in zip(results, top.values, top.indices):
        assert [i for i, _, _ in res] == idx.tolist()
        assert [name for _, name, _ in res] == [CLASS_NAMES[i] for i in idx]
        assert [prob for _, _, prob in res] == pytest.approx(p.tolist(), abs=1e-4)


def test_predict_cli_onnx_same_as_pytorch(onnx_export, checkpoint, image_files):
    """`dynamixer predict --onnx` prints the classes and probabilities of `dynamixer predict -c`."""
    images = [str(p) for p in image_files]
    rc_pt, out_pt = _run_cli('predict', *images, '-c', checkpoint, '-k', '4', '--json')
    rc_ox, out_ox = _run_cli('predict', *images, '--onnx', onnx_export[0], '-k', '4', '--json')
    assert rc_pt == 0 and rc_ox == 0
    pt, ox = json.loads(out_pt), json.loads(out_ox)
    assert [r['image'] for r in ox] == images
    for a, b in zip(pt, ox):
        assert [t['class'] for t in a['top']] == [t['class'] for t in b['top']]
        assert [t['index'] for t in a['top']] == [t['index'] for t in b['top']]
        assert [t['probability'] for t in b['top']] == pytest.approx([t['probability'] for t in a['top']], abs=1e-4)
    # and the text output, probabilities rounded to 0.01 %, is the same
    _, text_pt = _run_cli('predict', *images, '-c', checkpoint, '-k', '4')
    _, text_ox = _run_cli('predict', *images, '--onnx', onnx_export[0], '-k', '4')
    assert text_ox == text_pt


def test_predict_cli_onnx_errors(onnx_export, workdir, image_files, capsys):
    rc, _ = _run_cli('predict', str(image_files[0]), '--onnx', workdir / 'missing.onnx')
    assert rc == 2 and 'ONNX file not found' in capsys.readouterr().err
    lone = workdir / 'copy.onnx'
    shutil.copy(onnx_export[0], lone)
    rc, _ = _run_cli('predict', str(image_files[0]), '--onnx', lone)
    assert rc == 2 and 'copy.onnx.preprocessing.json not found' in capsys.readouterr().err
    with pytest.raises(SystemExit):  # exactly one of -c / --onnx
        _run_cli('predict', str(image_files[0]))

