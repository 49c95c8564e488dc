"""Capstone: text to image. Stable Diffusion in miniature, trained from scratch on a laptop.

Papers: Rombach, Blattmann, Lorenz, Esser & Ommer, "High-Resolution Image Synthesis with Latent Diffusion
        Models", 2022, arXiv:2112.10752 (Section 3.3: conditioning by cross-attention; Section 4.3.1: a transformer
        text encoder trained jointly from scratch); Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022,
        arXiv:2207.12598; Vaswani et al., "Attention Is All You Need", 2017, arXiv:1706.03762; Hertz et al.,
        "Prompt-to-Prompt Image Editing with Cross Attention Control", 2022, arXiv:2208.01626 (attention maps).
Builds on: lesson 05 (its trained autoencoder, frozen, and its latent U-Net, schedule and DDIM), lesson 03
(classifier-free guidance), lesson 04 (DDIM).
New here:
  - prompts that a class label cannot express: two Fashion-MNIST items side by side, "a sandal on the left and a
    bag on the right", in either word order, some pairs never seen in training;
  - a word tokenizer and a small transformer text encoder with a padding mask, trained with the U-Net;
  - cross-attention: the U-Net's image features ask the prompt's token vectors what to draw where;
  - guidance away from the empty prompt, and attention.png: where the image looked at each word.
Left out: a pretrained text encoder (no CLIP can be downloaded here, and the paper's own text-to-image model
trained its transformer from scratch too), a vocabulary beyond the grammar's words, and images larger than 28x56.

CPU:  python 05_latent_diffusion.py, then python examples/text_to_image.py    about 18-21 min on 2 cores (after lesson 05)
GPU:  python examples/text_to_image.py --device cuda    (not yet timed on a GPU)
Writes to outputs/text_to_image/: checkpoint.pt, samples.png (each prompt above its pictures), samples.npz
(images and captions), attention.png, guidance.png, loss.png, metrics.csv.
"""
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere: lessons and utils live one folder up

from examples.lessons import load_lesson  # noqa: E402
from utils import data, visualize  # noqa: E402
from utils.runtime import (  # noqa: E402
    CHECKPOINT_FORMAT, ArgumentParser, LessonError, StopRequest, TrainingLog, check_finite, checkpoint_due,
    load_checkpoint, make_out_dir, non_negative_float, pick_device, positive_float, positive_int, run,
    same_weights, save_checkpoint, set_learning_rate, stopped_early, warmup_learning_rate, writable_dir,
)

lesson05 = load_lesson("05_latent_diffusion.py")

LESSON = "text_to_image"
# The words of each dataset's ten classes, with the article a caption puts before them.
ITEM_WORDS = {
    "fashion-mnist": ["a top", "trousers", "a pullover", "a dress", "a coat", "a sandal", "a shirt", "a sneaker",
                      "a bag", "a boot"],
    "mnist": ["a zero", "a one", "a two", "a three", "a four", "a five", "a six", "a seven", "an eight", "a nine"],
}
PAD, START = "<pad>", "<start>"  # <start> begins every prompt, the empty one too: no softmax is over nothing
MAX_TOKENS = 12  # <start> + "a sandal on the left and a bag on the right"
# Ordered pairs (left, right) never drawn in training: (a, a + 1) and (a, a + 3), modulo 10. Their swaps,
# (a + 1, a) and (a + 3, a), are trained, and every class is on each side in 7 trained pairs.
HELD_OUT = frozenset((a, (a + d) % 10) for a in range(10) for d in (1, 3))
SINGLE_SHARE = 0.2  # captions that name one item; the other half of the canvas is empty
P_EMPTY = 0.1  # captions replaced by the empty prompt in training, so that one network is also unconditional
TEXT_DIM, TEXT_LAYERS, HEADS = 64, 2, 4
GUIDANCE_SCALE = 3.0  # diffusers' guidance_scale = 1 + w of lesson 03
SWEEP_SCALES = (1.0, 2.0, 3.0, 5.0)  # guidance.png
DEFAULT_PROMPTS = ["a sandal on the left and a bag on the right", "a bag on the right and a sandal on the left",
                   "a boot on the left", "trousers on the right and a dress on the left"]
TRAINING_FLAGS = ("autoencoder", "data_dir", "epochs", "max_steps", "batch_size", "lr", "width", "ema_decay")
WARMUP_STEPS, GRAD_CLIP, LOG_EVERY, CHECKPOINT_EVERY = 200, 1.0, 50, 500  # as in lesson 05


# --- arguments ---

def parse_args(argv=None):
    parser = ArgumentParser(prog="python examples/text_to_image.py",
                            description="Text to image on lesson 05's frozen autoencoder: a text encoder, "
                                        "cross-attention and guidance, trained from scratch.")
    parser.add_argument("--autoencoder", default="outputs/05_latent_diffusion/checkpoint.pt",
                        help="lesson 05's checkpoint: its autoencoder is used, frozen, and its dataset")
    parser.add_argument("--data-dir", default="data", help="folder holding datasets in torchvision's layout")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive_int, default=8, help="passes over 60000 training canvases")
    length.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps instead")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="canvases per step")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate (LDM: 1e-4 to 2e-4)")
    parser.add_argument("--width", type=positive_int, default=32, help="U-Net channels (LDM: 320)")
    parser.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay (lesson 02's warm-up applies)")
    parser.add_argument("--prompt", action="append", default=None,
                        help=f"a prompt to draw; give it more than once (default: {len(DEFAULT_PROMPTS)} prompts)")
    parser.add_argument("--guidance-scale", type=non_negative_float, default=GUIDANCE_SCALE,
                        help="diffusers' guidance_scale s: eps = eps(empty) + s (eps(prompt) - eps(empty)); "
                             "at least 1, which is no guidance (as lesson 03's --guidance-scale)")
    parser.add_argument("--steps", type=positive_int, default=lesson05.DEFAULT_STEPS, help="DDIM steps")
    parser.add_argument("--eta", type=non_negative_float, default=1.0, help="DDIM's eta, in [0, 1] (lesson 05's)")
    parser.add_argument("--num-samples", type=positive_int, default=8, help="pictures per prompt")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default="auto")
    parser.add_argument("--out", type=writable_dir, default=f"outputs/{LESSON}", help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue training from OUT/checkpoint.pt")
    parser.add_argument("--sample-only", action="store_true", help="no training: sample from --checkpoint")
    parser.add_argument("--checkpoint", default=None, help="checkpoint for --sample-only (default OUT/checkpoint.pt)")
    args = parser.parse_args(argv)
    if args.eta > 1:
        parser.error(f"--eta must be at most 1, got {args.eta:g}")
    if args.guidance_scale < 1.0:  # diffusers turns guidance off below 1 (the prompt alone); here the formula would
        # move towards the empty prompt instead: the same name must not mean something else (lesson 03 refuses too)
        parser.error(f"--guidance-scale is diffusers' guidance_scale and must be at least 1 (1: no guidance), "
                     f"got {args.guidance_scale:g}")
    if not 0.0 <= args.ema_decay < 1.0:
        parser.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.resume and args.sample_only:
        parser.error("--resume and --sample-only cannot be used together")
    if args.checkpoint is not None and not args.sample_only:
        parser.error("--checkpoint is read by --sample-only only; to continue a training run use --resume "
                     "(it reads OUT/checkpoint.pt)")
    if args.sample_only:  # the checkpoint decides these: a value given here would be silently ignored
        ignored = [f"--{name.replace('_', '-')}" for name in TRAINING_FLAGS
                   if getattr(args, name) != parser.get_default(name)]
        if ignored:
            parser.error(f"{', '.join(ignored)} {'acts' if len(ignored) == 1 else 'act'} only in training; "
                         f"--sample-only draws with the checkpoint's model")
    if args.width % 4 or args.width % HEADS:
        parser.error(f"--width must be a multiple of {max(4, HEADS)} (GroupNorm groups and attention heads), "
                     f"got {args.width}")
    return args


# --- captions and their words ---

def caption(words, left, right, left_first=True):
    """The caption of a canvas: `left`, `right` are class indices or None (that side empty); `words` is the
    dataset's ITEM_WORDS. caption(w, 5, 8) -> "a sandal on the left and a bag on the right"."""
    parts = [f"{words[item]} on the {side}" for item, side in ((left, "left"), (right, "right")) if item is not None]
    return " and ".join(parts if left_first else parts[::-1])


def vocabulary(words):
    """Every word the grammar uses, in a fixed order: PAD = 0, START = 1, then the rest."""
    known = sorted({word for phrase in words for word in phrase.split()} | {"on", "the", "left", "right", "and"})
    return [PAD, START, *known]


def tokenize(prompts, vocab):
    """Prompts (strings) -> token ids [B, MAX_TOKENS] (int64) and mask [B, MAX_TOKENS] (bool, True = a real
    token): <start>, the prompt's words, then <pad>. Raises LessonError, in one line, for a word outside the
    vocabulary or a prompt too long."""
    index = {word: i for i, word in enumerate(vocab)}
    tokens = torch.zeros(len(prompts), MAX_TOKENS, dtype=torch.long)  # PAD = 0
    for row, prompt in enumerate(prompts):
        prompt_words = prompt.lower().replace(",", " ").split()
        unknown = [word for word in prompt_words if word not in index or word in (PAD, START)]
        if unknown:
            raise LessonError(f"the word '{unknown[0]}' in the prompt '{prompt}' is not one this model knows; "
                              f"it knows: {' '.join(vocab[2:])}")
        if len(prompt_words) + 1 > MAX_TOKENS:
            raise LessonError(f"the prompt '{prompt}' has {len(prompt_words)} words; at most {MAX_TOKENS - 1}")
        tokens[row, :len(prompt_words) + 1] = torch.tensor([index[START]] + [index[w] for w in prompt_words])
    return tokens, tokens != index[PAD]


def trained_pairs():
    """The ordered pairs (left, right) of different classes that training draws: 70 of the 90."""
    return [(a, b) for a in range(10) for b in range(10) if a != b and (a, b) not in HELD_OUT]


# --- the text encoder: a small transformer (Vaswani et al. 2017) ---

def attention(q, k, v, key_mask):
    """softmax(q k^T / sqrt(d)) v over the keys that key_mask keeps (Vaswani et al. 2017, Eq. 1): q [B, H, Nq, d],
    k and v [B, H, Nk, d], key_mask [B, Nk] bool -> (output [B, H, Nq, d], weights [B, H, Nq, Nk]). A masked key
    gets a score of -inf, so its weight is exactly 0; every row must keep at least one key (<start>)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ v, weights


class TransformerLayer(nn.Module):
    """One pre-norm transformer layer over the tokens: self-attention that ignores padding, then an MLP, each
    with a residual. [B, L, D] and mask [B, L] -> [B, L, D]."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h, mask):
        batch, length, dim = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        mixed, _ = attention(q, k, v, mask)
        h = h + self.out(mixed.transpose(1, 2).reshape(batch, length, dim))
        return h + self.mlp(self.norm2(h))


class TextEncoder(nn.Module):
    """tau_theta of LDM Section 3.3: token ids [B, L] and mask [B, L] -> token vectors [B, L, dim]."""

    def __init__(self, vocab_size, dim=TEXT_DIM, layers=TEXT_LAYERS, heads=HEADS):
        super().__init__()
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(MAX_TOKENS, dim)
        self.layers = nn.ModuleList(TransformerLayer(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens, mask):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.token(tokens) + self.position(positions)[None]
        for layer in self.layers:
            h = layer(h, mask)
        return self.norm(h)


# --- cross-attention: where the image reads the prompt (LDM Section 3.3) ---

class CrossAttention(nn.Module):
    """LDM Eq. 3: Attention(Q, K, V) = softmax(Q K^T / sqrt(d)) V with Q = W_Q phi(z_t) from the image features,
    K = W_K tau(y) and V = W_V tau(y) from the token vectors; padding tokens are masked out of the keys.
    [B, C, H, W], text [B, L, D], mask [B, L] -> [B, C, H, W]. The output projection starts at zero, so a new
    block changes nothing until training gives it a reason. With `record` a list, each call appends its
    weights averaged over heads, [B, H*W, L], and (H, W) (the attention maps of Prompt-to-Prompt)."""

    def __init__(self, channels, text_dim, heads=HEADS):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(lesson05.norm_groups(channels), channels)
        self.q, self.k, self.v = nn.Linear(channels, channels), nn.Linear(text_dim, channels), nn.Linear(text_dim, channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.record = None

    def forward(self, x, text, mask):
        batch, channels, height, width = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, H*W, C]: one query per position

        def heads(t):  # [B, N, C] -> [B, heads, N, C / heads]
            return t.view(batch, -1, self.heads, channels // self.heads).transpose(1, 2)

        mixed, weights = attention(heads(self.q(h)), heads(self.k(text)), heads(self.v(text)), mask)
        if self.record is not None:
            self.record.append((weights.mean(1).detach(), (height, width)))
        out = self.out(mixed.transpose(1, 2).reshape(batch, height * width, channels))
        return x + out.transpose(1, 2).view(batch, channels, height, width)


class TextUNet(nn.Module):
    """Lesson 05's latent U-Net with cross-attention after each of its blocks: eps_pred = model(z_t, t, text,
    mask), z_t [B, 4, 7, 14] (a canvas of two 7x7 latents), t [B] -> [B, 4, 7, 14]. Two resolutions (7x14 and
    4x7), self-attention and cross-attention at both. The stem also reads two coordinate channels (CoordConv, Liu et
    al. 2018, arXiv:1807.03247): convolutions and attention without positions cannot tell the left of the canvas
    from the right, and a prompt that says where things go needs that. Stable Diffusion's deeper U-Net over a
    64x64 latent learns where it is from the borders its many layers reach; ours is two levels over 7x14, where
    a feature in the middle columns of the first block sees no border (measured: without them, its cross-attention
    spread each item word evenly over both halves, 0.50 of its mass on the word's own side)."""

    def __init__(self, channels=4, width=32, text_dim=TEXT_DIM):
        super().__init__()
        self.width = width
        embedding_dim = 4 * width
        self.time_mlp = nn.Sequential(nn.Linear(width, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim))
        self.stem = nn.Conv2d(channels + 2, width, 3, padding=1)  # the latent's channels, then x and y
        widths = [width, 2 * width]
        self.down = nn.ModuleList([lesson05.ResBlock(width, widths[0], embedding_dim, attention=True),
                                   lesson05.ResBlock(widths[0], widths[1], embedding_dim, attention=True)])
        self.downsample = nn.Conv2d(widths[0], widths[0], 3, stride=2, padding=1)
        self.middle = lesson05.ResBlock(widths[1], widths[1], embedding_dim, attention=True)
        self.up = nn.ModuleList([lesson05.ResBlock(2 * widths[1], widths[1], embedding_dim, attention=True),
                                 lesson05.ResBlock(widths[1] + widths[0], widths[0], embedding_dim, attention=True)])
        self.cross = nn.ModuleList(CrossAttention(c, text_dim) for c in (widths[0], widths[1], widths[1], widths[1],
                                                                        widths[0]))
        self.head = nn.Sequential(nn.GroupNorm(lesson05.norm_groups(width), width), nn.SiLU(),
                                  nn.Conv2d(width, channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, z_t, t, text, mask):
        embedding = self.time_mlp(lesson05.timestep_embedding(t, self.width))
        batch, _, height, width = z_t.shape
        y, x = torch.meshgrid(torch.linspace(-1, 1, height, device=z_t.device),
                              torch.linspace(-1, 1, width, device=z_t.device), indexing="ij")
        where = torch.stack([x, y]).expand(batch, -1, -1, -1)  # [B, 2, H, W]: -1 at the left/top, 1 at the right/bottom
        cross = iter(self.cross)
        h = next(cross)(self.down[0](self.stem(torch.cat([z_t, where], dim=1)), embedding), text, mask)  # 7x14
        skips = [h]
        h = next(cross)(self.down[1](self.downsample(h), embedding), text, mask)  # 4x7
        skips.append(h)
        h = next(cross)(self.middle(h, embedding), text, mask)
        for block in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = next(cross)(block(torch.cat([h, skip], dim=1), embedding), text, mask)
        return self.head(h)


class TextToImage(nn.Module):
    """The two networks that train together: the text encoder and the U-Net that reads it."""

    def __init__(self, vocab_size, width):
        super().__init__()
        self.text_encoder = TextEncoder(vocab_size)
        self.unet = TextUNet(width=width)

    def forward(self, z_t, t, tokens, mask):
        return self.unet(z_t, t, self.text_encoder(tokens, mask), mask)


# --- the data: canvases of two items, each a latent of lesson 05's frozen encoder ---

@torch.no_grad()
def item_latents(autoencoder, images, scale, device):
    """Images [N, 1, 28, 28] -> their scaled latents [N, 4, 7, 7] (the means of q(z | x)), and the latent of an
    empty side: the dataset's background, an all-black picture."""
    means, _ = lesson05.encode_dataset(autoencoder, images, device)
    blank, _ = autoencoder.encode(torch.full_like(images[:1], -1.0).to(device))
    return means * scale, blank * scale


def draw_canvases(count, latents, by_class, blank, words, generator):
    """`count` training canvases: -> (z0 [count, 4, 7, 14], captions). A share SINGLE_SHARE name one item on one
    side (the other empty); the rest a trained pair, in either word order. Items are drawn at random from their
    class (`by_class`: a list of index tensors into `latents`)."""
    pairs = trained_pairs()
    draws = torch.rand(count, 3, generator=generator).tolist()
    z0, captions = [], []
    for single, which, order in draws:
        if single < SINGLE_SHARE:
            item = int(which * 10)
            left, right = (item, None) if order < 0.5 else (None, item)
        else:
            left, right = pairs[int(which * len(pairs))]
        halves = []
        for item in (left, right):
            if item is None:
                halves.append(blank[0])
            else:
                pick = torch.randint(len(by_class[item]), (1,), generator=generator).item()
                halves.append(latents[by_class[item][pick]])
        z0.append(torch.cat(halves, dim=-1))
        captions.append(caption(words, left, right, left_first=order < 0.5 if left is not None and right is not None
                                else True))
    return torch.stack(z0), captions


def drop_captions(tokens, mask, empty_tokens, empty_mask, generator):
    """Classifier-free guidance's training (Ho & Salimans 2022, Algorithm 1): each caption becomes the empty
    prompt with probability P_EMPTY. The empty prompt is tokenized like any other (<start> and padding), so it
    takes the same path through the encoder in training and in sampling."""
    dropped = torch.rand(len(tokens), generator=generator) < P_EMPTY
    tokens, mask = tokens.clone(), mask.clone()
    tokens[dropped], mask[dropped] = empty_tokens, empty_mask
    return tokens, mask


def loss_fn(model, z0, tokens, mask, alpha_bars, generator):
    """DDPM's simple loss on canvases z0 [B, 4, 7, 14] with their prompts (LDM Eq. 3's objective)."""
    t = torch.randint(0, len(alpha_bars), (z0.shape[0],), device=z0.device, generator=generator)
    eps = torch.randn(z0.shape, device=z0.device, generator=generator)
    return F.mse_loss(model(lesson05.add_noise(z0, t, eps, alpha_bars), t, tokens, mask), eps)


# --- guided sampling ---

def guided_eps(model, z_t, t, text, mask, empty_text, empty_mask, guidance_scale):
    """Classifier-free guidance with diffusers' guidance_scale s: eps(empty) + s (eps(prompt) - eps(empty))
    (Ho & Salimans Eq. 6 with s = 1 + w). Both predictions in one doubled batch; text [B, L, D] are the prompts'
    token vectors, empty_text [1, L, D] the empty prompt's."""
    batch = z_t.shape[0]
    both = model.unet(torch.cat([z_t, z_t]), torch.cat([t, t]),
                      torch.cat([text, empty_text.expand(batch, -1, -1)]),
                      torch.cat([mask, empty_mask.expand(batch, -1)]))
    eps_prompt, eps_empty = both.chunk(2)
    return eps_empty + guidance_scale * (eps_prompt - eps_empty)


@torch.inference_mode()
def sample(model, autoencoder, scale, prompts, vocab, alpha_bars, args, generator, record=None):
    """Prompts (strings) -> images [len(prompts), 1, 28, 56] in [-1, 1]: guided DDIM in latent space (lesson 05's
    sampler), then the frozen decoder on each half. With `record` a list, the cross-attention
    weights of the prompts' (conditional) half of every call are appended to it."""
    tokens, mask = tokenize(prompts, vocab)
    empty_tokens, empty_mask = tokenize([""], vocab)
    device = alpha_bars.device
    tokens, mask, empty_tokens, empty_mask = tokens.to(device), mask.to(device), empty_tokens.to(device), empty_mask.to(device)
    text, empty_text = model.text_encoder(tokens, mask), model.text_encoder(empty_tokens, empty_mask)
    for block in model.unet.cross:
        block.record = [] if record is not None else None

    def denoiser(z_t, t):
        eps = guided_eps(model, z_t, t, text, mask, empty_text, empty_mask, args.guidance_scale)
        if record is not None:  # keep the conditional half of this call's maps: ([B, H*W, L], (H, W)) per block
            record.append([(weights[:len(prompts)], size) for weights, size in
                           (block.record.pop() for block in model.unet.cross)])
        return eps

    z_T = torch.randn((len(prompts), 4, 7, 14), device=device, generator=generator)
    z0, _ = lesson05.ddim_sample(denoiser, alpha_bars, z_T, args.steps, args.eta, generator)
    for block in model.unet.cross:
        block.record = None
    return decode_canvas(autoencoder, z0 / scale)


def decode_canvas(autoencoder, z):
    """Unscaled canvas latents [B, 4, 7, 14] -> images [B, 1, 28, 56] in [-1, 1]: each 7x7 half decoded alone, as
    each item was encoded alone. Decoding the canvas at once would change every pixel, not only those at the seam:
    the decoder's GroupNorm takes its statistics over the whole picture it is given."""
    halves = [autoencoder.decode(half) for half in z.split(z.shape[-1] // 2, dim=-1)]
    return torch.cat(halves, dim=-1).clamp(-1, 1)


def attention_maps(record, size, every_block=False):
    """record: per sampling call, per cross-attention block, ([B, h*w, L] weights, (h, w)) -> [B, L, H, W] at
    `size` (H, W): each token's attention averaged over the blocks of the coarsest grid (4x7; each map upsampled to
    `size`) and over the calls. Prompt-to-Prompt draws Stable Diffusion's maps the same way, from its coarse 16x16
    layers. The 7x14 blocks are left out because they do not look at a word in one place: measured on 200 default
    prompts with the default run, 0.50 of an item word's attention there falls on its own half, as by chance (the
    4x7 blocks: 0.72), so they would only wash out the map. every_block=True averages over all the blocks instead."""
    coarsest = min(height * width for _, (height, width) in record[0])
    total, count = None, 0
    for call in record:
        for weights, (height, width) in call:
            if height * width != coarsest and not every_block:
                continue
            maps = weights.transpose(1, 2).reshape(weights.shape[0], weights.shape[2], height, width)
            maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
            total, count = (maps, 1) if total is None else (total + maps, count + 1)
    return total / count


# --- training ---

def train(args, model, items, config, device, start, autoencoder_state):
    """Train the text encoder and U-Net together on freshly drawn canvases; returns the EMA model in eval mode.
    Writes checkpoint.pt (everything sampling needs, the frozen autoencoder's weights too, as a Stable Diffusion
    pipeline ships its VAE) and metrics.csv."""
    latents, by_class, blank = items
    vocab = config["vocab"]
    ema = lesson05.EMA(model, args.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed + 2)  # on the CPU: the canvases are drawn there
    noise_generator = torch.Generator(device=device).manual_seed(args.seed + 3)
    step = 0
    if start is not None:  # --resume: every state that decides what comes next
        model.load_state_dict(start["model"])
        ema.model.load_state_dict(start["ema"])
        optimizer.load_state_dict(start["optimizer"])
        generator.set_state(start["generator"])
        noise_generator.set_state(start["noise_generator"])
        step = start["step"]
    empty_tokens, empty_mask = tokenize([""], vocab)
    alpha_bars = lesson05.make_schedule(device, config["timesteps"])["alpha_bars"]
    total_steps, path = config["steps"], args.out / "checkpoint.pt"
    log = TrainingLog(args.out / "metrics.csv", total_steps, step, args.batch_size, LOG_EVERY, start is not None)
    with StopRequest() as stop:
        while step < total_steps and not stop.requested:
            # 1. a batch of canvases and their captions; one in ten captions becomes the empty prompt
            z0, captions = draw_canvases(args.batch_size, latents, by_class, blank, config["words"], generator)
            tokens, mask = drop_captions(*tokenize(captions, vocab), empty_tokens, empty_mask, generator)
            lr = warmup_learning_rate(step, args.lr, WARMUP_STEPS)
            set_learning_rate(optimizer, lr)
            # 2. the loss: lesson 05's, with the prompt as a second input
            loss = loss_fn(model, z0.to(device), tokens.to(device), mask.to(device), alpha_bars, noise_generator)
            check_finite(loss.item(), step, path)
            # 3. the update of both networks, then their EMA
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            ema.update(model, step)
            step += 1
            # 4. log, and save what --resume and sampling need
            log.add(step, loss.item(), lr)
            if checkpoint_due(step, total_steps, CHECKPOINT_EVERY, stop.requested):
                save_checkpoint({"format": CHECKPOINT_FORMAT, "lesson": LESSON, "config": config, "step": step,
                                 "model": model.state_dict(), "ema": ema.model.state_dict(),
                                 "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                                 "autoencoder": autoencoder_state,
                                 "noise_generator": noise_generator.get_state()}, path)
    log.close()
    if stop.requested:
        raise stopped_early(step, total_steps, path)
    return ema.model.eval()


# --- the run ---

def autoencoder_from(config, state):
    """The frozen autoencoder of lesson 05 from its hyperparameters (config: channels, autoencoder_width,
    latent_channels) and weights."""
    autoencoder = lesson05.Autoencoder(config["channels"], config["autoencoder_width"], config["latent_channels"])
    autoencoder.load_state_dict(state)
    return autoencoder.eval().requires_grad_(False)


def load_autoencoder(path):
    """Lesson 05's checkpoint -> (frozen autoencoder, latent scale, its config). Refuses, in one line, a missing
    file, another lesson's checkpoint and a dataset without ITEM_WORDS."""
    if not Path(path).is_file():
        raise LessonError(f"no lesson 05 checkpoint at {path}: run python 05_latent_diffusion.py first (it writes "
                          f"outputs/05_latent_diffusion/checkpoint.pt), or pass --autoencoder")
    try:
        checkpoint = load_checkpoint(path, lesson05.LESSON)
    except LessonError as error:
        raise LessonError(f"{error}; python 05_latent_diffusion.py writes the checkpoint this example needs "
                          f"(outputs/05_latent_diffusion/checkpoint.pt)") from None
    config = checkpoint["config"]
    if config.get("dataset") not in ITEM_WORDS or config["image_size"] != 28 or config["latent_size"] != 7:
        raise LessonError(f"{path} was trained on {config.get('dataset')} at {config['image_size']} pixels; this "
                          f"example needs lesson 05 on {' or '.join(ITEM_WORDS)} at 28, as python 05_latent_diffusion.py --dataset "
                          f"fashion-mnist trains it (its captions name the classes)")
    return autoencoder_from(config, checkpoint["autoencoder"]), config["scale"], config


def check_resumable(start, args, autoencoder, total_steps):
    """--resume continues the same run: refuses, in one line, another width, another autoencoder (its latents
    are what the U-Net learned to draw) and a length the checkpoint has already reached."""
    path, saved = args.out / "checkpoint.pt", start["config"]
    if saved["width"] != args.width:
        raise LessonError(f"{path} was trained with --width {saved['width']}, this run has --width {args.width}")
    if not same_weights(start["autoencoder"], autoencoder.state_dict()):
        raise LessonError(f"{path} was trained on the latents of another autoencoder than the one in "
                          f"{args.autoencoder} (lesson 05 was trained again since?); train afresh with another --out")
    if start["step"] >= total_steps:
        raise LessonError(f"{path} is at step {start['step']} already, and this run asks for {total_steps} steps: "
                          f"pass a larger --max-steps or --epochs to train longer, or --sample-only to sample")


def write_outputs(model, autoencoder, scale, config, args, device):
    """samples.png/.npz, attention.png and guidance.png for --prompt (or DEFAULT_PROMPTS); returns the paths."""
    vocab, prompts = config["vocab"], args.prompt or DEFAULT_PROMPTS
    tokenize(prompts, vocab)  # refuse an unknown word before any work
    if all(prompt == "" for prompt in prompts) and args.guidance_scale != GUIDANCE_SCALE:
        print(f"note: --guidance-scale {args.guidance_scale:g} changes nothing for the empty prompt: its guided and "
              f"unguided predictions are the same (guidance.png still sweeps the scale for it)")
    alpha_bars = lesson05.make_schedule(device, config["timesteps"])["alpha_bars"]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    started, record = time.perf_counter(), []
    per_prompt = [p for p in prompts for _ in range(args.num_samples)]
    images = sample(model, autoencoder, scale, per_prompt, vocab, alpha_bars, args, generator, record)
    print(f"sampled {len(per_prompt)} pictures in {time.perf_counter() - started:.1f} s")
    rows = images.view(len(prompts), args.num_samples, *images.shape[1:])
    paths = [visualize.save_captioned_rows(rows[:, :8], prompts, args.out / "samples.png"),
             visualize.save_samples_npz(images, args.out / "samples.npz", captions=per_prompt)]
    # attention.png: the first prompt's first picture, and where it looked at each word
    words = prompts[0].split()
    maps = attention_maps(record, images.shape[-2:])[0, 1:len(words) + 1]
    paths.append(visualize.save_attention_maps(images[0], maps, words, args.out / "attention.png"))
    # guidance.png: the first prompt at each of SWEEP_SCALES, from the same starting noises
    sweep = []
    for scale_value in SWEEP_SCALES:
        sweep_args = type(args)(**{**vars(args), "guidance_scale": scale_value})
        sweep.append(sample(model, autoencoder, scale, [prompts[0]] * 4, vocab, alpha_bars, sweep_args,
                            torch.Generator(device=device).manual_seed(args.seed)))
    paths.append(visualize.save_captioned_rows(torch.stack(sweep), [f"guidance_scale {s:g}: {prompts[0]}"
                                                                    for s in SWEEP_SCALES], args.out / "guidance.png"))
    return paths


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    if args.sample_only:
        path = args.checkpoint or args.out / "checkpoint.pt"
        checkpoint = load_checkpoint(path, LESSON)
        config = checkpoint["config"]
        # the checkpoint carries its frozen autoencoder: it samples from any folder, lesson 05's files or not
        autoencoder = autoencoder_from(config["autoencoder"], checkpoint["autoencoder"])
        scale = config["autoencoder"]["scale"]
        model = TextToImage(len(config["vocab"]), config["width"])
        model.load_state_dict(checkpoint["ema"])
        make_out_dir(args.out)
        paths = write_outputs(model.to(device).eval(), autoencoder.to(device), scale, config, args, device)
    else:
        autoencoder, scale, ae_config = load_autoencoder(args.autoencoder)
        words = ITEM_WORDS[ae_config["dataset"]]
        if args.prompt:
            tokenize(args.prompt, vocabulary(words))  # refuse an unknown word before training
        start = load_checkpoint(args.out / "checkpoint.pt", LESSON) if args.resume else None
        dataset = data.load_dataset(ae_config["dataset"], args.data_dir, "train", download=False)
        steps_per_epoch = len(dataset.images) // args.batch_size
        config = {"dataset": ae_config["dataset"], "words": words, "vocab": vocabulary(words), "width": args.width,
                  "timesteps": ae_config["timesteps"], "autoencoder_path": str(args.autoencoder),
                  "autoencoder": {key: ae_config[key] for key in ("channels", "autoencoder_width", "latent_channels",
                                                                   "scale")},
                  "steps": args.max_steps or args.epochs * steps_per_epoch}
        if start is not None:
            config = {**start["config"], "steps": config["steps"]}
        if start is not None:
            check_resumable(start, args, autoencoder, config["steps"])
        latents, blank = item_latents(autoencoder.to(device), dataset.images, scale, device)
        labels = dataset.labels.to(device)
        by_class = [torch.nonzero(labels == c).flatten() for c in range(10)]
        make_out_dir(args.out)
        model = TextToImage(len(config["vocab"]), config["width"]).to(device)
        print(f"{ae_config['dataset']}: canvases of two items from {len(latents)} latents of lesson 05's frozen "
              f"autoencoder; text encoder {sum(p.numel() for p in model.text_encoder.parameters()) / 1e3:.0f}k and "
              f"U-Net {sum(p.numel() for p in model.unet.parameters()) / 1e6:.2f}M parameters; "
              f"{len(HELD_OUT)} ordered pairs held out")
        model = train(args, model, (latents, by_class, blank), config, device, start,
                      {key: value.cpu() for key, value in autoencoder.state_dict().items()})
        paths = [args.out / "checkpoint.pt", args.out / "metrics.csv",
                 visualize.save_loss_curve(args.out / "metrics.csv", args.out / "loss.png"),
                 *write_outputs(model, autoencoder, scale, config, args, device)]
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    run(main)
