"""The authors' CIFAR-10 demo run, as a yardstick for ours.

The MoCo authors' CIFAR-10 notebook (ResNet-18 with a CIFAR stem, batch 512, lr 0.06, K 4096,
m 0.99, T 0.1, cosine schedule over 200 epochs; our ``--preset cifar10``) ships the log of one
200-epoch run: weighted-kNN top-1 (k 200, t 0.1) on the 10,000 test images after every epoch.
An epoch there is 97 steps of 512 pairs (the last partial batch dropped). Runs of other lengths
are compared with it at an equal number of image pairs seen (:func:`authors_knn_at`).
"""

from __future__ import annotations

AUTHORS_PAIRS_PER_EPOCH = 97 * 512

# kNN top-1 (%) after epochs 1..200 of the authors' run (final 82.58, best 82.73 at epoch 190).
AUTHORS_CIFAR10_KNN: tuple[float, ...] = (
    31.98, 33.52, 34.71, 36.98, 37.95, 39.87, 41.86, 44.18, 46.34, 48.03,  # epochs 1-10
    49.34, 50.84, 52.52, 53.50, 54.84, 56.23, 57.73, 59.04, 60.11, 61.38,  # epochs 11-20
    63.51, 62.95, 64.78, 64.80, 65.55, 66.31, 65.40, 67.89, 66.85, 67.05,  # epochs 21-30
    68.41, 69.01, 69.03, 69.39, 68.44, 70.37, 70.22, 70.41, 70.69, 71.32,  # epochs 31-40
    70.97, 71.73, 71.72, 72.65, 72.13, 72.78, 72.27, 72.51, 72.76, 73.30,  # epochs 41-50
    73.06, 73.29, 73.77, 73.99, 74.00, 73.58, 74.14, 74.43, 73.82, 75.00,  # epochs 51-60
    74.93, 75.00, 75.40, 75.14, 74.85, 74.99, 74.80, 75.75, 75.63, 75.55,  # epochs 61-70
    75.54, 75.73, 74.88, 76.65, 75.93, 77.07, 76.31, 76.49, 76.66, 77.09,  # epochs 71-80
    76.66, 76.24, 77.02, 77.82, 77.26, 76.72, 76.18, 77.40, 77.31, 76.54,  # epochs 81-90
    77.96, 77.84, 77.68, 78.35, 78.20, 78.34, 77.81, 78.42, 77.46, 78.06,  # epochs 91-100
    78.25, 78.56, 78.54, 78.23, 78.24, 78.75, 78.45, 78.75, 78.59, 79.19,  # epochs 101-110
    79.11, 78.81, 79.27, 79.31, 79.79, 79.71, 79.00, 79.42, 80.32, 79.62,  # epochs 111-120
    79.42, 79.35, 80.02, 79.55, 79.92, 79.83, 80.10, 80.22, 80.23, 80.28,  # epochs 121-130
    80.43, 80.22, 80.65, 80.82, 80.93, 80.52, 80.97, 80.75, 80.79, 81.27,  # epochs 131-140
    81.13, 80.72, 81.32, 80.96, 80.77, 81.13, 81.56, 81.52, 81.27, 81.18,  # epochs 141-150
    81.22, 81.40, 81.73, 81.42, 81.69, 81.61, 82.02, 81.27, 82.02, 81.79,  # epochs 151-160
    82.02, 82.14, 82.09, 82.21, 82.38, 82.27, 82.09, 82.17, 82.22, 82.17,  # epochs 161-170
    82.25, 82.43, 82.59, 82.40, 82.42, 82.43, 82.38, 82.34, 82.53, 82.59,  # epochs 171-180
    82.53, 82.43, 82.31, 82.58, 82.47, 82.53, 82.57, 82.56, 82.64, 82.73,  # epochs 181-190
    82.62, 82.55, 82.66, 82.54, 82.58, 82.61, 82.62, 82.66, 82.57, 82.58,  # epochs 191-200
)


def authors_knn_at(pairs: float) -> float | None:
    """The authors' kNN top-1 (%) after ``pairs`` image pairs, interpolated linearly between
    their epoch ends; None before their first epoch ended or after their last."""
    epoch = pairs / AUTHORS_PAIRS_PER_EPOCH
    n = len(AUTHORS_CIFAR10_KNN)
    if epoch < 1 or epoch > n:
        return None
    lo = min(int(epoch), n - 1)
    frac = epoch - lo
    return AUTHORS_CIFAR10_KNN[lo - 1] + frac * (AUTHORS_CIFAR10_KNN[lo] - AUTHORS_CIFAR10_KNN[lo - 1])
