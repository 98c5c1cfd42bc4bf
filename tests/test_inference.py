"""The serving model: compiled batches padded to a few shapes give the eager model's answers."""

import numpy as np
import pytest

from sorter.bench import BenchConfig, make_checkpoint
from sorter.stream.inference import Classifier, batch_buckets


def test_batch_buckets_are_powers_of_two_up_to_the_batch_limit():
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(24) == [1, 2, 4, 8, 16, 24]
    assert batch_buckets(1) == [1]


@pytest.mark.slow
def test_a_compiled_model_pads_and_chunks_batches_and_agrees_with_eager(tmp_path):
    checkpoint = make_checkpoint(BenchConfig(backbone="mobilenet_v2", image_size=64), tmp_path)
    eager = Classifier(checkpoint, device="cpu", precision="fp32")
    compiled = Classifier(checkpoint, device="cpu", precision="fp32", compile=True, max_batch=2)
    assert compiled.buckets == [1, 2] and compiled.compile_s > 0
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(3)]  # 3 > 2: two chunks
    a, b = eager.predict(images), compiled.predict(images)
    assert len(b) == 3
    assert [p.index for p in a] == [p.index for p in b]
    assert np.allclose([p.confidence for p in a], [p.confidence for p in b], atol=1e-3)
