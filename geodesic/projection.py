"""Projections of a path in weight space to 2-D/3-D, with what each one loses.

PCA: a basis fitted once on the path and then frozen (so axes don't jump as the walk goes on);
points added later are projected onto it, and the per-point residual ‖w − proj(w)‖ says how far off
the picture is. UMAP: on demand (its first fit compiles with numba, so it is imported lazily).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PCABasis:
    mean: np.ndarray  # (d,)
    components: np.ndarray  # (k, d), orthonormal rows
    explained_variance_ratio: np.ndarray  # (k,), of the points it was fitted on
    n_fitted: int  # how many path points the basis was fitted on

    def project(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(coordinates (n, k), residual norm (n,)) of weight vectors `rows` (n, d)."""
        centred = rows - self.mean
        coords = centred @ self.components.T
        residual = np.linalg.norm(centred - coords @ self.components, axis=1)
        return coords, residual


def fit_pca(rows: np.ndarray, n_components: int = 3) -> PCABasis:
    """PCA of the path's weight vectors (scikit-learn; exact SVD for short paths)."""
    from sklearn.decomposition import PCA

    rows = np.asarray(rows, dtype=np.float64)
    k = max(1, min(n_components, len(rows) - 1, rows.shape[1])) if len(rows) > 1 else 1
    if len(rows) < 2:  # one point: any basis; report no explained variance
        comps = np.eye(k, rows.shape[1])
        return PCABasis(rows.mean(0), comps, np.zeros(k), len(rows))
    pca = PCA(n_components=k, svd_solver="full" if min(rows.shape) < 500 else "randomized", random_state=0)
    pca.fit(rows)
    comps = pca.components_
    ratio = pca.explained_variance_ratio_
    if k < n_components:  # pad so 2-D/3-D plots always have their axes
        comps = np.vstack([comps, np.zeros((n_components - k, rows.shape[1]))])
        ratio = np.concatenate([ratio, np.zeros(n_components - k)])
    return PCABasis(pca.mean_, comps, ratio, len(rows))


def umap_embed(rows: np.ndarray, n_components: int = 2, n_neighbors: int = 15, min_dist: float = 0.1,
               metric: str = "euclidean", seed: int = 0) -> np.ndarray:
    """UMAP coordinates (n, n_components) of the path's points (n ≥ 4)."""
    if len(rows) < 4:
        raise ValueError(f"UMAP needs at least 4 points; the path has {len(rows)}")
    import umap

    # n_jobs=1: a seeded UMAP runs on one thread anyway, and said so in a warning on every call (the server's log)
    reducer = umap.UMAP(n_components=n_components, n_neighbors=max(2, min(n_neighbors, len(rows) - 1)),
                        min_dist=min_dist, metric=metric, random_state=seed, n_jobs=1,
                        init="random" if len(rows) < 10 else "spectral")
    return reducer.fit_transform(np.asarray(rows, dtype=np.float32))


def trustworthiness(rows: np.ndarray, coords: np.ndarray, n_neighbors: int = 5) -> float:
    """How well local neighbourhoods survive an embedding (1 = perfectly), scikit-learn's measure."""
    from sklearn.manifold import trustworthiness as tw

    return float(tw(rows, coords, n_neighbors=max(1, min(n_neighbors, len(rows) // 2 - 1))))
