"""The capstone, examples/text_to_image.py: captions, tokenizer, text encoder, cross-attention with its padding
mask, guidance with the empty prompt, training that follows a caption, and the command line end to end."""
import numpy as np
import pytest
import torch

from conftest import class_pictures, load_lesson, run_in_process, write_idx

t2i = load_lesson("examples/text_to_image.py")
WORDS = t2i.ITEM_WORDS["fashion-mnist"]
VOCAB = t2i.vocabulary(WORDS)


def test_captions_name_both_sides_in_either_order_and_hold_out_pairs_with_their_swaps_trained():
    assert t2i.caption(WORDS, 5, 8) == "a sandal on the left and a bag on the right"
    assert t2i.caption(WORDS, 5, 8, left_first=False) == "a bag on the right and a sandal on the left"
    assert t2i.caption(WORDS, None, 1) == "trousers on the right"
    trained = set(t2i.trained_pairs())
    assert len(t2i.HELD_OUT) == 20 and len(trained) == 70 and not trained & t2i.HELD_OUT
    assert all((b, a) in trained for a, b in t2i.HELD_OUT)  # every held-out pair's swap is trained
    for item in range(10):  # every class on both sides in training
        assert sum(a == item for a, _ in trained) == 7 and sum(b == item for _, b in trained) == 7


def test_training_canvases_use_both_word_orders_single_items_and_only_trained_pairs():
    latents = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 4, 7, 7)  # item c's latent is all c
    blank = torch.full((1, 4, 7, 7), -1.0)
    by_class = [torch.tensor([c]) for c in range(10)]
    z0, captions = t2i.draw_canvases(2000, latents, by_class, blank, WORDS, torch.Generator().manual_seed(0))
    assert z0.shape == (2000, 4, 7, 14)
    index = {phrase: c for c, phrase in enumerate(WORDS)}
    orders, singles = set(), 0
    for canvas, text in zip(z0, captions):
        parts = [part.rsplit(" on the ", 1) for part in text.split(" and ")]
        sides = {side: index[item] for item, side in parts}
        left, right = canvas[0, 0, 0].item(), canvas[0, 0, 13].item()  # what the canvas holds on each side
        assert left == sides.get("left", -1) and right == sides.get("right", -1)
        if len(parts) == 1:
            singles += 1
        else:
            assert (sides["left"], sides["right"]) not in t2i.HELD_OUT
            orders.add(parts[0][1])
    assert orders == {"left", "right"} and 300 < singles < 500  # SINGLE_SHARE 0.2 of 2000


def test_tokenizer_pads_starts_every_prompt_and_refuses_an_unknown_word_in_one_line():
    tokens, mask = t2i.tokenize(["a bag on the left", ""], VOCAB)
    assert tokens.shape == mask.shape == (2, t2i.MAX_TOKENS)
    assert [VOCAB[i] for i in tokens[0, :6]] == ["<start>", "a", "bag", "on", "the", "left"]
    assert mask[0].tolist() == [True] * 6 + [False] * (t2i.MAX_TOKENS - 6)
    assert mask[1].tolist() == [True] + [False] * (t2i.MAX_TOKENS - 1)  # the empty prompt keeps <start>
    with pytest.raises(t2i.LessonError, match=r"the word 'hat' .* it knows: .*sandal") as error:
        t2i.tokenize(["a hat on the left"], VOCAB)
    assert "\n" not in str(error.value)


def test_padding_gets_exactly_zero_attention_and_changes_nothing():
    torch.manual_seed(0)
    encoder, block = t2i.TextEncoder(len(VOCAB)).eval(), t2i.CrossAttention(16, t2i.TEXT_DIM).eval()
    torch.nn.init.normal_(block.out.weight)  # not the zero start: the output must depend on the attention
    tokens, mask = t2i.tokenize(["a bag on the left"], VOCAB)
    x = torch.randn(1, 16, 7, 14)
    block.record = []
    with torch.no_grad():
        text = encoder(tokens, mask)
        out = block(x, text, mask)
        weights, size = block.record[0]
        assert size == (7, 14) and (weights[..., ~mask[0]] == 0).all()
        assert torch.allclose(weights.sum(-1), torch.ones(1, 98))
        # more padding (other garbage in the padded slots, and more of them) gives the same token vectors and output
        garbage = torch.cat([tokens[:, :6], torch.randint(0, len(VOCAB), (1, 6))], dim=1)
        longer_text = torch.cat([encoder(garbage, mask), torch.randn(1, 5, t2i.TEXT_DIM)], dim=1)
        longer_mask = torch.cat([mask, torch.zeros(1, 5, dtype=torch.bool)], dim=1)
        assert torch.allclose(encoder(garbage, mask)[:, :6], text[:, :6], atol=1e-6)
        assert torch.allclose(block(x, longer_text, longer_mask), out, atol=1e-6)


def test_the_empty_prompt_has_no_nan_and_takes_the_same_path_in_training_and_sampling():
    model = t2i.TextToImage(len(VOCAB), width=8)
    empty_tokens, empty_mask = t2i.tokenize([""], VOCAB)
    eps = model(torch.randn(2, 4, 7, 14), torch.tensor([3, 900]), empty_tokens.expand(2, -1), empty_mask.expand(2, -1))
    assert torch.isfinite(eps).all()
    tokens, mask = t2i.tokenize(["a bag on the left"] * 400, VOCAB)
    dropped_tokens, dropped_mask = t2i.drop_captions(tokens, mask, empty_tokens, empty_mask,
                                                     torch.Generator().manual_seed(0))
    dropped = (dropped_tokens != tokens).any(1)
    assert 20 < dropped.sum() < 60  # P_EMPTY = 0.1 of 400
    assert (dropped_tokens[dropped] == empty_tokens).all() and (dropped_mask[dropped] == empty_mask).all()
    assert (dropped_tokens[~dropped] == tokens[~dropped]).all()


def test_guidance_scale_means_diffusers_guidance_scale():
    """eps(empty) + s (eps(prompt) - eps(empty)): s = 0 the empty prompt, s = 1 the prompt, linear in s."""
    torch.manual_seed(0)
    model = t2i.TextToImage(len(VOCAB), width=8).eval()
    for parameter in model.parameters():  # no zero-initialised layer: the prompt must matter
        torch.nn.init.normal_(parameter, std=0.2)
    tokens, mask = t2i.tokenize(["a bag on the left", "a boot on the right"], VOCAB)
    empty_tokens, empty_mask = t2i.tokenize([""], VOCAB)
    z_t, t = torch.randn(2, 4, 7, 14), torch.tensor([10, 500])
    with torch.no_grad():
        text, empty = model.text_encoder(tokens, mask), model.text_encoder(empty_tokens, empty_mask)
        prompt_eps = model.unet(z_t, t, text, mask)
        empty_eps = model.unet(z_t, t, empty.expand(2, -1, -1), empty_mask.expand(2, -1))
        assert not torch.allclose(prompt_eps, empty_eps)
        for s in (0.0, 1.0, 3.0):
            guided = t2i.guided_eps(model, z_t, t, text, mask, empty, empty_mask, s)
            assert torch.allclose(guided, empty_eps + s * (prompt_eps - empty_eps), atol=1e-5)


def follow_rate(model, patterns, pairs, alpha_bars):
    """Share of canvases sampled for the captions of `pairs` (guided DDIM, 20 steps, scale 3) whose halves are
    both nearest to the patterns the caption names."""
    captions = [t2i.caption(WORDS, a, b, left_first=i % 2 == 0) for i, (a, b) in enumerate(pairs)]
    tokens, mask = t2i.tokenize(captions, VOCAB)
    empty_tokens, empty_mask = t2i.tokenize([""], VOCAB)
    model.eval()
    with torch.no_grad():
        text, empty = model.text_encoder(tokens, mask), model.text_encoder(empty_tokens, empty_mask)
        generator = torch.Generator().manual_seed(3)
        z_T = torch.randn((len(pairs),) + tuple(patterns.shape[1:-1]) + (2 * patterns.shape[-1],), generator=generator)
        z0, _ = load_lesson("05_latent_diffusion.py").ddim_sample(
            lambda z, t: t2i.guided_eps(model, z, t, text, mask, empty, empty_mask, 3.0), alpha_bars, z_T, 20, 0.0,
            generator)
    model.train()
    half = patterns.shape[-1]
    nearest = [torch.cdist(h.flatten(1), patterns.flatten(1)).argmin(1) for h in (z0[..., :half], z0[..., half:])]
    wanted = torch.tensor(pairs)
    return ((nearest[0] == wanted[:, 0]) & (nearest[1] == wanted[:, 1])).float().mean().item()


def test_a_tiny_model_trained_here_follows_two_item_captions_also_of_held_out_pairs():
    """The whole recipe (draw_canvases, caption dropout, loss_fn, guided DDIM) on ten fixed random 'items', each a
    [4, 2, 2] latent (the U-Net is convolutional, so a small canvas [4, 2, 4] trains in seconds). An untrained model
    draws the two named items on their sides almost never; after 250 steps it draws them for 8 in 10 captions or
    more, for the 20 held-out ordered pairs (never seen in training) as for 20 trained ones. Before training the
    zero-initialised cross-attention outputs make the caption change nothing; after it, the denoising loss with
    each canvas's own caption is below the loss with the captions shuffled among the canvases."""
    torch.manual_seed(0)
    patterns = 0.5 * torch.randn(10, 4, 2, 2)
    blank = torch.zeros(1, 4, 2, 2)
    by_class = [torch.tensor([c]) for c in range(10)]
    model = t2i.TextToImage(len(VOCAB), width=32)
    alpha_bars = load_lesson("05_latent_diffusion.py").make_schedule("cpu", 50)["alpha_bars"]
    held_out, trained = sorted(t2i.HELD_OUT), t2i.trained_pairs()[::3][:20]
    assert len(trained) == 20 and not set(trained) & t2i.HELD_OUT

    test_pairs = held_out * 4
    test_z0 = torch.stack([torch.cat([patterns[a], patterns[b]], dim=-1) for a, b in test_pairs])
    test_captions = [t2i.caption(WORDS, a, b, left_first=i % 2 == 0) for i, (a, b) in enumerate(test_pairs)]
    shuffled = test_captions[len(held_out) // 2:] + test_captions[:len(held_out) // 2]
    assert all(a != b for a, b in zip(test_captions, shuffled))

    def loss_with(captions):
        tokens, mask = t2i.tokenize(captions, VOCAB)
        with torch.no_grad():
            return t2i.loss_fn(model, test_z0, tokens, mask, alpha_bars, torch.Generator().manual_seed(5)).item()

    assert loss_with(test_captions) == loss_with(shuffled)  # zero-initialised outputs: the text is not read yet
    assert follow_rate(model, patterns, held_out, alpha_bars) <= 0.1
    assert follow_rate(model, patterns, trained, alpha_bars) <= 0.1

    generator, noise = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    empty_tokens, empty_mask = t2i.tokenize([""], VOCAB)
    for _ in range(250):
        z0, captions = t2i.draw_canvases(64, patterns, by_class, blank, WORDS, generator)
        tokens, mask = t2i.drop_captions(*t2i.tokenize(captions, VOCAB), empty_tokens, empty_mask, generator)
        loss = t2i.loss_fn(model, z0, tokens, mask, alpha_bars, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert follow_rate(model, patterns, held_out, alpha_bars) >= 0.8
    assert follow_rate(model, patterns, trained, alpha_bars) >= 0.8
    model.eval()
    true, wrong = loss_with(test_captions), loss_with(shuffled)
    assert true < wrong, (true, wrong)


def test_each_half_of_the_canvas_is_decoded_alone_as_it_was_encoded():
    """Decoding the two latents together would change the pictures everywhere (GroupNorm sees the whole canvas):
    decode_canvas gives exactly each item's own decoding, side by side."""
    torch.manual_seed(0)
    autoencoder = load_lesson("05_latent_diffusion.py").Autoencoder(1, 4, 4).eval()
    left, right = torch.randn(2, 4, 7, 7), torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        canvas = t2i.decode_canvas(autoencoder, torch.cat([left, right], dim=-1))
        apart = torch.cat([autoencoder.decode(left), autoencoder.decode(right)], dim=-1).clamp(-1, 1)
        together = autoencoder.decode(torch.cat([left, right], dim=-1)).clamp(-1, 1)
    assert canvas.shape == (2, 1, 28, 56) and torch.equal(canvas, apart)
    assert not torch.allclose(together[..., :20], apart[..., :20], atol=1e-3)  # far from the seam too


def assert_one_line_error(result, expected):
    """A run refused after parsing: exit code 1 and one line on stderr that says `expected`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and expected in lines[0], result.stderr


def write_fashion_like(data_dir):
    """A tiny 'Fashion-MNIST' in torchvision's layout: 512 training images whose class sets a square's place."""
    images, labels = class_pictures(512, seed=0)
    write_idx(data_dir / "FashionMNIST" / "raw" / "train-images-idx3-ubyte", images)
    write_idx(data_dir / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte", labels)
    return data_dir


def write_lesson05_checkpoint(path, dataset="fashion-mnist"):
    """A lesson 05 checkpoint with an untrained small autoencoder: what the capstone reads from it."""
    from utils.runtime import CHECKPOINT_FORMAT, save_checkpoint

    lesson05 = load_lesson("05_latent_diffusion.py")
    autoencoder = lesson05.Autoencoder(1, 4, 4)
    config = {"dataset": dataset, "classes": [], "channels": 1, "image_size": 28, "latent_size": 7,
              "autoencoder_width": 4, "latent_channels": 4, "timesteps": 25, "scale": 1.5}
    save_checkpoint({"format": CHECKPOINT_FORMAT, "lesson": lesson05.LESSON, "config": config, "step": 1,
                     "autoencoder": autoencoder.state_dict()}, path)
    return autoencoder


SAMPLING = ["--steps", "3", "--num-samples", "2", "--device", "cpu"]


def training_flags(tmp_path, out):
    return ["--autoencoder", tmp_path / "05.pt", "--data-dir", tmp_path / "data", "--out", out, "--width", "8",
            "--batch-size", "8", *SAMPLING]


def cli(capsys, *args):
    return run_in_process(t2i.main, "text_to_image.py", *map(str, args), capsys=capsys)


def test_command_line_trains_samples_resumes_and_refuses_in_one_line(tmp_path, capsys):
    write_fashion_like(tmp_path / "data")
    autoencoder = write_lesson05_checkpoint(tmp_path / "05.pt")
    before = {name: value.clone() for name, value in autoencoder.state_dict().items()}
    out = tmp_path / "out"
    train = training_flags(tmp_path, out)

    first = cli(capsys, *train, "--max-steps", "3", "--prompt", "a bag on the left and a boot on the right",
                "--prompt", "a top on the right")
    assert first.returncode == 0, first.stderr
    for name in ("checkpoint.pt", "samples.png", "samples.npz", "attention.png", "guidance.png", "loss.png",
                 "metrics.csv"):
        assert (out / name).stat().st_size > 0 and f"wrote {out / name}" in first.stdout
    saved = np.load(out / "samples.npz")
    assert saved["images"].shape == (4, 28, 56, 1)
    assert saved["captions"].tolist() == ["a bag on the left and a boot on the right"] * 2 + ["a top on the right"] * 2
    assert "20 ordered pairs held out" in first.stdout
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 3
    reloaded = torch.load(tmp_path / "05.pt", weights_only=True)["autoencoder"]
    assert all(torch.equal(reloaded[name], before[name]) for name in before)  # frozen: training did not touch it
    # the checkpoint carries that same frozen autoencoder, so it samples without lesson 05's file
    assert all(torch.equal(checkpoint["autoencoder"][name], before[name]) for name in before)

    resumed = cli(capsys, *train, "--max-steps", "5", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 5
    assert_one_line_error(cli(capsys, *train, "--max-steps", "5", "--resume"), "is at step 5 already")
    assert_one_line_error(cli(capsys, *train, "--max-steps", "7", "--resume", "--width", "16"), "--width 8")
    write_lesson05_checkpoint(tmp_path / "05_again.pt")  # lesson 05 trained again: other latents
    assert_one_line_error(cli(capsys, *train, "--max-steps", "7", "--resume", "--autoencoder", tmp_path / "05_again.pt"),
                          "another autoencoder")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 5  # the refusals changed nothing

    (out / "samples.npz").unlink()
    (tmp_path / "05.pt").rename(tmp_path / "05_moved.pt")
    sampled = cli(capsys, "--sample-only", "--out", out, *SAMPLING, "--prompt", "a sandal on the left")
    assert sampled.returncode == 0 and (out / "samples.npz").is_file(), sampled.stderr
    assert np.load(out / "samples.npz")["captions"].tolist() == ["a sandal on the left"] * 2
    (tmp_path / "05_moved.pt").rename(tmp_path / "05.pt")

    assert_one_line_error(cli(capsys, "--sample-only", "--out", out, *SAMPLING, "--prompt", "a hat on the left"),
                          "the word 'hat'")
    assert_one_line_error(cli(capsys, *train, "--prompt", "a hat on the left"), "the word 'hat'")
    assert_one_line_error(cli(capsys, *train, "--autoencoder", tmp_path / "missing.pt"),
                          "run python 05_latent_diffusion.py first")
    torch.save({"format": 1, "lesson": "02_ddpm"}, tmp_path / "02.pt")
    assert_one_line_error(cli(capsys, *train, "--autoencoder", tmp_path / "02.pt"),
                          "checkpoint of lesson 02_ddpm, not of 05_latent_diffusion; python 05_latent_diffusion.py")
    assert_one_line_error(cli(capsys, *train, "--resume", "--out", tmp_path / "empty"), "checkpoint")
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize("flags,named", [(["--width", "16"], "--width"), (["--lr", "0.1", "--epochs", "2"],
                                                                         "--epochs, --lr"),
                                         (["--autoencoder", "x.pt"], "--autoencoder")])
def test_sample_only_refuses_training_flags_it_would_ignore(flags, named, tmp_path, capsys):
    refused = cli(capsys, "--sample-only", "--out", tmp_path, *SAMPLING, *flags)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and named in lines[0] and "only in training" in lines[0], lines


def test_checkpoint_without_sample_only_is_refused(tmp_path, capsys):
    refused = cli(capsys, *training_flags(tmp_path, tmp_path / "out"), "--checkpoint", tmp_path / "c.pt")
    assert refused.returncode == 2 and "--resume" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_ctrl_c_while_training_saves_the_step_and_resume_finishes_the_run(tmp_path, capsys, monkeypatch):
    import os
    import signal

    write_fashion_like(tmp_path / "data")
    write_lesson05_checkpoint(tmp_path / "05.pt")
    out = tmp_path / "out"
    real, calls = t2i.loss_fn, []

    def loss_then_ctrl_c(*arguments):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, in the middle of step 3
        return real(*arguments)

    monkeypatch.setattr(t2i, "loss_fn", loss_then_ctrl_c)
    stopped = cli(capsys, *training_flags(tmp_path, out), "--max-steps", "6")
    message = stopped.stderr.strip().splitlines()[-1]  # after the progress bar's lines, one message
    assert stopped.returncode == 130 and "interrupted at step 3" in message and "--resume" in message, message
    assert "Traceback" not in stopped.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    assert not (out / "samples.png").exists()
    resumed = cli(capsys, *training_flags(tmp_path, out), "--max-steps", "6", "--resume")
    assert resumed.returncode == 0 and (out / "samples.png").is_file(), resumed.stderr
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 6


@pytest.mark.parametrize("scale", ["0", "0.5"])
def test_a_guidance_scale_below_1_is_refused_as_lesson_03_refuses_it(scale, tmp_path, capsys):
    """diffusers turns guidance off for guidance_scale <= 1 (the prompt alone); the formula here would move towards
    the empty prompt instead, so the same name must not take those values (issue 38; lesson 03 refuses them too)."""
    refused = cli(capsys, *training_flags(tmp_path, tmp_path / "out"), "--guidance-scale", scale)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "must be at least 1 (1: no guidance)" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_guidance_on_the_empty_prompt_alone_is_named_in_a_note(tmp_path, capsys):
    """eps(empty) + s (eps(empty) - eps(empty)) is eps(empty) for every s: --guidance-scale with only the empty
    prompt changes no sample, and the run says so rather than ignoring the flag without a word (issue 38); with
    a real prompt beside it there is no note."""
    write_fashion_like(tmp_path / "data")
    write_lesson05_checkpoint(tmp_path / "05.pt")
    train = [*training_flags(tmp_path, tmp_path / "out"), "--max-steps", "2"]
    empty = cli(capsys, *train, "--prompt", "", "--guidance-scale", "2")
    assert empty.returncode == 0, empty.stderr
    assert "note: --guidance-scale 2 changes nothing for the empty prompt" in empty.stdout
    both = cli(capsys, *train, "--out", tmp_path / "both", "--prompt", "", "--prompt", "a top on the left",
               "--guidance-scale", "2")
    assert both.returncode == 0 and "note: --guidance-scale" not in both.stdout, both.stderr
