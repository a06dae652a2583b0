"""Data sets and the batch-order contract.

The torchvision loaders are exercised for real, offline: each test writes a tiny data set in the
on-disk format torchvision reads (MNIST idx files, CIFAR pickles, SVHN .mat, an ImageFolder).
"""
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from src.Data import (DATASETS, REGRESSION_DATASETS, BatchStream, LinearRegressionDataset, LoaderBatchStream,
                      TensorBatchStream, epoch_permutation, generate_imagedata, generate_regressiondata,
                      load_data, stratified_subset)
from src.Data import datasets as datasets_module
from src.Data import decoded as decoded_module
from src.Data import images as images_module

TORCHVISION_SETS = ["mnist", "mini_mnist", "mnist_flat", "cifar10", "cifar100", "svhn", "imagenet"]


class _Decoded(Dataset):
    """Wraps tensors as a plain map-style data set, so that batching goes through a DataLoader."""

    def __init__(self, inputs, targets):
        self.inputs, self.targets = inputs, targets

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, i):
        return self.inputs[i], self.targets[i]


def _toy(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.arange(n)  # target i identifies sample i


def _streams(n=50, batch_size=8, seed=3):
    """The same order through both implementations: tensors, DataLoader (0 and 2 workers)."""
    x, y = _toy(n)
    return [TensorBatchStream(x, y, batch_size, seed),
            LoaderBatchStream(_Decoded(x, y), batch_size, seed, torch.device("cpu"), num_workers=0),
            LoaderBatchStream(_Decoded(x, y), batch_size, seed, torch.device("cpu"), num_workers=2)]


# --- digits and regression ------------------------------------------------------------------------

def test_digits_shapes_classes_and_normalisation():
    data = load_data("digits")
    x, y = data.train.tensors
    assert (data.task, data.input_shape, data.output_dim) == ("classification", (3, 32, 32), 10)
    assert len(data.train) + len(data.test) == 1797 and len(data.test) == 359
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.shape == (len(data.train),)
    assert set(y.tolist()) == set(range(10)) == set(data.test.tensors[1].tolist())
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-4
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert torch.equal(x[:, 0, :4, :4], x[:, 0, :1, :1].expand(-1, 4, 4))  # nearest 8 -> 32


def test_digits_split_is_stratified_and_seeded():
    train, test, _ = generate_imagedata("digits_flat", seed=0)
    n_train, n_test = (torch.bincount(d.tensors[1], minlength=10) for d in (train, test))
    assert ((n_test - 0.2 * (n_train + n_test)).abs() <= 1).all()
    other, _, _ = generate_imagedata("digits_flat", seed=1)
    again, _, _ = generate_imagedata("digits_flat", seed=0)
    assert torch.equal(train.tensors[0], again.tensors[0])
    assert not torch.equal(train.tensors[0], other.tensors[0])


def test_digits_flat_is_standardised_and_matches_sklearn():
    from sklearn.datasets import load_digits
    pixels, labels = images_module._read_digits()
    sk_pixels, sk_labels = load_digits(return_X_y=True)
    assert np.array_equal(pixels.numpy(), sk_pixels) and np.array_equal(labels.numpy(), sk_labels)
    data = load_data("digits_flat")
    x = data.train.tensors[0]
    assert data.input_shape == (64,)
    varying = x.std(0) > 0
    assert torch.allclose(x.mean(0), torch.zeros(64), atol=1e-5)
    assert torch.allclose(x.std(0)[varying], torch.ones(int(varying.sum())), atol=1e-4)


def test_stratified_subset_exact_size_and_proportions():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    picked = stratified_subset(labels, 10, seed=0)
    assert len(picked) == len(picked.unique()) == 10
    assert torch.bincount(labels[picked]).tolist() == [5, 3, 2]
    assert not torch.equal(picked, stratified_subset(labels, 10, seed=1))
    skewed = torch.tensor([0] + [1] * 2 + [2] * 7)  # quotas 0.4, 0.8, 2.8: the remainders decide
    assert torch.bincount(skewed[stratified_subset(skewed, 4, seed=0)], minlength=3).tolist() == [0, 1, 3]


@pytest.mark.parametrize("name", sorted(REGRESSION_DATASETS))
def test_regression_sets(name):
    data = load_data(name, seed=0)
    x, y = data.train.tensors
    assert (data.task, data.input_shape, data.output_dim) == ("regression", (10,), 1)
    assert x.dtype == y.dtype == torch.float32 and y.shape == (len(x), 1)
    xb, yb = data.batches(32, seed=0)[3]
    assert xb.shape == (32, 10) and yb.shape == (32, 1)


def test_ones_is_all_ones_and_diabetes_is_standardised():
    assert all(torch.all(t == 1) for t in generate_regressiondata("ones")[0].tensors)
    train, test, dim = generate_regressiondata("diabetes", seed=0)
    assert len(train) + len(test) == 442 and dim == 1
    for t in train.tensors:
        assert torch.allclose(t.mean(0), torch.zeros(t.shape[1]), atol=1e-5)
        assert torch.allclose(t.std(0), torch.ones(t.shape[1]), atol=1e-5)


def test_synthetic_regression_recovers_true_parameters():
    data = load_data("synthetic_regression", seed=4)
    train = data.train
    assert isinstance(train, LinearRegressionDataset) and train.w_star.shape == (10, 1)
    x, y = train.tensors
    design = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, y.double()).solution
    assert torch.allclose(solution[:10].float(), train.w_star, atol=5e-3)
    assert torch.allclose(solution[10].float(), train.b_star, atol=5e-3)
    other = generate_regressiondata("synthetic_regression", seed=5)[0]
    assert not torch.equal(other.w_star, train.w_star)


def test_unknown_dataset_lists_sorted_names():
    with pytest.raises(ValueError) as info:
        load_data("nope")
    message = str(info.value)
    assert "'nope'" in message and str(sorted(DATASETS)) in message
    assert set(TORCHVISION_SETS) | {"digits", "digits_flat", "ones", "synthetic_regression", "diabetes",
                                    "python_docs"} == set(DATASETS)


# --- the data-order contract ----------------------------------------------------------------------

def test_batches_follow_the_documented_permutation_rule():
    stream = _streams()[0]
    assert stream.batches_per_epoch == 50 // 8
    for t in (0, 5, 6, 13):
        epoch, k = divmod(t, 6)
        perm = torch.randperm(50, generator=torch.Generator().manual_seed(3 + 1_000_003 * epoch))
        assert torch.equal(stream[t][1], perm[k * 8:(k + 1) * 8])
        assert torch.equal(stream.indices(t), perm[k * 8:(k + 1) * 8])
    assert torch.equal(epoch_permutation(50, 3, 2), torch.randperm(50, generator=torch.Generator().manual_seed(
        3 + 2 * 1_000_003)))


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["tensors", "loader", "loader_2_workers"])
def test_random_access_matches_sequential_reading(kind):
    stream = _streams()[kind]
    sequential = [stream[t][1].clone() for t in range(15)]  # crosses two epoch boundaries
    fresh = _streams()[kind]
    for t in (5, 2, 5, 14, 0, 1, 2, 13):
        assert torch.equal(fresh[t][1], sequential[t]), t
    reference = _streams()[0]
    assert all(torch.equal(reference[t][1], sequential[t]) for t in range(15))


@pytest.mark.parametrize("kind", [0, 1], ids=["tensors", "loader"])
def test_every_sample_once_per_epoch_and_inputs_match_targets(kind):
    x, _ = _toy()
    stream = _streams(batch_size=10)[kind]  # 50 / 10: no remainder, so every sample is seen
    for epoch in range(2):
        batches = [stream[epoch * 5 + k] for k in range(5)]
        seen = torch.cat([b[1] for b in batches])
        assert torch.equal(seen.sort().values, torch.arange(50))
        assert all(torch.equal(xb, x[yb]) for xb, yb in batches)
    assert not torch.equal(torch.cat([stream[k][1] for k in range(5)]), torch.cat([stream[5 + k][1] for k in range(5)]))


def test_drop_last_clamp_and_seeds():
    x, y = _toy(50)
    stream = TensorBatchStream(x, y, 8, seed=0)  # 6 batches of 8; 2 samples left out per epoch
    seen = torch.cat([stream[k][1] for k in range(6)])
    assert len(seen) == len(seen.unique()) == 48
    assert all(len(stream[t][1]) == 8 for t in range(20))
    whole = TensorBatchStream(x, y, 500, seed=0)
    assert (whole.batch_size, whole.batches_per_epoch) == (50, 1) and len(whole[3][1]) == 50
    assert not torch.equal(TensorBatchStream(x, y, 8, seed=1)[0][1], stream[0][1])
    assert torch.equal(TensorBatchStream(x, y, 8, seed=0)[7][1], stream[7][1])
    with pytest.raises(IndexError):
        stream[-1]
    with pytest.raises(ValueError, match="batch_size"):
        TensorBatchStream(x, y, 0, seed=0)


def test_loader_stream_survives_pickling():
    stream = _streams()[1]
    first = stream[4][1]
    copy = pickle.loads(pickle.dumps(stream))
    assert isinstance(copy, BatchStream) and torch.equal(copy[4][1], first) and torch.equal(copy[5][1], stream[5][1])


# --- eval_batches and sample_batch ----------------------------------------------------------------

def _as_decoded(data):
    """The same TaskData with its splits behind a DataLoader (the torchvision code path)."""
    data.train, data.test = (_Decoded(*d.tensors) for d in (data.train, data.test))
    return data


@pytest.mark.parametrize("decoded, cache_bytes", [(False, None), (True, None), (True, 0)],
                         ids=["tensors", "loader_cached", "loader_streamed"])
def test_eval_batches_and_sample_batch_are_fixed_and_leave_training_alone(decoded, cache_bytes, monkeypatch):
    data = load_data("digits_flat", num_workers=0)
    if decoded:
        data = _as_decoded(data)
    if cache_bytes is not None:
        monkeypatch.setattr(datasets_module, "EVAL_CACHE_BYTES", cache_bytes)
    reference = [data.batches(32, seed=0)[t][1] for t in range(4)]
    stream = data.batches(32, seed=0)
    got = []
    for t in range(4):
        got.append(stream[t][1])
        chunks = list(data.eval_batches("test", max_samples=100, batch_size=40))
        assert [len(c[1]) for c in chunks] == [40, 40, 20]
        x, y = data.sample_batch("train", 16, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(got, reference))
    again = torch.cat([c[1] for c in data.eval_batches("test", max_samples=100, batch_size=40)])
    assert torch.equal(torch.cat([c[1] for c in chunks]), again)
    assert torch.equal(again, data.test[data.eval_indices("test", 100)][1])
    whole = torch.cat([c[1] for c in data.eval_batches("test")])
    assert len(whole) == len(data.test) and torch.equal(whole[:100], again)
    first_50 = torch.cat([c[0] for c in data.eval_batches("test", 50)])
    assert torch.equal(first_50, data.test[data.eval_indices("test", 50)][0])
    assert torch.equal(data.sample_batch("train", 16, seed=7)[0], x)
    assert not torch.equal(data.sample_batch("train", 16, seed=8)[1], y)
    assert len(data.sample_batch("train", 10**6, seed=0)[1]) == len(data.train)
    with pytest.raises(ValueError, match="'valid'"):
        data.eval_batches("valid")


# --- torchvision formats written to tmp_path --------------------------------------------------------

def _write_mnist(root, n_train=30, n_test=12):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())
        written[prefix] = (images, labels)
    return written


def test_mnist_from_idx_files(tmp_path):
    written = _write_mnist(tmp_path)
    data = load_data("mnist", root=tmp_path, num_workers=0)
    assert (data.input_shape, data.output_dim, len(data.train), len(data.test)) == ((3, 32, 32), 10, 30, 12)
    x, y = data.batches(8, seed=0)[1]
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.int64
    assert torch.equal(y, torch.as_tensor(written["train"][1], dtype=torch.int64)[data.batches(8, 0).indices(1)])
    assert torch.equal(x[:, 0], x[:, 2])
    flat = load_data("mnist_flat", root=tmp_path, num_workers=0)
    image, label = flat.test[3]
    expected = (torch.as_tensor(written["t10k"][0][3], dtype=torch.float32).flatten() / 255 - 0.1307) / 0.3081
    assert flat.input_shape == (784,) and label == 3 and torch.allclose(image, expected, atol=1e-5)


def test_mini_mnist_is_a_stratified_tensor_subset(tmp_path, monkeypatch):
    _write_mnist(tmp_path, n_train=60)
    monkeypatch.setattr(decoded_module, "MINI_MNIST_SIZE", 20)
    data = load_data("mini_mnist", root=tmp_path, seed=1, num_workers=0)
    assert isinstance(data.train, TensorDataset) and data.train.tensors[0].shape == (20, 3, 32, 32)
    assert torch.bincount(data.train.tensors[1]).tolist() == [2] * 10 and len(data.test) == 12


@pytest.mark.parametrize("name, folder, files, label_key, meta, classes", [
    ("cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels",
     ("batches.meta", "label_names"), 10),
    ("cifar100", "cifar-100-python", ["train", "test"], "fine_labels", ("meta", "fine_label_names"), 100),
])
def test_cifar_from_pickles(tmp_path, monkeypatch, name, folder, files, label_key, meta, classes):
    import torchvision.datasets.cifar
    # torchvision checks the md5 of the real files; ours are tiny stand-ins, so check existence only.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    (tmp_path / folder).mkdir()
    rng = np.random.default_rng(1)
    batches = {}
    for i, file in enumerate(files):
        batches[file] = {"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8),
                         label_key: [(i * 6 + j) % classes for j in range(6)]}
        (tmp_path / folder / file).write_bytes(pickle.dumps(batches[file]))
    (tmp_path / folder / meta[0]).write_bytes(pickle.dumps({meta[1]: [f"c{i}" for i in range(classes)]}))
    data = load_data(name, root=tmp_path, num_workers=0)
    assert (data.input_shape, data.output_dim, len(data.test)) == ((3, 32, 32), classes, 6)
    assert len(data.train) == 6 * (len(files) - 1)
    image, label = data.test[2]
    raw = torch.as_tensor(batches[files[-1]]["data"][2], dtype=torch.float32).view(3, 32, 32) / 255
    mean, std = (torch.tensor(s).view(3, 1, 1) for s in (decoded_module.CIFAR10_STATS if classes == 10
                                                         else decoded_module.CIFAR100_STATS))
    assert label == batches[files[-1]][label_key][2] and torch.allclose(image, (raw - mean) / std, atol=1e-5)


def test_svhn_from_mat_files(tmp_path, monkeypatch):
    import scipy.io
    import torchvision.datasets.svhn
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    (tmp_path / "svhn").mkdir()
    for split, n in (("train", 10), ("test", 5)):
        labels = np.arange(1, n + 1).reshape(n, 1) % 10 + (np.arange(1, n + 1).reshape(n, 1) % 10 == 0) * 10
        scipy.io.savemat(tmp_path / "svhn" / f"{split}_32x32.mat",
                         {"X": np.zeros((32, 32, 3, n), np.uint8), "y": labels.astype(np.uint8)})
    data = load_data("svhn", root=tmp_path, num_workers=0)
    assert (data.input_shape, len(data.train), len(data.test)) == ((3, 32, 32), 10, 5)
    assert [data.train[i][1] for i in range(10)] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # label 10 means digit 0


def test_imagenet_from_image_folder(tmp_path):
    from PIL import Image
    for split, per_class in (("train", 3), ("val", 2)):
        for c, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
            folder = tmp_path / "imagenet" / split / f"n0{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (48, 40), colour).save(folder / f"{i}.png")
    data = load_data("imagenet", root=tmp_path, num_workers=0)
    assert (data.input_shape, data.output_dim, len(data.train), len(data.test)) == ((3, 32, 32), 2, 6, 4)
    x, y = data.sample_batch("test", 4, seed=0)
    assert x.shape == (4, 3, 32, 32)
    red = x[:, 0].mean((1, 2)) > x[:, 2].mean((1, 2))
    assert torch.equal(red, y == 0)
    (tmp_path / "imagenet" / "val" / "n02").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imagenet" / "val" / "n02" / "0.png")
    with pytest.raises(ValueError, match="same class"):
        load_data("imagenet", root=tmp_path)


@pytest.mark.parametrize("name", TORCHVISION_SETS)
def test_missing_files_fail_at_once_with_a_useful_message(tmp_path, name):
    with pytest.raises(FileNotFoundError) as info:
        load_data(name, root=tmp_path, download=False)
    message = str(info.value)
    assert f"'{name}'" in message and str(tmp_path) in message and "'digits'" in message
    assert info.value.__cause__ is not None
