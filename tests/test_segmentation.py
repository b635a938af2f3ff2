"""Semantic segmentation with a CrossFormer backbone (crossformer.segmentation)."""
import pytest
import torch
import torch.nn.functional as F

from crossformer.segmentation import CrossFormerSegmenter, FPNSegmentationHead


@pytest.fixture(scope='module')
def segmenter():
    torch.manual_seed(0)
    return CrossFormerSegmenter('crossformer_t', num_classes=5, channels=64)


@pytest.mark.parametrize('size', [(100, 164), (40, 72)])
def test_segmenter_logits_at_input_size_and_backward(segmenter, size):
    model = segmenter.train()
    model.zero_grad(set_to_none=True)
    x = torch.randn(2, 3, *size)
    labels = torch.randint(0, 5, (2, *size))
    logits = model(x)
    assert logits.shape == (2, 5, *size) and torch.isfinite(logits).all()
    loss = F.cross_entropy(logits, labels)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.backbone.model.patch_embed.projs[0].weight.grad.abs().sum() > 0
    assert model.head.classifier.weight.grad.abs().sum() > 0


def test_segmenter_trainable_stages():
    torch.manual_seed(0)
    model = CrossFormerSegmenter('crossformer_t', num_classes=3, channels=32, trainable_stages=2,
                                 embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)).train()
    body = model.backbone.model
    frozen = [body.patch_embed, body.layers[0], body.layers[1]]
    assert all(not m.training for part in frozen for m in part.modules())
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    assert all(p.grad is None for part in frozen for p in part.parameters())
    assert body.layers[2].blocks[0].mlp.fc1.weight.grad.abs().sum() > 0


def test_head_resolution_and_width_check():
    torch.manual_seed(0)
    head = FPNSegmentationHead([16, 32, 64], num_classes=2, channels=32).eval()
    maps = {'0': torch.randn(1, 16, 25, 41), '1': torch.randn(1, 32, 13, 21), '2': torch.randn(1, 64, 7, 11)}
    with torch.no_grad():
        assert head(maps).shape == (1, 2, 25, 41)
    with pytest.raises(ValueError, match='multiple of 32'):
        FPNSegmentationHead([16, 32], num_classes=2, channels=48)
    with pytest.raises(ValueError, match='num_classes'):
        FPNSegmentationHead([16, 32], num_classes=0)
