import pytest
import torch

from sorter.model.classifier import AttentionClassifier, build_classifier


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("batch", [1, 3])
def test_output_shapes_for_batch_of_one_and_many(backbone, batch):
    model, source = build_classifier(backbone, num_classes=5, pretrained=False)
    assert source is None
    model.eval()
    x = torch.randn(batch, 3, 96, 128)
    with torch.inference_mode():
        logits, attention = model.forward_with_attention(x)
        features = model.backbone(x)
        assert torch.equal(model(x), logits)
    assert logits.shape == (batch, 5)
    assert attention.shape == (batch, 1, features.shape[2], features.shape[3]) == (batch, 1, 3, 4)
    assert float(attention.min()) >= 0 and float(attention.max()) <= 1


def test_batch_of_one_in_training_mode():
    model, _ = build_classifier("mobilenet_v2", num_classes=3, pretrained=False)
    model.train()
    model.backbone.eval()  # batch-norm cannot compute batch statistics of one image
    loss = model(torch.randn(1, 3, 64, 64)).sum()
    loss.backward()
    assert model.head.weight.grad is not None


def test_attention_can_be_switched_off_for_ablation():
    model, _ = build_classifier("resnet18", num_classes=4, pretrained=False, attention=False)
    assert model.attention is None
    logits, attention = model.eval().forward_with_attention(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 4)
    assert torch.all(attention == 1)


def test_temperature_divides_logits():
    model, _ = build_classifier("resnet18", num_classes=4, pretrained=False)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    before = model(x)
    model.temperature.fill_(2.0)
    torch.testing.assert_close(model(x), before / 2)


def test_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        AttentionClassifier(torch.nn.Identity(), 8, 1)


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match=r"unknown backbone 'vgg'.*resnet18"):
        build_classifier("vgg", 3, pretrained=False)


def test_attention_pooling_is_blind_to_a_gate_that_rises_everywhere():
    """pool="attention": the pooled features are an A-weighted average, so only where A is high matters."""
    import torch

    from sorter.model.classifier import build_classifier

    model, _ = build_classifier("mobilenet_v2", 3, pretrained=False, pool="attention")
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.nn.init.zeros_(model.attention.score.weight)
    pooled_low, _ = model.forward_features(x)
    torch.nn.init.constant_(model.attention.score.bias, 3.0)  # the same gate everywhere, much higher
    pooled_high, a = model.forward_features(x)
    torch.testing.assert_close(pooled_low, pooled_high)
    assert float(a.mean()) > 0.9
