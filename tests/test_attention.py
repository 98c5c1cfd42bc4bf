import torch

from sorter.model.attention import SpatialAttention


def test_attention_weights_every_position_and_keeps_shape():
    head = SpatialAttention(8)
    torch.nn.init.normal_(head.score.weight, std=1.0)
    x = torch.randn(3, 8, 5, 7)
    y, a = head(x)
    assert y.shape == x.shape
    assert a.shape == (3, 1, 5, 7)
    assert float(a.detach().min()) >= 0.0 and float(a.detach().max()) <= 1.0
    torch.testing.assert_close(y, x * torch.sigmoid(head.score(x)))


def test_attention_starts_neutral():
    _, a = SpatialAttention(16)(torch.rand(2, 16, 4, 4) * 10)
    torch.testing.assert_close(a, torch.full_like(a, 0.5))
