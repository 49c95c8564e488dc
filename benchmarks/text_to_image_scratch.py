"""Scratch measurement of the capstone's prompt following (to become a benchmark)."""
import sys, time, random
from pathlib import Path
import torch
sys.path.insert(0, "/work/cap")
from examples.lessons import load_lesson
from utils import metrics, data
t2i = load_lesson("examples/text_to_image.py", "t2i") if False else None
import importlib.util
spec = importlib.util.spec_from_file_location("t2i", "/work/cap/examples/text_to_image.py"); t2i = importlib.util.module_from_spec(spec); spec.loader.exec_module(t2i)

per_group = int(sys.argv[1]) if len(sys.argv) > 1 else 200
scales = [float(s) for s in sys.argv[2].split(",")] if len(sys.argv) > 2 else [3.0]
ck = t2i.load_checkpoint("/work/cap/outputs/text_to_image/checkpoint.pt", t2i.LESSON)
config = ck["config"]
ae, scale, _ = t2i.load_autoencoder(config["autoencoder_path"])
model = t2i.TextToImage(len(config["vocab"]), config["width"]); model.load_state_dict(ck["ema"]); model.eval()
clf, acc = metrics.load_classifier("fashion-mnist", "/work/main/data", "/work/main/outputs/metrics")
print("classifier test accuracy", acc)
alpha_bars = t2i.lesson05.make_schedule("cpu", config["timesteps"])["alpha_bars"]
words = config["words"]
rng = random.Random(0)
held = sorted(t2i.HELD_OUT); trained = t2i.trained_pairs()
def run(pairs, s, empty=False):
    prompts = []
    for i in range(per_group):
        a, b = pairs[i % len(pairs)]
        prompts.append((a, b, "" if empty else t2i.caption(words, a, b, left_first=rng.random() < 0.5)))
    args = type("A", (), {})(); args.guidance_scale = s; args.steps = 200; args.eta = 1.0
    g = torch.Generator().manual_seed(1)
    imgs = []
    for k in range(0, len(prompts), 64):
        imgs.append(t2i.sample(model, ae, scale, [p[2] for p in prompts[k:k+64]], config["vocab"], alpha_bars, args, g))
    imgs = torch.cat(imgs)
    _, left = metrics.predict(clf, imgs[..., :28], "cpu"); _, right = metrics.predict(clf, imgs[..., 28:], "cpu")
    a = torch.tensor([p[0] for p in prompts]); b = torch.tensor([p[1] for p in prompts])
    both = ((left == a) & (right == b)).float().mean().item()
    swap = ((left == b) & (right == a)).float().mean().item()
    lo = (left == a).float().mean().item(); ro = (right == b).float().mean().item()
    return both, swap, lo, ro, imgs
for s in scales:
    for name, pairs in (("trained", trained), ("held-out", held)):
        t0 = time.time(); both, swap, lo, ro, imgs = run(pairs, s)
        print(f"scale {s}: {name}: both {both:.3f} swap {swap:.3f} left {lo:.3f} right {ro:.3f} ({per_group} samples, {time.time()-t0:.0f} s)", flush=True)
        torch.save(imgs[:32], f"/tmp/t2i_{name}_{s}.pt")
both, swap, lo, ro, _ = run(trained, 1.0, empty=True)
print(f"empty prompt (floor) against trained pairs: both {both:.3f} swap {swap:.3f}")
test = data.load_dataset("fashion-mnist", "/work/main/data", "test", download=False)
_, pred = metrics.predict(clf, test.images, "cpu"); p = (pred == test.labels).float().mean().item()
print(f"ceiling (real test items, both halves right, independent): about {p*p:.3f}")
