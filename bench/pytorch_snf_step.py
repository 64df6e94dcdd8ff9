"""The self-normalizing training step of specs/mnist_fc2.json in PyTorch, written like the
paper's reference code (a custom autograd function per self-normalizing linear layer, the
reconstruction through ordinary autograd), to compare with `snfc bench` in one run on one
machine, and to cross-check snfc's gradients.

    python bench/pytorch_snf_step.py [--threads 2] [--steps 100]
    python bench/pytorch_snf_step.py --check P.safetensors X.npy G.safetensors   # vs `snfc grad --dtype f64`

Not part of the test suite (PyTorch is not a dependency of snfc).
"""
import argparse, math, statistics, time
import torch

D, B, ALPHA, LAMBDA, LOGIT_ALPHA = 784, 100, 0.3, 1.0, 1e-6


class SelfNormLinear(torch.autograd.Function):
    """z = x Wᵀ; backward uses R in place of W⁻¹ (eqs. 10, 11). The loss here is −mean ln p^f,
    so each of W and R gets half of it, as in J = −mean[½ ln p^f + ½ ln p^g]."""

    @staticmethod
    def forward(ctx, x, W, R):
        z = x @ W.T
        ctx.save_for_backward(x, W, R, z)
        return z

    @staticmethod
    def backward(ctx, g):
        x, W, R, z = ctx.saved_tensors
        grad_x = g @ W
        grad_W = 0.5 * (g.T @ x) - 0.5 * R.T
        grad_R = -0.5 * (grad_x.T @ z) + 0.5 * W.T
        return grad_x, grad_W, grad_R


def slrelu(h):
    return ALPHA * h + (1 - ALPHA) * torch.nn.functional.softplus(h)


def step_loss(params, x, u):
    y = (x + u) / 256.0
    s = LOGIT_ALPHA + (1 - 2 * LOGIT_ALPHA) * y
    h = torch.log(s) - torch.log1p(-s)
    logp = (-torch.log(s) - torch.log1p(-s)).sum(1) + D * (math.log(1 - 2 * LOGIT_ALPHA) - math.log(256))
    recon = 0.0
    for i, (W, R, b) in enumerate(params):
        hd = h.detach()
        recon = recon + ((hd @ W.T @ R.T - hd) ** 2).sum() / h.shape[0]
        h = SelfNormLinear.apply(h, W, R) + b
        if i == 0:
            logp = logp + torch.log(ALPHA + (1 - ALPHA) * torch.sigmoid(h)).sum(1)
            h = slrelu(h)
    logp = logp - 0.5 * (h ** 2).sum(1) - 0.5 * D * math.log(2 * math.pi)
    return -logp.mean() + LAMBDA * recon, recon


def init(dtype):
    ps = []
    for _ in range(2):
        W = torch.eye(D, dtype=dtype) + 0.01 * math.sqrt(2 / (2 * D)) * torch.randn(D, D, dtype=dtype)
        ps.append((W.clone().requires_grad_(), W.T.clone().requires_grad_(), torch.zeros(D, dtype=dtype, requires_grad=True)))
    return ps


def bench(threads, steps):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    params = init(torch.float32)
    opt = torch.optim.Adam([p for l in params for p in l], lr=1e-4, betas=(0.9, 0.999))
    x = torch.floor(torch.rand(B, D) * 256)
    u = torch.rand(B, D)
    times = []
    for i in range(10 + steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _ = step_loss(params, x, u)
        loss.backward()
        opt.step()
        if i >= 10:
            times.append(time.perf_counter() - t)
    print(f"pytorch {torch.__version__} SNF step, f32, B={B}, {threads} threads: median {statistics.median(times)*1e3:.2f} ms (min {min(times)*1e3:.2f})")


def check(params_path, x_path, grads_path):
    """Gradients of snfc (`snfc grad --dtype f64`, preprocess noise from its seed) vs this code."""
    import numpy as np
    from safetensors.numpy import load_file
    P, G = load_file(params_path), load_file(grads_path)
    params = [(torch.tensor(P[f"layers.{i}.weight"]).requires_grad_(), torch.tensor(P[f"layers.{i}.weight_inv"]).requires_grad_(),
               torch.tensor(P[f"layers.{i}.bias"]).requires_grad_()) for i in (0, 2)]
    x = torch.tensor(np.load(x_path), dtype=torch.float64)
    u = torch.tensor(np.load(x_path.replace(".npy", ".noise.npy")), dtype=torch.float64)
    loss, recon = step_loss(params, x, u)
    loss.backward()
    worst = 0.0
    for (W, R, b), i in zip(params, (0, 2)):
        for t, name in ((W, "weight"), (R, "weight_inv"), (b, "bias")):
            ref = torch.tensor(G[f"layers.{i}.{name}"])
            err = ((t.grad - ref).abs().max() / ref.abs().max()).item()
            worst = max(worst, err)
            print(f"layers.{i}.{name}: max |pytorch - snfc| / max |snfc| = {err:.2e}")
    print(f"recon: pytorch {recon.item():.6f} snfc {G['recon'].item():.6f}")
    print("worst relative difference", f"{worst:.2e}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--check", nargs=3)
    a = ap.parse_args()
    if a.check:
        check(*a.check)
    else:
        bench(a.threads, a.steps)
