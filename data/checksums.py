"""Official file names, download URLs and MD5 checksums of the four datasets.

CIFAR: https://www.cs.toronto.edu/~kriz/cifar.html. MNIST: the mirror torchvision downloads
from (yann.lecun.com does not serve the files reliably). Fashion-MNIST: Zalando's S3 bucket.
The MD5s of the ``.gz`` files are those torchvision lists (``torchvision/datasets/mnist.py``,
``cifar.py``). ``RAW_MD5`` holds the MD5 of the *decompressed* IDX files, which do not depend on
how the ``.gz`` was written: Debian's ``dataset-fashion-mnist`` re-gzips the files (no file name
in the gzip header, a 2020 time stamp), so its ``.gz`` MD5s differ from the official ones while
the decompressed contents match ``RAW_MD5`` exactly.

Tests patch ``MD5`` (looked up at call time, never copied) to serve their own small archives.
"""

BASE_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
    "cifar100": "https://www.cs.toronto.edu/~kriz/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}

# (dataset, file name) -> MD5 of the file as downloaded
MD5 = {
    ("cifar10", "cifar-10-python.tar.gz"): "c58f30108f718f92721af3b95e74349a",
    ("cifar100", "cifar-100-python.tar.gz"): "eb9058c3a382ffc7106e4002c42a8d85",
    ("mnist", "train-images-idx3-ubyte.gz"): "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    ("mnist", "train-labels-idx1-ubyte.gz"): "d53e105ee54ea40749a09fcbcd1e9432",
    ("mnist", "t10k-images-idx3-ubyte.gz"): "9fb629c4189551a2d022fa330f9573f3",
    ("mnist", "t10k-labels-idx1-ubyte.gz"): "ec29112dd5afa0611ce80d1b7f02629c",
    ("fashion-mnist", "train-images-idx3-ubyte.gz"): "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    ("fashion-mnist", "train-labels-idx1-ubyte.gz"): "25c81989df183df01b3e8a0aad5dffbe",
    ("fashion-mnist", "t10k-images-idx3-ubyte.gz"): "bef4ecab320f06d8554ea6380940ec79",
    ("fashion-mnist", "t10k-labels-idx1-ubyte.gz"): "bb300cfdad3c16e7a12a480ee83cd310",
}

# (dataset, decompressed file name) -> MD5 of the decompressed IDX file
RAW_MD5 = {
    ("fashion-mnist", "train-images-idx3-ubyte"): "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    ("fashion-mnist", "train-labels-idx1-ubyte"): "9018921c3c673c538a1fc5bad174d6f9",
    ("fashion-mnist", "t10k-images-idx3-ubyte"): "8181f5470baa50b63fa0f6fddb340f0a",
    ("fashion-mnist", "t10k-labels-idx1-ubyte"): "15d484375f8d13e6eb1aabb0c3f46965",
}
