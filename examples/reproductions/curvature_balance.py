"""Issue 12 #6 -- curvature paper Fig. 3 and Fig. 6: positive vs negative curvature of a network's loss.

Paper §7: for a compositional loss F(x) = E_ξ[φ_ξ(f_ξ(x))] with convex φ the Hessian is ∇f^T φ'' ∇f + φ' ∇²f; the
first term is PSD, so negative curvature can only come from the second. Fig. 3 (ResNet-18 at Kaiming initialisation,
one CIFAR-10 batch of 128, stochastic Lanczos): with cross-entropy the spectrum is biased to positive curvature
(λ_max ≫ |λ_min|), with a *linear loss* -- appendix I: "constructed by sampling a random weight vector from an
isotropic Gaussian distribution", i.e. φ(y) = ⟨w, y⟩ on the logits, so φ'' = 0 -- "the network has no preference for
positive or negative curvature" (λ_max ≈ |λ_min|). Fig. 6 (training on CIFAR-10, λ's on one fixed batch of 128 at the
end of every epoch): the imbalance λ_max/|λ_min| *grows* during training (≈10 → ≈100 in the figure).

Here at toy scale: a ReLU MLP 64 → w → w → 10 with Kaiming-normal weights and zero biases on sklearn's digits (8x8,
flattened), one fixed batch of 128. Extreme eigenvalues of the Hessian of the batch loss by ``HessianVectorProduct``
(double backward) + ``lanczos_extreme_eigs`` (full reorthogonalisation, tol 1e-3). Linear loss: W ∈ R^{128×10} with
i.i.d. N(0, 1) entries (one Gaussian weight vector over the batch's logits), F = Σ_ij W_ij f_ij(x) / 128.

* Fig. 3: several widths × several seeds at initialisation, λ_max and λ_min for both losses, ratio |λ_min|/λ_max.
* Fig. 6: SGD (lr 0.05, momentum 0.9, batch 64) on all 1797 digits, λ_max and λ_min of the cross-entropy on the
  fixed probe batch (128 of the training images) at the end of every epoch; the ratio |λ_min|/λ_max over epochs
  (the paper plots its inverse).

    python examples/reproductions/curvature_balance.py           # full (~1.5 min on 2 shared CPU cores)
    python examples/reproductions/curvature_balance.py --quick   # smoke test (<60 s)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _plot import emit, plt, save_figure, script_args
from torch import nn

from lightning_opt.examples.data import load_digits_tensors
from lightning_opt.stats.hvp import HessianVectorProduct
from lightning_opt.stats.lanczos import lanczos_extreme_eigs

PROBE = 128
N_CLASSES = 10


def make_mlp(width: int, depth: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    d_in = 64
    for _ in range(depth):
        layers += [nn.Linear(d_in, width), nn.ReLU()]
        d_in = width
    layers.append(nn.Linear(d_in, N_CLASSES))
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return net


def extreme_eigs(model: nn.Module, loss_fn, seed: int, max_iter: int) -> dict:
    hvp = HessianVectorProduct(model, loss_fn)
    gen = torch.Generator().manual_seed(1000 + seed)
    res = lanczos_extreme_eigs(hvp, hvp.dim, max_iter=max_iter, tol=1e-3, which="both", generator=gen)
    hvp.release()
    return {"lambda_max": res.lambda_max, "lambda_min": res.lambda_min, "converged": res.converged,
            "n_matvec": res.n_matvec, "dim": hvp.dim}


def at_init(widths: list[int], seeds: list[int], xb: torch.Tensor, yb: torch.Tensor, max_iter: int) -> dict:
    out: dict[str, dict] = {}
    for width in widths:
        rows = {"ce": [], "linear": []}
        for seed in seeds:
            torch.manual_seed(seed)
            model = make_mlp(width)
            w_lin = torch.randn(xb.shape[0], N_CLASSES, generator=torch.Generator().manual_seed(500 + seed))
            rows["ce"].append(extreme_eigs(model, lambda m: F.cross_entropy(m(xb), yb), seed, max_iter))
            rows["linear"].append(extreme_eigs(model, lambda m, w=w_lin: (m(xb) * w).sum() / xb.shape[0], seed,
                                               max_iter))
        block = {}
        for loss, rs in rows.items():
            ratios = [abs(r["lambda_min"]) / r["lambda_max"] for r in rs if r["lambda_max"] > 0]
            block[loss] = {
                "lambda_max": [r["lambda_max"] for r in rs],
                "lambda_min": [r["lambda_min"] for r in rs],
                "ratio_abs_min_over_max": ratios,
                "ratio_mean": statistics.fmean(ratios),
                "ratio_std": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
                "all_converged": all(r["converged"] for r in rs),
                "dim": rs[0]["dim"],
            }
        out[str(width)] = block
        print(f"[init] width {width}: CE |λmin|/λmax = {block['ce']['ratio_mean']:.4f}, "
              f"linear = {block['linear']['ratio_mean']:.3f}", flush=True)
    return out


def during_training(width: int, epochs: int, x: torch.Tensor, y: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor,
                    max_iter: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = make_mlp(width)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    hist: dict[str, list] = {"epoch": [], "lambda_max": [], "lambda_min": [], "ratio": [], "probe_loss": [],
                             "train_acc": []}
    v0 = None

    def record(epoch: int) -> None:
        nonlocal v0
        hvp = HessianVectorProduct(model, lambda m: F.cross_entropy(m(xb), yb))
        res = lanczos_extreme_eigs(hvp, hvp.dim, max_iter=max_iter, tol=1e-3, which="both", v0=v0,
                                   generator=torch.Generator().manual_seed(epoch))
        v0 = res.ritz_vectors
        with torch.no_grad():
            acc = float((model(x).argmax(1) == y).float().mean())
        hist["epoch"].append(epoch)
        hist["lambda_max"].append(res.lambda_max)
        hist["lambda_min"].append(res.lambda_min)
        hist["ratio"].append(abs(res.lambda_min) / res.lambda_max)
        hist["probe_loss"].append(hvp.loss)
        hist["train_acc"].append(acc)
        hvp.release()

    record(0)
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        record(epoch)
    return hist


def plot(init: dict[str, dict], train: dict[str, list], widths: list[int], train_width: int, png: Path) -> Path:
    """|λ_min| against λ_max at initialisation, their ratio against width, and both during training."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    ax = axes[0]
    for loss, c in (("ce", "tab:blue"), ("linear", "tab:red")):
        for k, width in enumerate(widths):
            b = init[str(width)][loss]
            ax.scatter(b["lambda_max"], [abs(v) for v in b["lambda_min"]], color=c, marker="os^Dv"[k % 5], s=28,
                       label=f"{'cross-entropy' if loss == 'ce' else 'linear loss'}, width {width}")
    vals = [v for b in init.values() for r in b.values() for v in r["lambda_max"] + [abs(u) for u in r["lambda_min"]]]
    lim = [min(vals) / 2, max(vals) * 2]
    ax.plot(lim, lim, "k:", lw=1, label="|λ_min| = λ_max")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("λ_max")
    ax.set_ylabel("|λ_min|")
    ax.set_title("at Kaiming initialisation (one batch of 128)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    ax = axes[1]
    for loss, c in (("ce", "tab:blue"), ("linear", "tab:red")):
        mean = [init[str(w)][loss]["ratio_mean"] for w in widths]
        std = [init[str(w)][loss]["ratio_std"] for w in widths]
        ax.errorbar(widths, mean, yerr=std, color=c, marker="o", capsize=3,
                    label="cross-entropy" if loss == "ce" else "linear loss")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width")
    ax.set_ylabel("|λ_min| / λ_max (mean ± std over seeds)")
    ax.set_title("curvature balance at initialisation", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(train["epoch"], train["ratio"], "k-o", ms=3, label="|λ_min| / λ_max")
    ax.plot(train["epoch"], [1 / r if r > 0 else float("nan") for r in train["ratio"]], "g-s", ms=3,
            label="λ_max / |λ_min| (paper's Fig. 6)")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_title(f"during SGD training, width {train_width} (CE, fixed probe batch)", fontsize=9)
    ax2 = ax.twinx()
    ax2.plot(train["epoch"], train["lambda_max"], "b--", lw=1, label="λ_max")
    ax2.plot(train["epoch"], [abs(v) for v in train["lambda_min"]], "r--", lw=1, label="|λ_min|")
    ax2.set_yscale("log")
    ax2.set_ylabel("eigenvalue magnitude")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="center right")
    return save_figure(fig, png, suptitle="Curvature paper Fig. 3 / Fig. 6 at toy scale: ReLU MLP on digits")


def main() -> None:
    args = script_args(__doc__, "tiny run for the smoke test")
    t0 = time.perf_counter()
    quick = args.quick
    widths = [32, 128] if quick else [32, 64, 128, 256, 512]
    seeds = list(range(2 if quick else 5))
    epochs = 4 if quick else 40
    max_iter = 60 if quick else 100
    train_width = 64 if quick else 128

    images, labels = load_digits_tensors()
    x_all = images.reshape(images.shape[0], -1)
    perm = torch.randperm(x_all.shape[0], generator=torch.Generator().manual_seed(0))
    # the probe batch is a fixed batch *of the training set* (paper appendix I: "a small batch of training dataset")
    xb, yb = x_all[perm[:PROBE]], labels[perm[:PROBE]]
    x_tr, y_tr = x_all, labels

    init = at_init(widths, seeds, xb, yb, max_iter)
    print(f"[init] done ({time.perf_counter() - t0:.0f}s)", flush=True)
    train = during_training(train_width, epochs, x_tr, y_tr, xb, yb, max_iter, seed=0)
    print(f"[train] ratio epoch 0 {train['ratio'][0]:.4f} -> epoch {epochs} {train['ratio'][-1]:.4f} "
          f"(train acc {train['train_acc'][-1]:.3f}) ({time.perf_counter() - t0:.0f}s)", flush=True)

    png = plot(init, train, widths, train_width,
               args.out / ("repro_curvature_quick.png" if quick else "repro_curvature_balance.png"))
    emit({
        "claim": "curvature paper Fig. 3/6: cross-entropy biases the Hessian to positive curvature (linear loss does "
                 "not), and the imbalance grows during training",
        "config": {"quick": quick, "widths": widths, "seeds": seeds, "epochs": epochs, "max_iter": max_iter,
                   "probe_batch": PROBE, "train_width": train_width, "depth": 2},
        "init": init,
        "training": train,
    }, png=png, t0=t0)


if __name__ == "__main__":
    main()
