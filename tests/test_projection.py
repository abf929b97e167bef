"""The path's projections: UMAP on demand (seeded, reproducible, quiet) and how much it keeps."""
import warnings

import numpy as np
import pytest

from geodesic.projection import trustworthiness, umap_embed


def test_umap_of_a_path_is_reproducible_and_says_nothing():
    rng = np.random.default_rng(0)
    rows = np.cumsum(rng.normal(size=(60, 50)), axis=0).astype(np.float32)  # a random walk: a path-like curve
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportWarning)
        import umap  # noqa: F401  (its import notes that TensorFlow is missing: nothing of ours)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the seeded UMAP warned about n_jobs on every call (the server's log)
        a = umap_embed(rows, 2, n_neighbors=10)
    b = umap_embed(rows, 2, n_neighbors=10)
    assert a.shape == (60, 2) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b)  # the same path, the same picture
    assert trustworthiness(rows, a) > 0.8
    with pytest.raises(ValueError, match="at least 4 points"):
        umap_embed(rows[:3])
