"""Seconds per image of the FID Inception-v3 pass on one thread: the plain path (convolution, then batch
norm, contiguous layout) against flowscore's (the batch norm folded into the convolution, channels-last),
run alternately on the same batch so that both see the same machine load; and the resize's own cost.

    python bench/bench_inception.py [--rounds 3] [--batch 16]

Prints the largest feature difference of the two paths and each round's seconds per image with the median.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from flowscore import inception


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    new = inception.network("cpu")
    plain = inception.InceptionFID(inception.load_weights()).eval()
    for conv in plain.convs.values():  # back to convolution + batch norm
        conv.fused_weight = conv.fused_bias = None
    x = torch.rand(args.batch, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 255
    start = time.perf_counter()
    inp = inception.to_inception_input(x, (0, 255))
    resize = (time.perf_counter() - start) / args.batch
    fast = inp.contiguous(memory_format=inception.MEMORY_FORMAT)
    seconds: dict[str, list[float]] = {"plain": [], "flowscore": []}
    with torch.inference_mode():
        diff = float((plain(inp) - new(fast)).abs().max())
        for _ in range(args.rounds):
            for name, net, data in (("plain", plain, inp), ("flowscore", new, fast)):
                start = time.perf_counter()
                net(data)
                seconds[name].append((time.perf_counter() - start) / args.batch)
    print(
        f"largest feature difference: {diff:.2e}; resize and quantisation: {1000 * resize:.1f} ms per image"
    )
    for name, values in seconds.items():
        rounds = " ".join(f"{v:.3f}" for v in values)
        print(f"{name}: s per image {rounds}; median {statistics.median(values):.3f}")


if __name__ == "__main__":
    main()
