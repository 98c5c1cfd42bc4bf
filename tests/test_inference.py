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


def test_the_probe_rates_each_forward_by_its_best_round_so_a_burst_of_load_does_not_decide():
    """Found measuring: a seeded training run picked bf16 (twice as slow here) because a test run was
    loading the CPU while the probe timed fp32. Rounds now take turns and each forward keeps its best."""
    import time

    import torch

    from sorter.model import runtime as rt

    # "fast" is slowed in its warm-up and first round (another process's burst), "steady" never is
    delays = {"fast": iter([0.08, 0.08, 0.005, 0.005]), "steady": iter([0.02] * 4)}

    def forward(name):
        return lambda x: time.sleep(next(delays[name]))

    def broken(x):
        raise RuntimeError("no bf16 kernel")

    rates = rt.time_forwards({"fast": forward("fast"), "steady": forward("steady"), "bf16": broken}, torch.zeros(4, 3))
    assert rates["fast"] > rates["steady"] > 0 and rates["bf16"] == 0.0


def test_auto_precision_on_a_bf16_cpu_takes_what_measures_faster(monkeypatch):
    """CPU flags say bf16 instructions exist, not that they are faster (a 2-core Xeon with AVX-512 BF16
    and no AMX runs resnet18 in fp32 at 1.5x its bf16 speed): "auto" measures; explicit choices stand."""
    import torch

    from sorter.model import runtime as rt

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    rates = rt.probe_cpu_precision(model, 32, batch=2)
    assert set(rates) == {"fp32", "bf16"} and min(rates.values()) > 0
    assert model.training  # left as it was found

    cpu_bf16 = rt.Runtime(torch.device("cpu"), "bf16")
    for measured, chosen in (({"fp32": 64.0, "bf16": 43.0}, "fp32"), ({"fp32": 20.0, "bf16": 90.0}, "bf16")):
        monkeypatch.setattr(rt, "probe_cpu_precision", lambda *a, m=measured, **k: m)
        runtime, probe = rt.settle_precision(cpu_bf16, "auto", model, 32)
        assert runtime.precision == chosen and probe == measured
    runtime, probe = rt.settle_precision(cpu_bf16, "bf16", model, 32)  # asked for: no measuring
    assert runtime is cpu_bf16 and probe == {}
    fp32 = rt.Runtime(torch.device("cpu"), "fp32")  # no native bf16: nothing to choose between
    assert rt.settle_precision(fp32, "auto", model, 32) == (fp32, {})
