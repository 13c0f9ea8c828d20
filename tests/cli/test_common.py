"""What every command shares: one-line errors with a suggestion for a typo, devices that exist."""

import pytest
import torch

from tests.cli.util import fails
from yunque.cli import main
from yunque.cli.common import check_device


def usage_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def test_a_mistyped_command_or_flag_gets_a_suggestion_and_its_help(capsys, tmp_path):
    err = usage_error(capsys, ["pretrian", "--out", str(tmp_path)])
    assert "did you mean 'pretrain'?" in err and "yunque --help" in err
    err = usage_error(capsys, ["pretrain", "--out", str(tmp_path), "--max-step", "5"])
    assert "unrecognized arguments: --max-step" in err and "did you mean '--max-steps'?" in err
    assert "see `yunque pretrain --help`" in err
    err = usage_error(capsys, ["sft", "--out", str(tmp_path), "--lora-rnak", "4"])
    assert "did you mean '--lora-rank'?" in err
    err = usage_error(capsys, ["generate", "m", "p", "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device, words", [("gpu", ["unknown device 'gpu'", "cpu, cuda"]),
                                           ("mps", ["'mps' is not available", "--device cpu"]),
                                           ("cuda:1", ["'cuda:1' is not available"])])
def test_devices_this_torch_lacks_are_one_line(capsys, base, device, words):
    with pytest.raises(ValueError, match=words[0]):
        check_device(device)
    fails(capsys, ["generate", str(base), "hi", "--device", device], *words)
    fails(capsys, ["perplexity", str(base), "--data", str(base / "config.json"), "--device", device], *words)
