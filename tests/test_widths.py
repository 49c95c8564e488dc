"""Every width and channel multiplier a lesson's command line accepts builds a network that runs (issue: widths
such as 24 passed the check, then GroupNorm stopped with a traceback); what it refuses, it refuses in one line."""
import pytest
import torch

from conftest import load_lesson

WIDTHS = [1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 28, 36, 40, 44, 48, 52, 56, 80, 112]
MULTS = ["1,2", "1,2,4", "1,2,2,2", "1,3"]


@pytest.fixture(scope="module")
def lessons():
    return {key: load_lesson(name) for key, name in (("01", "01_ddpm_toy.py"), ("02", "02_ddpm.py"),
                                                     ("03", "03_conditional_ddpm.py"),
                                                     ("04", "04_ddim_fast_sampling.py"),
                                                     ("05", "05_latent_diffusion.py"))}


def accepted(module, argv, capsys):
    """parse_args(argv), or None when it refused in exactly one line with exit code 2."""
    try:
        return module.parse_args(argv)
    except SystemExit as exit_info:
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.code == 2 and len(lines) == 1, lines
        return None


@torch.no_grad()
def forward(model, size, *extra):
    x = torch.randn(2, model_channels(model), size, size)
    out = model(x, torch.tensor([0, 999]), *extra)
    assert out.shape == x.shape and torch.isfinite(out).all()


def model_channels(model):
    return next(module for module in model.modules() if isinstance(module, torch.nn.Conv2d)).in_channels


@pytest.mark.parametrize("key", ["02", "03", "04"])
def test_every_accepted_width_and_multiplier_builds_and_runs(lessons, key, capsys, tmp_path):
    module, built = lessons[key], 0
    for width in WIDTHS:
        for mults in MULTS if width <= 24 else MULTS[:1]:  # wide and deep together costs seconds, not coverage
            args = accepted(module, ["--width", str(width), "--channel-mults", mults, "--out", str(tmp_path)], capsys)
            if args is None:  # refused in one line
                continue
            size = 8 * (len(args.channel_mults) > 3) or 12  # halvable at every level
            if key == "03":
                model = module.ConditionalUNet(1, args.width, tuple(args.channel_mults), 1).eval()
                forward(model, size, torch.tensor([0, model.null_class]))
            else:
                forward(module.UNet(1, args.width, tuple(args.channel_mults), 1).eval(), size)
            built += 1
    assert built > 30  # most values are accepted now, and each of them ran


def test_lesson05_widths_build_and_run(lessons, capsys, tmp_path):
    module, built = lessons["05"], 0
    for width in WIDTHS:
        args = accepted(module, ["--width", str(width), "--autoencoder-width", str(width), "--out", str(tmp_path)],
                        capsys)
        if args is None:
            continue
        autoencoder = module.Autoencoder(1, args.autoencoder_width, args.latent_channels).eval()
        with torch.no_grad():
            mean, logvar = autoencoder.encode(torch.randn(2, 1, 12, 12))
            assert autoencoder.decode(mean).shape == (2, 1, 12, 12)
        forward(module.UNet(args.latent_channels, args.width, (1, 2), 3).eval(), 3)
        built += 1
    assert built > 10


def test_lesson01_widths(lessons, capsys, tmp_path):
    module, built = lessons["01"], 0
    for width in WIDTHS:
        args = accepted(module, ["--width", str(width), "--out", str(tmp_path)], capsys)
        if args is not None:
            forward(module.TinyUNet(1, args.width).eval(), 28)
            built += 1
    assert built >= 5
