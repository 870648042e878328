"""dynamixer.cli: every command is registered, documents itself and keeps its flags."""
import pytest

from dynamixer import cli


@pytest.mark.parametrize('command', list(cli.COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, '--help'])
    assert e.value.code == 0
    assert cli.COMMANDS[command][1].split()[0] in capsys.readouterr().out


def test_no_command_prints_the_list(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


def test_train_knows_the_left_digit_task_and_model_options(capsys):
    assert cli.main(['train', '--dataset', 'left-digit', '--canvas', '32', '--model-options',
                     '{"mixing": "static"}', '--print-config']) == 0
    out = capsys.readouterr().out
    assert 'dataset: left-digit' in out and 'canvas: 32' in out and 'mixing: static' in out
    assert cli.main(['train', '--model-options', '[1, 2]', '--print-config']) == 2
    assert 'model_options' in capsys.readouterr().err
