"""Downloads against a local HTTP server: good, wrong checksum, cut off, offline, HTTP error."""
import hashlib
import http.server
import io
import os
import socket
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

import data
from data import checksums, download, synthetic


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.routes``: path -> (body, Content-Length to announce)."""

    def do_GET(self):
        self.server.hits.append(self.path)
        if self.path not in self.server.routes:
            self.send_error(404, "Not Found")
            return
        body, length = self.server.routes[self.path]
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)  # when length > len(body) the server then just closes

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.routes, srv.hits = {}, []
    t = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    t.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def serve(srv, monkeypatch, dataset, folder, md5=None):
    """Serve every file of ``folder`` under /<dataset>/ and patch its checksum in."""
    for f in os.listdir(folder):
        body = open(os.path.join(folder, f), "rb").read()
        srv.routes[f"/{dataset}/{f}"] = (body, len(body))
        monkeypatch.setitem(checksums.MD5, (dataset, f), md5 or hashlib.md5(body).hexdigest())


def files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


# Every file with its official URL and MD5, as the data's publishers and torchvision list them
# (torchvision/datasets/cifar.py: CIFAR10/CIFAR100 url and tgz_md5, the MD5s also printed on
# https://www.cs.toronto.edu/~kriz/cifar.html; torchvision/datasets/mnist.py: MNIST's S3 mirror,
# FashionMNIST's mirror, and their resources).
MNIST_S3 = "https://ossci-datasets.s3.amazonaws.com/mnist/"
ZALANDO = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
OFFICIAL = {
    ("cifar10", "cifar-10-python.tar.gz"):
        ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    ("cifar100", "cifar-100-python.tar.gz"):
        ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
    ("mnist", "train-images-idx3-ubyte.gz"): (MNIST_S3 + "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    ("mnist", "train-labels-idx1-ubyte.gz"): (MNIST_S3 + "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    ("mnist", "t10k-images-idx3-ubyte.gz"): (MNIST_S3 + "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    ("mnist", "t10k-labels-idx1-ubyte.gz"): (MNIST_S3 + "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
    ("fashion-mnist", "train-images-idx3-ubyte.gz"):
        (ZALANDO + "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    ("fashion-mnist", "train-labels-idx1-ubyte.gz"):
        (ZALANDO + "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
    ("fashion-mnist", "t10k-images-idx3-ubyte.gz"):
        (ZALANDO + "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    ("fashion-mnist", "t10k-labels-idx1-ubyte.gz"):
        (ZALANDO + "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
}


class _Response(io.BytesIO):
    """What ``urlopen`` returns, enough for ``download_file``: a body and a Content-Length."""

    def __init__(self, body):
        super().__init__(body)
        self.headers = {"Content-Length": str(len(body))}


def test_downloads_fetch_the_official_files_from_their_urls(monkeypatch, tmp_path):
    assert checksums.MD5 == {key: md5 for key, (_, md5) in OFFICIAL.items()}
    # the network, faked at urlopen: each official URL serves a small file in the official format
    src = tmp_path / "src"
    files = {}
    for name in data.DATASETS:
        if name.startswith("cifar"):
            (src / name).mkdir(parents=True)
            synthetic.write_cifar_archive(src / name / data.DATASETS[name]["archive"], name,
                                          synthetic.random_cifar(name, 10, 3, seed=1))
        else:
            synthetic.write_idx_dataset(src / name, 5, 3, seed=2)
        for f in os.listdir(src / name):
            files[name, f] = (src / name / f).read_bytes()
    by_url = {OFFICIAL[key][0]: body for key, body in files.items()}
    fetched = []

    def urlopen(url, timeout=None):
        fetched.append(url)
        if url not in by_url:
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)
        return _Response(by_url[url])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.delenv(download.MIRROR_ENV, raising=False)
    for key, body in files.items():  # the small files stand in for the real ones
        monkeypatch.setitem(checksums.MD5, key, hashlib.md5(body).hexdigest())
    root = tmp_path / "root"
    for name in data.DATASETS:
        for split in ("train", "test"):
            x, y = data.load(name, root, split, download=True)
            assert len(x) == len(y) == (3 if split == "test" else 5 if "mnist" in name else 10)
    assert sorted(fetched) == sorted(url for url, _ in OFFICIAL.values())   # each once, nothing else


def test_download_mnist_good(server, monkeypatch, tmp_path, capsys):
    ref = synthetic.write_idx_dataset(tmp_path / "src", 6, 3, seed=4)
    serve(server, monkeypatch, "fashion-mnist", tmp_path / "src")
    root = tmp_path / "root"
    x, y = data.load("fashion-mnist", root, "test", download=True, mirror=server.url)
    np.testing.assert_array_equal(x, ref["test"][0])
    np.testing.assert_array_equal(y, ref["test"][1])
    assert files(root) == ["fashion-mnist/t10k-images-idx3-ubyte.gz",
                           "fashion-mnist/t10k-labels-idx1-ubyte.gz"]
    err = capsys.readouterr().err
    assert "downloading t10k-images-idx3-ubyte.gz" in err and "done" in err
    # present now: no second download, with or without download=True
    hits = len(server.hits)
    data.load("fashion-mnist", root, "test", download=True, mirror=server.url)
    data.load("fashion-mnist", root, "test")
    assert len(server.hits) == hits == 2


def test_download_cifar_via_env(server, monkeypatch, tmp_path):
    batches = synthetic.random_cifar("cifar10", 10, 4, seed=6)
    (tmp_path / "src").mkdir()
    synthetic.write_cifar_archive(tmp_path / "src" / "cifar-10-python.tar.gz", "cifar10", batches)
    serve(server, monkeypatch, "cifar10", tmp_path / "src")
    monkeypatch.setenv("MINICNN_DATA_MIRROR", server.url + "/")
    root = tmp_path / "root"
    x, y = data.load("cifar10", root, "test", download=True)
    np.testing.assert_array_equal(x, batches["test_batch"][0])
    np.testing.assert_array_equal(y, batches["test_batch"][1])
    assert files(root) == ["cifar10/cifar-10-python.tar.gz"]
    assert server.hits == ["/cifar10/cifar-10-python.tar.gz"]


def test_wrong_checksum_leaves_nothing(server, monkeypatch, tmp_path):
    synthetic.write_idx_dataset(tmp_path / "src", 6, 3)
    serve(server, monkeypatch, "mnist", tmp_path / "src", md5="0" * 32)
    root = tmp_path / "root"
    with pytest.raises(data.DatasetError, match=r"has MD5 [0-9a-f]{32}, expected 0{32}") as e:
        data.load("mnist", root, "train", download=True, mirror=server.url)
    assert "train-images-idx3-ubyte.gz" in str(e.value) and "\n" not in str(e.value)
    assert files(root) == []


def test_cut_off_download_leaves_nothing(server, monkeypatch, tmp_path):
    body = os.urandom(100_000)
    server.routes["/mnist/train-images-idx3-ubyte.gz"] = (body[:40_000], len(body))
    monkeypatch.setitem(checksums.MD5, ("mnist", "train-images-idx3-ubyte.gz"), hashlib.md5(body).hexdigest())
    root = tmp_path / "root"
    with pytest.raises(data.DatasetError, match="40000 of 100000 bytes|connection broken") as e:
        data.load("mnist", root, download=True, mirror=server.url)
    assert "train-images-idx3-ubyte.gz" in str(e.value)
    assert files(root) == []


def test_offline_and_http_error(server, tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "root"
    with pytest.raises(data.DatasetError, match="cannot download http://127.0.0.1.*refused.*DATA_MIRROR"):
        data.load("cifar100", root, download=True, mirror=f"http://127.0.0.1:{port}")
    with pytest.raises(data.DatasetError, match="HTTP 404"):
        data.load("cifar100", root, download=True, mirror=server.url)
    assert files(root) == []


def test_download_file_direct(server, tmp_path):
    body = b"x" * 3_000_000
    server.routes["/f"] = (body, len(body))
    dest = tmp_path / "a" / "b" / "f.bin"
    assert download.download_file(server.url + "/f", str(dest), hashlib.md5(body).hexdigest(),
                                  progress=False) == str(dest)
    assert dest.read_bytes() == body and os.listdir(dest.parent) == ["f.bin"]
    with pytest.raises(data.DatasetError):  # a bad download never replaces a good file
        download.download_file(server.url + "/f", str(dest), "1" * 32, progress=False)
    assert dest.read_bytes() == body and os.listdir(dest.parent) == ["f.bin"]


def test_progress_line_on_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    s = Tty()
    bar = download._Progress("f.gz", 2_000_000, stream=s)
    bar.update(1_000_000)
    bar.finish(2_000_000, True)
    out = s.getvalue()
    assert out.startswith("\rdownloading f.gz: 1.0/2.0 MB  50%") and out.count("\n") == 1
    assert "\rdownloading f.gz: 2.0 MB done" in out
