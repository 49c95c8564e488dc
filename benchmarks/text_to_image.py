"""Text to image (examples/text_to_image.py): does the picture follow the prompt, and is the picture good?

    python examples/text_to_image.py                 # the default run (writes outputs/text_to_image/checkpoint.pt)
    python benchmarks/text_to_image.py               # this benchmark on it: about 25 minutes on 2 CPU cores

Every number is measured on the checkpoint's EMA model with the example's own sampler (guided DDIM, its default
steps and eta), the project's metrics classifier (utils.metrics, trained on the dataset's training split) and the
dataset's test split:

  - prompt accuracy: the share of samples whose left half and right half are both classified as the items the
    prompt names, separately for prompts of trained pairs and of the 20 held-out pairs (never drawn in training),
    each in both word orders; beside it the left-right swap rate (both halves classified, but on the wrong sides).
    The ceiling is the same classifier on real canvases composed of two test-split items; the floor is samples of
    the empty prompt scored against the same pairs' labels (what drawing without reading gets by chance);
  - quality: Frechet distance (FD) of the samples' halves (each 28x28 item on its own, as the lessons' samples)
    against the test split, minus the real-data floor at the same count, as benchmarks/quality.py reports it;
  - the attention maps' honesty: for each item word of a two-item prompt, the share of its cross-attention mass
    (attention.png's maps: the conditional pass, averaged over heads, the 4x7 blocks and sampling steps) that falls on the
    half of the canvas that the prompt gives it (chance 0.5);
  - is the conditioning alive: the denoising loss on canvases of held-out pairs made of test-split items, with
    their true captions, with the captions shuffled among the canvases, and with the empty prompt (the same noises
    and timesteps for all three);
  - a guidance sweep: prompt accuracy (trained and held-out prompts together) and FD minus floor at each scale;
  - the seam: the mean absolute step between the two columns either side of the middle, on real canvases, on their
    decodings through the autoencoder and on the samples, beside the mean step between neighbouring columns
    elsewhere in the items; and how far decoding a whole canvas at once lands from decoding each half alone.

Writes benchmarks/results/text_to_image_TAG.csv and .md (TAG: --results-tag, default cpu).
"""
import argparse
import random
import time
from pathlib import Path

import torch

from common import RESULTS, ROOT, load_lesson, write_results
from utils import data, metrics
from utils.runtime import load_checkpoint, pick_device, positive_int

t2i = load_lesson("examples/text_to_image.py")


def prompts_for(pairs, count, words):
    """`count` (left, right, caption) for `pairs` in turn, the word order alternating, so that each pair is
    asked for about equally often in both orders."""
    chosen = []
    for i in range(count):
        left, right = pairs[i % len(pairs)]
        chosen.append((left, right, t2i.caption(words, left, right, left_first=(i // len(pairs)) % 2 == 0)))
    return chosen


def draw(model, autoencoder, scale, captions, config, alpha_bars, guidance_scale, steps, eta, seed, device,
         batch=100, words=None):
    """Images [N, 1, 28, 56] for `captions`; with `words` (per caption, a list of (token position, side)), also
    the share of each listed token's attention mass on its own side, per token [M], in attention.png's maps (the
    coarsest blocks) and in maps averaged over every block: (images, own, own_every_block)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    args = argparse.Namespace(guidance_scale=guidance_scale, steps=steps, eta=eta)
    images, own, own_every = [], [], []
    for start in range(0, len(captions), batch):
        chunk = captions[start:start + batch]
        record = [] if words is not None else None
        images.append(t2i.sample(model, autoencoder, scale, chunk, config["vocab"], alpha_bars, args, generator,
                                 record).cpu())
        if record is not None:
            for every_block, shares in ((False, own), (True, own_every)):
                maps = t2i.attention_maps(record, (28, 56), every_block).cpu()  # [B, L, 28, 56]
                half = maps.shape[-1] // 2
                for row, listed in enumerate(words[start:start + batch]):
                    for position, side in listed:
                        mass = maps[row, position]
                        mine = mass[:, :half] if side == "left" else mass[:, half:]
                        shares.append((mine.sum() / mass.sum()).item())
    return torch.cat(images), torch.tensor(own), torch.tensor(own_every)


def item_token_positions(caption_text, words):
    """[(token position, side)] of the item nouns in a caption: "a sandal on the left and a bag on the right" ->
    [(2, "left"), (7, "right")] (position 0 is <start>)."""
    nouns = {phrase.split()[-1] for phrase in words}
    tokens = caption_text.split()
    found = []
    for i, word in enumerate(tokens):
        if word in nouns:
            side = next(w for w in tokens[i:] if w in ("left", "right"))
            found.append((i + 1, side))
    return found


def both_right(classifier, images, pairs, device):
    """(both halves right, swapped, left right, right right) shares for images [N, 1, 28, 56] of pairs [N, 2]."""
    _, left = metrics.predict(classifier, images[..., :28], device)
    _, right = metrics.predict(classifier, images[..., 28:], device)
    a, b = pairs[:, 0], pairs[:, 1]
    return (((left == a) & (right == b)).double().mean().item(), ((left == b) & (right == a)).double().mean().item(),
            (left == a).double().mean().item(), (right == b).double().mean().item())


def halves(images):
    """Canvases [N, 1, 28, 56] -> N items [N, 1, 28, 28]: the left half of even samples, the right of odd ones."""
    picked = [image[..., :28] if i % 2 == 0 else image[..., 28:] for i, image in enumerate(images)]
    return torch.stack(picked)


def seam_step(images):
    """Mean |column 27 - column 28| of canvases [N, 1, 28, 56], and the mean step between neighbouring columns
    inside the items (both halves, not across the middle)."""
    across = (images[..., 27] - images[..., 28]).abs().mean().item()
    inside = torch.cat([(images[..., 1:28] - images[..., :27]).abs().flatten(),
                        (images[..., 29:] - images[..., 28:55]).abs().flatten()]).mean().item()
    return across, inside


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "outputs/text_to_image/checkpoint.pt"))
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--samples", type=positive_int, default=1000, help="samples per measured group")
    parser.add_argument("--sweep", default="1,2,3,5", help="guidance scales of the sweep (3 reuses the main groups "
                                                           "when it is the checkpoint's default)")
    parser.add_argument("--sweep-samples", type=positive_int, default=1000, help="samples per sweep scale")
    parser.add_argument("--steps", type=positive_int, default=None, help="DDIM steps (default: the example's)")
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--results-tag", default="cpu")
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    checkpoint = load_checkpoint(args.checkpoint, t2i.LESSON)
    config = checkpoint["config"]
    autoencoder = t2i.autoencoder_from(config["autoencoder"], checkpoint["autoencoder"]).to(device)
    scale = config["autoencoder"]["scale"]
    model = t2i.TextToImage(len(config["vocab"]), config["width"])
    model.load_state_dict(checkpoint["ema"])
    model = model.to(device).eval()
    steps = args.steps or t2i.lesson05.DEFAULT_STEPS
    guidance = t2i.GUIDANCE_SCALE
    alpha_bars = t2i.lesson05.make_schedule(device, config["timesteps"])["alpha_bars"]
    classifier, classifier_accuracy = metrics.load_classifier(config["dataset"], args.data_dir, ROOT / "outputs/metrics", device)
    words = config["words"]
    test_set = data.load_dataset(config["dataset"], args.data_dir, "test", download=False)
    by_class = [torch.nonzero(test_set.labels == c).flatten() for c in range(10)]
    rows, n = [], args.samples

    def row(measure, value, ceiling=None):
        ratio = "" if ceiling is None else f"{value / ceiling:.3f}"
        rows.append({"measure": measure, "value": f"{value:.4f}" if isinstance(value, float) else value,
                     "ratio": ratio})
        print(f"{measure}: {rows[-1]['value']} {ratio}  ({time.perf_counter() - started:.0f} s)", flush=True)

    def fd_minus_floor(images):
        result = metrics.evaluate(halves(images), config["dataset"], data_dir=args.data_dir,
                                  cache_dir=ROOT / "outputs/metrics", device=str(device))
        return result["fd"] - result["fd_real_floor"], result

    # 1. the ceiling: real canvases of two test-split items, every ordered pair in turn
    rng = random.Random(args.seed)
    all_pairs = [(a, b) for a in range(10) for b in range(10) if a != b]
    real_pairs = torch.tensor([all_pairs[i % len(all_pairs)] for i in range(n)])
    picks = [(by_class[a][rng.randrange(len(by_class[a]))], by_class[b][rng.randrange(len(by_class[b]))])
             for a, b in real_pairs.tolist()]
    real = torch.stack([torch.cat([test_set.images[i], test_set.images[j]], dim=-1) for i, j in picks])
    ceiling = both_right(classifier, real, real_pairs, device)[0]
    row(f"ceiling: real test-split canvases, both halves right ({n})", ceiling, ceiling)
    with torch.no_grad():
        latents = torch.cat([autoencoder.encode(real[k:k + 500, ..., :28].to(device))[0] for k in range(0, n, 500)])
        latents_right = torch.cat([autoencoder.encode(real[k:k + 500, ..., 28:].to(device))[0]
                                   for k in range(0, n, 500)])
        canvas_latents = torch.cat([latents, latents_right], dim=-1)
        decoded = torch.cat([t2i.decode_canvas(autoencoder, canvas_latents[k:k + 500]).cpu() for k in range(0, n, 500)])
        whole = torch.cat([autoencoder.decode(canvas_latents[k:k + 500]).clamp(-1, 1).cpu() for k in range(0, n, 500)])
    row(f"ceiling through the autoencoder: the same canvases encoded and decoded ({n})",
        both_right(classifier, decoded, real_pairs, device)[0], ceiling)

    # 2. prompts of trained and of held-out pairs, at the default guidance; the empty prompt as the floor
    groups = {}
    for name, pairs in (("trained", t2i.trained_pairs()), ("held-out", sorted(t2i.HELD_OUT))):
        chosen = prompts_for(pairs, n, words)
        captions = [c for _, _, c in chosen]
        images, own, own_every = draw(model, autoencoder, scale, captions, config, alpha_bars, guidance, steps, args.eta,
                           args.seed, device, words=[item_token_positions(c, words) for c in captions])
        wanted = torch.tensor([(a, b) for a, b, _ in chosen])
        both, swap, left, right = both_right(classifier, images, wanted, device)
        groups[name] = (images, wanted)
        row(f"prompt accuracy, {name} pairs, guidance_scale {guidance:g} ({n})", both, ceiling)
        row(f"  swap rate (both items, wrong sides), {name}", swap)
        row(f"  left half right / right half right, {name}", f"{left:.4f} / {right:.4f}")
        row(f"  attention mass of item words on their own half, attention.png's maps (4x7 blocks), {name} "
            f"(chance 0.5)", own.mean().item())
        row(f"  the same, maps averaged over every block (7x14 too), {name}", own_every.mean().item())
    empty_images, _, _ = draw(model, autoencoder, scale, [""] * n, config, alpha_bars, guidance, steps, args.eta,
                           args.seed, device)
    row(f"floor: empty prompt scored against the trained pairs' labels ({n})",
        both_right(classifier, empty_images, groups["trained"][1], device)[0], ceiling)

    # 3. quality of the items drawn, against the lessons' real-data floor
    mixed = torch.cat([groups["trained"][0][:n // 2], groups["held-out"][0][:n - n // 2]])
    value, result = fd_minus_floor(mixed)
    row(f"FD - floor of the samples' halves, guidance_scale {guidance:g} ({n}; FD {result['fd']:.2f}, "
        f"floor {result['fd_real_floor']:.2f})", value)
    value, result = fd_minus_floor(empty_images)
    row(f"FD - floor of the empty prompt's halves ({n}; FD {result['fd']:.2f})", value)

    # 4. is the conditioning alive: the loss with true, shuffled and empty captions on held-out test canvases
    held = sorted(t2i.HELD_OUT)
    chosen = prompts_for(held, n, words)
    with torch.no_grad():
        items = []
        for a, b, _ in chosen:
            i, j = by_class[a][rng.randrange(len(by_class[a]))], by_class[b][rng.randrange(len(by_class[b]))]
            items.append(torch.cat([test_set.images[i], test_set.images[j]], dim=0))
        items = torch.stack(items)  # [n, 2, 28, 28]
        left = autoencoder.encode(items[:, :1].to(device))[0]
        right = autoencoder.encode(items[:, 1:].to(device))[0]
        z0 = torch.cat([left, right], dim=-1) * scale
        true = [c for _, _, c in chosen]
        shuffled = true[len(held) // 2:] + true[:len(held) // 2]  # another held-out pair's caption
        for name, captions in (("true captions", true), ("shuffled captions", shuffled), ("empty prompt", [""] * n)):
            tokens, mask = t2i.tokenize(captions, config["vocab"])
            generator = torch.Generator(device=device).manual_seed(args.seed + 7)
            losses = [t2i.loss_fn(model, z0[k:k + 250], tokens[k:k + 250].to(device), mask[k:k + 250].to(device),
                                  alpha_bars, generator).item() for k in range(0, n, 250)]
            row(f"denoising loss on held-out test canvases, {name} ({n})", sum(losses) / len(losses))

    # 5. guidance sweep: accuracy on trained and held-out prompts together, and FD - floor
    for value_text in args.sweep.split(","):
        s = float(value_text)
        if s == guidance and args.sweep_samples == n:
            images = mixed
            wanted = torch.cat([groups["trained"][1][:n // 2], groups["held-out"][1][:n - n // 2]])
        else:
            count = args.sweep_samples
            chosen = (prompts_for(t2i.trained_pairs(), count // 2, words)
                      + prompts_for(sorted(t2i.HELD_OUT), count - count // 2, words))
            images, _, _ = draw(model, autoencoder, scale, [c for _, _, c in chosen], config, alpha_bars, s, steps,
                             args.eta, args.seed, device)
            wanted = torch.tensor([(a, b) for a, b, _ in chosen])
        both = both_right(classifier, images, wanted, device)[0]
        fd, _ = fd_minus_floor(images)
        row(f"sweep guidance_scale {s:g}: prompt accuracy (half trained, half held-out; {len(images)}) "
            f"| FD - floor {fd:.2f}", both, ceiling)

    # 6. the seam
    for name, canvases in (("real canvases", real), ("decoded, each half alone", decoded),
                           ("samples", groups["trained"][0])):
        across, inside = seam_step(canvases)
        row(f"seam: mean |step| across the middle / between other neighbouring columns, {name}",
            f"{across:.4f} / {inside:.4f}")
    row("decoding the whole canvas at once instead: mean |pixel change|", (whole - decoded).abs().mean().item())

    footer = (f"`python benchmarks/text_to_image.py --samples {n} --sweep {args.sweep} --sweep-samples "
              f"{args.sweep_samples}` on {Path(args.checkpoint).relative_to(ROOT) if Path(args.checkpoint).is_relative_to(ROOT) else args.checkpoint} "
              f"(step {checkpoint['step']}), DDIM {steps} steps, eta {args.eta:g}, device {device}, "
              f"{(time.perf_counter() - started) / 60:.1f} min; metrics classifier test accuracy "
              f"{classifier_accuracy:.4f}. Ratios are to the ceiling.")
    write_results(rows, f"text_to_image_{args.results_tag}", footer, ratio_header="ratio to ceiling")


if __name__ == "__main__":
    main()
