"""Seconds to fit one linear probe: streamgen's torch L-BFGS vs scikit-learn, same features, same search.

The features imitate a ResNet-50's pooled output: ``n`` x 2048, non-negative (after a ReLU),
``classes`` classes that are separable only in part. Both solvers run the whole protocol of
`streamgen.evaluate.probe.linear_probe`: the 14 values of C (one per decade over trex's 1e-5..1e6, then
the half-decades around the best) on a per-class 20% validation split, then the refit on all
training features and the test top-1. scikit-learn is run as trex runs it:
``LogisticRegression(C, solver="lbfgs")`` from scratch for each C on the raw features (same
``tol`` and ``max_iter``). Wall and CPU seconds are both printed: on a shared machine the CPU
time is the steadier figure. Threads: torch's and the BLAS's defaults.

    python bench/probe.py                 # 10k x 2048, 100 classes, CPU
    python bench/probe.py --n 2000 --quick
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from streamgen.evaluate.probe import linear_probe, stratified_split


def make_features(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    centres = rng.normal(0, 1, (classes, dim)) * 0.1
    x = np.maximum(centres[labels] + rng.normal(0, 1, (n, dim)), 0.0)  # ReLU'd like pooled features
    return x.astype(np.float32), labels


def sklearn_probe(
    x_train, y_train, x_test, y_test, tol: float, max_iter: int, seed: int = 0
) -> tuple[float, float, int]:
    """The same search with scikit-learn's solver as the fitter: (C, test top-1, L-BFGS iterations)."""
    from sklearn.linear_model import LogisticRegression

    iterations = []

    def fit(x, y, C):
        model = LogisticRegression(C=C, solver="lbfgs", tol=tol, max_iter=max_iter).fit(x, y)
        iterations.append(int(model.n_iter_.max()))
        return model

    tr, va = stratified_split(torch.as_tensor(y_train), 0.2, seed)
    grid = [10.0**e for e in range(-5, 7)]
    scores = {}

    def score(values):
        for C in sorted(values):
            if C not in scores:
                scores[C] = 100 * fit(x_train[tr], y_train[tr], C).score(x_train[va], y_train[va])

    score(grid)
    best = max(sorted(scores), key=scores.get)
    score([best / 10**0.5, best * 10**0.5])
    best = max(sorted(scores), key=scores.get)
    return best, 100 * fit(x_train, y_train, best).score(x_test, y_test), sum(iterations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10000, help="training features (the test set is a quarter of it)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--tol", type=float, default=1e-6, help="gradient tolerance of both solvers (trex: 1e-4)")
    parser.add_argument("--max_iter", type=int, default=1000, help="L-BFGS iterations per fit, both solvers")
    parser.add_argument("--device", default="cpu", help="device of streamgen's solver (cuda when you have one)")
    parser.add_argument("--quick", action="store_true", help="streamgen's solver only")
    parser.add_argument(
        "--sklearn_centred",
        action="store_true",
        help="give scikit-learn centred features too (trex gives it the raw ones; streamgen centres its own)",
    )
    args = parser.parse_args()

    x, y = make_features(args.n + args.n // 4, args.dim, args.classes)
    x_train, y_train, x_test, y_test = x[: args.n], y[: args.n], x[args.n :], y[args.n :]
    print(
        f"features: {args.n} train + {len(y_test)} test x {args.dim}, {args.classes} classes; "
        f"torch threads {torch.get_num_threads()}, tol {args.tol}, max_iter {args.max_iter}"
    )

    device = torch.device(args.device)
    evals = []
    t0, c0 = time.perf_counter(), time.process_time()
    result = linear_probe(
        torch.as_tensor(x_train, device=device),
        torch.as_tensor(y_train, device=device),
        torch.as_tensor(x_test, device=device),
        torch.as_tensor(y_test, device=device),
        tol=args.tol,
        max_iter=args.max_iter,
        on_eval=lambda: evals.append(1),
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    ours, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(
        f"streamgen (torch L-BFGS, float32, {device.type}): {ours:7.1f} s wall {ours_cpu:7.1f} s CPU  "
        f"{len(evals):5d} loss evaluations   C={result.C:.3g}  test top-1 {result.top1:.2f}"
    )
    if args.quick:
        return
    shift = x_train.mean(0) if args.sklearn_centred else 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    C, top1, iterations = sklearn_probe(x_train - shift, y_train, x_test - shift, y_test, args.tol, args.max_iter)
    theirs, theirs_cpu = time.perf_counter() - t0, time.process_time() - c0
    print(
        f"scikit-learn (lbfgs, float64, cpu):   {theirs:7.1f} s wall {theirs_cpu:7.1f} s CPU  "
        f"{iterations:5d} iterations         C={C:.3g}  test top-1 {top1:.2f}"
    )
    print(
        f"speed-up: {theirs / ours:.1f}x wall, {theirs_cpu / ours_cpu:.1f}x CPU time   "
        f"top-1 difference: {result.top1 - top1:+.2f} points"
    )


if __name__ == "__main__":
    main()
