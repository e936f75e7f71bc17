"""Downloads against a local HTTP server: good, wrong checksum, cut off, offline, HTTP error."""
import hashlib
import http.server
import io
import os
import socket
import threading

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


def test_official_urls():
    assert (download.url_for(checksums.BASE_URLS["cifar10"], "cifar10", "cifar-10-python.tar.gz")
            == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
    assert (download.url_for(checksums.BASE_URLS["mnist"], "mnist", "t10k-labels-idx1-ubyte.gz")
            == "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz")
    assert (download.url_for(checksums.BASE_URLS["fashion-mnist"], "fashion-mnist", "x.gz")
            == "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/x.gz")
    assert download.url_for("https://a/", "mnist", "x.gz", mirror="http://m/") == "http://m/mnist/x.gz"
    for (name, fname), md5 in checksums.MD5.items():
        assert len(md5) == 32 and int(md5, 16) >= 0 and name in data.DATASETS


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
