import sys, torch
sys.path.insert(0, "/work/cap/tests"); sys.path.insert(0, "/work/cap")
from conftest import load_lesson
t2i = load_lesson("examples/text_to_image.py"); l5 = load_lesson("05_latent_diffusion.py")
WORDS = t2i.ITEM_WORDS["fashion-mnist"]; VOCAB = t2i.vocabulary(WORDS)
torch.manual_seed(0)
patterns = torch.randn(10, 4, 7, 7); blank = torch.zeros(1, 4, 7, 7); by_class = [torch.tensor([c]) for c in range(10)]
model = t2i.TextToImage(len(VOCAB), width=16)
ab = l5.make_schedule("cpu", 50)["alpha_bars"]
held = sorted(t2i.HELD_OUT)
z = torch.stack([torch.cat([patterns[a], patterns[b]], -1) for a, b in held * 4])
caps = [t2i.caption(WORDS, a, b, left_first=i % 2 == 0) for i, (a, b) in enumerate(held * 4)]
sh = caps[10:] + caps[:10]
def L(c, tval):
    tok, m = t2i.tokenize(c, VOCAB); g = torch.Generator().manual_seed(5)
    t = torch.full((len(z),), tval); eps = torch.randn(z.shape, generator=g)
    with torch.no_grad(): return torch.nn.functional.mse_loss(model(l5.add_noise(z, t, eps, ab), t, tok, m), eps).item()
g, n = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
opt = torch.optim.AdamW(model.parameters(), lr=float(sys.argv[1]))
et, em = t2i.tokenize([""], VOCAB)
import time; t0=time.time()
for step in range(1, 301):
    z0, c = t2i.draw_canvases(32, patterns, by_class, blank, WORDS, g)
    tok, m = t2i.drop_captions(*t2i.tokenize(c, VOCAB), et, em, g)
    loss = t2i.loss_fn(model, z0, tok, m, ab, n); opt.zero_grad(); loss.backward(); opt.step()
    if step % 50 == 0:
        model.eval(); print(step, f"{time.time()-t0:.0f}s", [(tv, round(L(caps, tv),3), round(L(sh, tv),3)) for tv in (10, 25, 40)], flush=True); model.train()
