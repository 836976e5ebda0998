import pytest
from PIL import Image

from mimkit.cli import main
from mimkit.config import load_config
from mimkit.train.loop import pretrain

RECIPE = "configs/pretrain/mae_vit_tiny_cifar10.yaml"


@pytest.mark.parametrize("command", [[], ["pretrain"], ["visualize"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0 and "usage: mimkit" in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
    ("train.epocs=2", "mimkit: error: train.epocs: unknown key; did you mean train.epochs?\n"),
    ("train.batch_size=big", "mimkit: error: train.batch_size: expected int, got str 'big'\n"),
    ("model.depht=2", "mimkit: error: model.depht: unknown key; did you mean model.depth?\n"),
])
def test_bad_config_is_one_line(override, message, capsys, tmp_path):
    assert main(["pretrain", RECIPE, override, f"out_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == message


def test_print_config(capsys):
    assert main(["pretrain", RECIPE, "train.epochs=3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 3" in out and "embed_dim: 192" in out  # preset expanded


def test_visualize_a_checkpoint(tmp_path, capsys):
    cfg = load_config(RECIPE, ["model.depth=1", "model.decoder_depth=1", "train.max_steps=1", "data.limit=128",
                               "train.batch_size=32",
                               "train.vis_images=0", f"out_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}"])
    ckpt = pretrain(cfg)["checkpoint"]
    out = tmp_path / "recon.png"
    assert main(["visualize", str(ckpt), "--split", "test", "--num", "3", "--out", str(out)]) == 0
    with Image.open(out) as img:
        assert img.size == (4 * 128, 3 * 128)  # 4 panels of 32 px enlarged x4, 3 rows
    assert main(["visualize", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt: no such file" in capsys.readouterr().err


def test_data_that_cannot_train_is_one_line(tmp_path, capsys):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    common = [f"out_dir={tmp_path / 'run'}", "model.preset=mae_vit_tiny_cifar_patch4", "data.num_workers=0"]
    assert main(["pretrain", RECIPE, "data.dataset=folder", f"data.root={tmp_path / 'empty'}", *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mimkit: error: no image files (") and err.endswith(f"found under {tmp_path / 'empty'}\n")
    assert main(["pretrain", RECIPE, "data.limit=20", "train.batch_size=32", *common]) == 2
    assert capsys.readouterr().err == ("mimkit: error: the dataset has 20 images, fewer than one optimizer step "
                                       "needs (train.batch_size=32 x train.accum_steps=1 x 1 process(es))\n")


def test_interrupt_is_exit_130_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    import mimkit.train.loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mimkit.train.loop, "pretrain", interrupted)
    assert main(["pretrain", RECIPE]) == 130
    assert capsys.readouterr().err == "mimkit: interrupted\n"

    def bug(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(mimkit.train.loop, "pretrain", bug)
    with pytest.raises(ZeroDivisionError):
        main(["pretrain", RECIPE])


def test_overrides_may_follow_options_and_anything_else_is_refused(capsys):
    assert main(["pretrain", RECIPE, "--print-config", "train.epochs=3", "data.limit=7"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 3" in out and "limit: 7" in out
    with pytest.raises(SystemExit) as e:
        main(["pretrain", RECIPE, "--print-config", "stray"])
    assert e.value.code == 2 and "unrecognized arguments: stray" in capsys.readouterr().err
