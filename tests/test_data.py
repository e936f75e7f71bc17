"""data.load and the file formats: official layouts, and corrupt, truncated and malicious files."""
import gzip
import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest

import data
from data import checksums, synthetic
from data import datasets as D
from data.formats import RestrictedUnpickler


def listing(root):
    """Every path under root, to show that a failed load wrote nothing."""
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, ds, fs in os.walk(root) for f in ds + fs)


def expect_error(fn, *fragments, path=None):
    """fn() raises DatasetError with a one-line message holding the fragments and the file."""
    with pytest.raises(data.DatasetError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and msg.strip() == msg
    for frag in fragments:
        assert frag in msg, msg
    if path is not None:
        assert str(path) in msg, msg
    return msg


@pytest.fixture
def cifar10(tmp_path):
    batches = synthetic.random_cifar("cifar10", 23, 7, seed=1)  # uneven batch sizes: 5,5,5,4,4
    path = synthetic.write_cifar_archive(tmp_path / "cifar-10-python.tar.gz", "cifar10", batches)
    return tmp_path, path, batches


def expected(batches, split):
    members = data.DATASETS["cifar10"]["splits"][split]
    return (np.concatenate([batches[m][0] for m in members]),
            np.concatenate([batches[m][1] for m in members]))


# ---------------------------------------------------------------- good files


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_archive_exact(cifar10, split):
    root, path, batches = cifar10
    x, y = data.load("cifar10", root, split)
    ex, ey = expected(batches, split)
    assert x.dtype == np.uint8 and x.shape == ex.shape and x.flags.c_contiguous and x.flags.writeable
    assert y.dtype == np.int64 and y.shape == (len(ex),)
    np.testing.assert_array_equal(x, ex)
    np.testing.assert_array_equal(y, ey)
    assert listing(root) == ["cifar-10-python.tar.gz"]  # read in place: nothing extracted


def test_cifar10_equal_batches_and_channel_planes(tmp_path):
    # batches of equal size take the preallocated path; rows are the R, G, B planes of 32x32
    batches = synthetic.random_cifar("cifar10", 10, 2, seed=3)
    r = np.zeros((3, 32, 32), np.uint8)
    r[0], r[1, 0, 5], r[2, 31, 0] = 200, 17, 99
    batches["data_batch_2"][0][1] = r
    batches = dict(reversed(list(batches.items())))  # archive order need not be sorted
    synthetic.write_cifar_archive(tmp_path / "cifar-10-python.tar.gz", "cifar10", batches)
    x, y = data.load("cifar10", tmp_path)
    row = synthetic.cifar_batch(*batches["data_batch_2"])[b"data"][1]  # the stored 3072 bytes
    assert row[0] == 200 and row[1024 + 5] == 17 and row[2048 + 31 * 32] == 99
    np.testing.assert_array_equal(x[3], r)  # batch 2, image 1 of 2 per batch
    np.testing.assert_array_equal(y, np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)]))


def test_cifar10_extracted_folder_and_subfolder(cifar10, tmp_path_factory):
    root, path, batches = cifar10
    other = tmp_path_factory.mktemp("other")
    with tarfile.open(path) as tf:
        tf.extractall(other / "cifar10", filter="data")  # root/<name>/cifar-10-batches-py/
    assert (other / "cifar10" / "cifar-10-batches-py" / "data_batch_5").is_file()
    for split in ("train", "test"):
        x, y = data.load("cifar10", other, split)
        ex, ey = expected(batches, split)
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)


def test_cifar10_archive_in_subfolder(cifar10, tmp_path_factory):
    root, path, batches = cifar10
    other = tmp_path_factory.mktemp("sub")
    os.makedirs(other / "cifar10")
    os.replace(path, other / "cifar10" / "cifar-10-python.tar.gz")
    np.testing.assert_array_equal(data.load("cifar10", str(other), "test")[0], expected(batches, "test")[0])


def test_cifar100_fine_labels_python3_protocol2(tmp_path):
    # Python 3's protocol-2 pickles store bytes as _codecs.encode(str, "latin1"): still readable
    batches = synthetic.random_cifar("cifar100", 12, 5, seed=2)
    synthetic.write_cifar_archive(tmp_path / "cifar-100-python.tar.gz", "cifar100", batches,
                                  pickler=lambda o: pickle.dumps(o, protocol=2))
    for split in ("train", "test"):
        x, y = data.load("cifar100", tmp_path, split)
        np.testing.assert_array_equal(x, batches[split][0])
        np.testing.assert_array_equal(y, batches[split][1])  # fine, not coarse (= fine // 5)
    assert y.max() >= 5  # the coarse labels would all be < 20, fine ones span 0..99


def test_py2_pickle_matches_pickle_module():
    d = synthetic.cifar_batch(np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3, 32, 32) % 251, [3, 9])
    blob = synthetic.py2_pickle(d)
    assert blob.startswith(b"\x80\x02}(") and b"cnumpy.core.multiarray\n_reconstruct\n" in blob
    with pytest.raises(UnicodeDecodeError):  # like the originals, needs encoding="bytes"
        pickle.loads(blob)
    a = pickle.loads(blob, encoding="bytes")
    b = RestrictedUnpickler(io.BytesIO(blob), "x").load()
    assert a.keys() == b.keys() == {b"batch_label", b"data", b"labels", b"filenames"}
    np.testing.assert_array_equal(a[b"data"], b[b"data"])
    assert b[b"data"].dtype == np.uint8 and b[b"labels"] == [3, 9]


def make_idx(folder, n_train=9, n_test=4, gz=True):
    out = synthetic.write_idx_dataset(folder, n_train, n_test, seed=5)
    if not gz:
        for f in os.listdir(folder):
            with gzip.open(os.path.join(folder, f)) as src, open(os.path.join(folder, f[:-3]), "wb") as dst:
                dst.write(src.read())
            os.remove(os.path.join(folder, f))
    return out


@pytest.mark.parametrize("layout", ["", "mnist", "MNIST/raw", "MNIST/raw-plain"])
def test_idx_layouts(tmp_path, layout):
    folder = tmp_path / layout.replace("-plain", "")
    ref = make_idx(folder, gz=not layout.endswith("plain"))
    for split in ("train", "test"):
        x, y = data.load("mnist", tmp_path, split)
        assert x.dtype == np.uint8 and x.shape == (len(ref[split][0]), 1, 28, 28) and x.flags.writeable
        assert y.dtype == np.int64
        np.testing.assert_array_equal(x, ref[split][0])
        np.testing.assert_array_equal(y, ref[split][1])


def test_bad_name_and_split(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*cifar10"):
        data.load("imagenet", tmp_path)
    with pytest.raises(ValueError, match="unknown split 'val'"):
        data.load("mnist", tmp_path, split="val")


@pytest.mark.parametrize("name,missing", [("cifar10", "cifar-10-python.tar.gz"),
                                          ("cifar100", "cifar-100-python.tar.gz"),
                                          ("mnist", "train-images-idx3-ubyte.gz"),
                                          ("fashion-mnist", "train-images-idx3-ubyte.gz")])
def test_missing_files(tmp_path, name, missing):
    expect_error(lambda: data.load(name, tmp_path), missing, "download=True", path=tmp_path)
    assert listing(tmp_path) == []


def test_missing_label_file(tmp_path):
    make_idx(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    data.load("mnist", tmp_path, "train")
    expect_error(lambda: data.load("mnist", tmp_path, "test"), "t10k-labels-idx1-ubyte.gz")


def test_incomplete_extracted_folder(cifar10, tmp_path_factory):
    root, path, _ = cifar10
    other = tmp_path_factory.mktemp("half")
    with tarfile.open(path) as tf:
        tf.extractall(other, filter="data")
    os.remove(other / "cifar-10-batches-py" / "data_batch_3")
    expect_error(lambda: data.load("cifar10", other), "incomplete",
                 path=other / "cifar-10-batches-py" / "data_batch_3")
    data.load("cifar10", other, "test")  # the test batch is still there


# ---------------------------------------------------------------- malicious files


class Evil:
    """Unpickling this runs os.system: the loader must never let it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [Evil(marker)]}
    blob = pickle.dumps(evil, protocol=2)
    # the bait works: an ordinary unpickler would run it (checked on a second marker)
    pickle.loads(pickle.dumps(Evil(tmp_path / "bait"), protocol=2))
    assert (tmp_path / "bait").exists()
    batches = synthetic.random_cifar("cifar10", 5, 1)
    batches["data_batch_3"] = blob
    root = tmp_path / "r"
    root.mkdir()
    synthetic.write_cifar_archive(root / "cifar-10-python.tar.gz", "cifar10", batches)
    msg = expect_error(lambda: data.load("cifar10", root), "refusing to unpickle", "system",
                       path=root / "cifar-10-python.tar.gz")
    assert "data_batch_3" in msg
    assert not marker.exists()
    # the same from an extracted folder
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(blob)
    expect_error(lambda: data.load("cifar10", root, "test"), "refusing", path=folder / "test_batch")
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1q\x85R.",  # GLOBAL builtins.eval
    b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x8c\x04exec\x93.",  # STACK_GLOBAL
    b"\x80\x02cnumpy\nload\n.",  # a numpy function, not on the list
    b"\x80\x02ccopyreg\n_reconstructor\n.",
    b"\x80\x02X\x01\x00\x00\x00aQ.",  # BINPERSID: a persistent id
])
def test_unpickler_refuses_other_globals(payload):
    with pytest.raises(data.DatasetError, match="refusing"):
        RestrictedUnpickler(io.BytesIO(payload), "f.pkl").load()


def _member(name, kind=tarfile.REGTYPE, link=""):
    t = tarfile.TarInfo(name)
    t.type, t.linkname = kind, link
    return t, (b"" if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize("member,reason", [
    (_member("../evil"), "'..' path"),
    (_member("cifar-10-batches-py/../../evil"), "'..' path"),
    (_member("{tmp}/evil_abs"), "absolute path"),      # {tmp}: the test's own folder, absolute
    (_member("cifar-10-batches-py/link", tarfile.SYMTYPE, "/etc/passwd"), "link"),
    (_member("cifar-10-batches-py/hard", tarfile.LNKTYPE, "cifar-10-batches-py/test_batch"), "link"),
    (_member("cifar-10-batches-py/dev", tarfile.CHRTYPE), "device"),
])
def test_unsafe_tar_members(tmp_path, member, reason):
    info, _ = member
    member = _member(info.name.format(tmp=tmp_path), info.type, info.linkname)
    root = tmp_path / "deep" / "root"
    root.mkdir(parents=True)
    path = root / "cifar-10-python.tar.gz"
    synthetic.write_cifar_archive(path, "cifar10", synthetic.random_cifar("cifar10", 5, 2), extra=[member])
    before = listing(tmp_path)
    expect_error(lambda: data.load("cifar10", root, "test"), "unsafe archive member", reason, path=path)
    assert listing(tmp_path) == before      # nothing written, the absolute member's target included


def test_symlinked_member_name_is_refused(tmp_path):
    # a symlink posing as a wanted batch: never followed
    path = tmp_path / "cifar-10-python.tar.gz"
    batches = synthetic.random_cifar("cifar10", 5, 0)
    del batches["test_batch"]
    link = _member("cifar-10-batches-py/test_batch", tarfile.SYMTYPE, "/etc/passwd")
    synthetic.write_cifar_archive(path, "cifar10", batches, extra=[link])
    expect_error(lambda: data.load("cifar10", tmp_path, "test"), "unsafe", "/etc/passwd")


# ---------------------------------------------------------------- corrupt and truncated files


def test_truncated_and_corrupt_archive(cifar10):
    root, path, _ = cifar10
    blob = path.read_bytes()
    for cut in (len(blob) // 2, len(blob) - 5, 30):
        path.write_bytes(blob[:cut])
        expect_error(lambda: data.load("cifar10", root, "test"), "truncated or corrupt", path=path)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x40  # one bit in the middle (stored random data: only the CRC sees it)
    path.write_bytes(bytes(flipped))
    expect_error(lambda: data.load("cifar10", root, "train"), "truncated or corrupt", path=path)
    path.write_bytes(b"this is not an archive at all")
    expect_error(lambda: data.load("cifar10", root), path=path)
    assert listing(root) == ["cifar-10-python.tar.gz"]


def cifar_with(tmp_path, member, obj, pickler=pickle.dumps):
    batches = synthetic.random_cifar("cifar10", 5, 3)
    batches[member] = obj if isinstance(obj, bytes) else pickler(obj, protocol=2)
    synthetic.write_cifar_archive(tmp_path / "cifar-10-python.tar.gz", "cifar10", batches)
    return lambda: data.load("cifar10", tmp_path, "test" if member == "test_batch" else "train")


@pytest.mark.parametrize("obj,fragment", [
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]}, "outside 0..9"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [-1, 0]}, "outside 0..9"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2, 3]}, "2 images but 3 labels"),
    ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [1, 2]}, "uint8 (N, 3072)"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [1, 2]}, "uint8 (N, 3072)"),
    ({b"data": b"\x00" * 3072, b"labels": [1]}, "found bytes"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, "missing key 'labels'"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [b"a", b"b"]}, "not a flat list of ints"),
    ([1, 2, 3], "expected a dict"),
    (b"\x80\x02}q\x00(U\x04dataq", "not a valid pickle"),  # truncated pickle
])
def test_bad_cifar_contents(tmp_path, obj, fragment):
    msg = expect_error(cifar_with(tmp_path, "test_batch", obj), fragment,
                       path=tmp_path / "cifar-10-python.tar.gz")
    assert "test_batch" in msg


def test_cifar100_label_range(tmp_path):
    batches = synthetic.random_cifar("cifar100", 4, 3)
    batches["test"] = (batches["test"][0], np.array([0, 99, 100]))
    synthetic.write_cifar_archive(tmp_path / "cifar-100-python.tar.gz", "cifar100", batches)
    data.load("cifar100", tmp_path, "train")
    expect_error(lambda: data.load("cifar100", tmp_path, "test"), "fine_labels", "outside 0..99")


def write_gz(path, raw):
    with gzip.open(path, "wb") as f:
        f.write(raw)


@pytest.mark.parametrize("case,fragment", [
    ("magic", "wrong magic number 2049"),
    ("short", "truncated: 2351 of 7056"),
    ("trailing", "trailing bytes"),
    ("header", "truncated header"),
    ("gzcut", "truncated or corrupt"),
    ("notgz", "truncated or corrupt"),
    ("count", "9 labels but"),
    ("label", "outside 0..9"),
])
def test_bad_idx_files(tmp_path, case, fragment):
    make_idx(tmp_path)
    images = tmp_path / "t10k-images-idx3-ubyte.gz"
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())  # 4 images: 16 + 4 * 784 bytes
    target = images
    if case == "magic":
        write_gz(images, synthetic.idx_bytes(np.zeros(4, np.uint8)))  # a label file in its place
    elif case == "short":
        write_gz(images, raw[:4] + (9).to_bytes(4, "big") + raw[8:16 + 3 * 784 - 1])  # 9 announced
    elif case == "trailing":
        write_gz(images, raw + b"\x00")
    elif case == "header":
        write_gz(images, raw[:10])
    elif case == "gzcut":
        images.write_bytes(images.read_bytes()[:-12])
    elif case == "notgz":
        images.write_bytes(raw)  # plain bytes under a .gz name
    elif case == "count":
        write_gz(labels, synthetic.idx_bytes(np.zeros(9, np.uint8)))
        target = labels
    elif case == "label":
        write_gz(labels, synthetic.idx_bytes(np.array([0, 3, 10, 1], np.uint8)))
        target = labels
    before = listing(tmp_path)
    expect_error(lambda: data.load("mnist", tmp_path, "test"), fragment, path=target)
    assert listing(tmp_path) == before
    data.load("mnist", tmp_path, "train")  # the other split is untouched


# ---------------------------------------------------------------- where a dataset is found


@pytest.fixture
def system(tmp_path, monkeypatch):
    """An empty system dataset folder standing in for /usr/share/datasets."""
    folder = tmp_path / "system"
    folder.mkdir()
    monkeypatch.setattr(D, "SYSTEM_FOLDERS", (str(tmp_path / "nowhere"), str(folder)))
    return folder


def test_find_root_prefers_root_then_system_folders(tmp_path, system):
    root = tmp_path / "root"
    assert data.find_root("fashion-mnist", root) is None and data.find_root("cifar10") is None
    ref = make_idx(system / "fashion-mnist")
    assert data.find_root("fashion-mnist", root) == str(system / "fashion-mnist")
    assert data.find_root("mnist", root) is None                      # another name, another folder
    make_idx(root / "FashionMNIST" / "raw", n_train=3)                 # any layout load() reads
    assert data.find_root("fashion-mnist", root) == str(root)
    os.remove(root / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte.gz")  # one file short: not there
    assert data.find_root("fashion-mnist", root) == str(system / "fashion-mnist")
    np.testing.assert_array_equal(data.load("fashion-mnist", data.find_root("fashion-mnist", root), "test")[0],
                                  ref["test"][0])
    (system / "cifar100").mkdir()
    synthetic.write_cifar_archive(system / "cifar100" / "cifar-100-python.tar.gz", "cifar100",
                                  synthetic.random_cifar("cifar100", 4, 2))
    assert data.find_root("cifar100", root) == str(system / "cifar100")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.find_root("svhn", root)


def test_find_root_cifar_folder_needs_both_splits(tmp_path, system, cifar10):
    _, path, _ = cifar10
    root = tmp_path / "x"
    with tarfile.open(path) as tf:
        tf.extractall(root, filter="data")
    assert data.find_root("cifar10", root) == str(root)
    os.remove(root / "cifar-10-batches-py" / "test_batch")
    assert data.find_root("cifar10", root) is None


def test_run_and_study_read_the_system_copy(tmp_path, system):
    import run
    from cht.config import make_config
    from cht.study import common

    ref = make_idx(system / "fashion-mnist", n_train=7, n_test=5)
    cfg = make_config(dataset="fashion-mnist", method="dense", data_dir=str(tmp_path / "empty"), limit_test=3)
    for x, y, xt, yt in (run.load_data(cfg, data_dir_given=False), common.load_data(cfg)):
        np.testing.assert_array_equal(x, ref["train"][0])
        np.testing.assert_array_equal(yt, ref["test"][1][:3])
    with pytest.raises(data.DatasetError, match="not found"):          # a folder the user named is the only one
        run.load_data(cfg, data_dir_given=True)


# ---------------------------------------------------------------- the real Fashion-MNIST


def test_real_fashion_mnist(tmp_path):
    root = data.find_root("fashion-mnist", tmp_path)                  # tmp_path is empty: the system copy
    if root is None:
        pytest.skip(f"no Fashion-MNIST in {', '.join(D.SYSTEM_FOLDERS)} (Debian: apt-get install dataset-fashion-mnist)")
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = data.load("fashion-mnist", root, split)
        assert x.shape == (n, 1, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
        np.testing.assert_array_equal(np.bincount(y, minlength=10), [n // 10] * 10)  # balanced
        assert 0.25 < x.mean() / 255 < 0.32  # 0.286: the known training mean is about this
    # Debian re-gzipped the files (other .gz MD5s) but the contents are the official ones
    for fname, md5 in ((f, m) for (d, f), m in checksums.RAW_MD5.items() if d == "fashion-mnist"):
        path, _ = D._find_idx(root, "fashion-mnist", D.DATASETS["fashion-mnist"], fname + ".gz")
        with gzip.open(path) if path.endswith(".gz") else open(path, "rb") as f:
            assert hashlib.md5(f.read()).hexdigest() == md5, fname
