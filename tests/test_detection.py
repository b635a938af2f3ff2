"""CrossFormer backbones in torchvision's detectors (crossformer.detection)."""
import math

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from crossformer import CheckpointError, CrossFormer
from crossformer.detection import (
    CrossFormerBackbone, crossformer_fpn_backbone, fasterrcnn_crossformer, maskrcnn_crossformer,
    retinanet_crossformer)

from conftest import mini_kwargs

T_CHANNELS = [64, 128, 256, 512]  # crossformer_t stage widths
STRIDES = [4, 8, 16, 32]
# A CrossFormer small enough to build in milliseconds, for argument and checkpoint tests.
TINY = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
# Small images and few proposals / samples keep the detectors fast on a CPU.
RCNN_SMALL = dict(
    min_size=96, max_size=160, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=64,
    box_batch_size_per_image=64, box_detections_per_img=20)
RETINA_SMALL = dict(min_size=96, max_size=160, topk_candidates=100, detections_per_img=20, score_thresh=0.0)


def ceil_size(h: int, w: int, stride: int) -> tuple:
    return math.ceil(h / stride), math.ceil(w / stride)


def images_and_targets(masks: bool = False):
    """Two 96x128 images with two boxes each (labels 1..3)."""
    images = [torch.rand(3, 96, 128), torch.rand(3, 96, 128)]
    boxes = [torch.tensor([[10., 12., 50., 60.], [60., 20., 120., 90.]]),
             torch.tensor([[5., 5., 30., 40.], [40., 30., 100., 80.]])]
    targets = [dict(boxes=b, labels=torch.tensor([1, 2 + i])) for i, b in enumerate(boxes)]
    if masks:
        for t in targets:
            t['masks'] = torch.zeros(len(t['boxes']), 96, 128, dtype=torch.uint8)
            for m, (x1, y1, x2, y2) in zip(t['masks'], t['boxes'].long().tolist()):
                m[y1:y2, x1:x2] = 1
    return images, targets


@pytest.fixture(scope='module')
def backbone():
    torch.manual_seed(0)
    return CrossFormerBackbone('crossformer_t').eval()


@pytest.mark.parametrize('size', [(100, 164), (40, 72), (128, 160), (33, 17)])
def test_backbone_maps(backbone, size):
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, *size))
    assert list(maps) == ['0', '1', '2', '3']
    assert backbone.out_channels == T_CHANNELS and backbone.strides == STRIDES
    for m, c, s in zip(maps.values(), T_CHANNELS, STRIDES):
        assert m.shape == (2, c, *ceil_size(*size, s))
        assert m.is_contiguous() and torch.isfinite(m).all()


def test_backbone_matches_forward_intermediates():
    torch.manual_seed(0)
    model = timm.create_model('crossformer_t', **TINY).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        maps = CrossFormerBackbone(model, out_indices=(1, 3)).eval()(x)
    assert list(maps) == ['0', '1']
    torch.testing.assert_close(maps['0'], expected[1], rtol=0, atol=0)
    torch.testing.assert_close(maps['1'], expected[3], rtol=0, atol=0)


@pytest.mark.parametrize('case', ['v1_mini', 'pp_mini'])
def test_backbone_matches_reference_dense_features(case, cases, reference):
    """Reference checkpoint (with head, final norm, v1 buffers) in, the reference's dense maps out."""
    spec = cases[case]
    model = CrossFormer(**mini_kwargs(spec['reference_classifier_kwargs']))
    body = CrossFormerBackbone(model, pretrained_file=reference / spec['weights']).eval()
    inputs = load_file(reference / 'inputs.safetensors')
    expected = load_file(reference / spec['expected'])
    dense = [run for run in spec['runs'] if run['kind'] == 'dense']
    assert dense
    for run in dense:
        with torch.no_grad():
            maps = body(inputs[run['input']])
        for i in range(4):
            torch.testing.assert_close(maps[str(i)], expected[f"{run['run']}.feat{i}"], atol=1e-4, rtol=1e-4)


def test_backbone_prunes_unused_parts():
    body = CrossFormerBackbone('crossformer_t', out_indices=(0, 1), **TINY)
    assert len(body.model.layers) == 2 and body.out_channels == [32, 64] and body.strides == [4, 8]
    names = [n for n, _ in body.named_parameters()]
    assert not [n for n in names if not n.startswith(('model.patch_embed.', 'model.layers.'))]


def test_norm_outputs_normalise_channels():
    torch.manual_seed(0)
    body = CrossFormerBackbone('crossformer_t', norm_outputs=True, **TINY).eval()
    with torch.no_grad():
        maps = body(torch.randn(2, 3, 64, 80))
    for m in maps.values():  # LayerNorm at init: weight 1, bias 0
        torch.testing.assert_close(m.mean(1), torch.zeros_like(m.mean(1)), rtol=0, atol=1e-5)
        torch.testing.assert_close(m.var(1, unbiased=False), torch.ones_like(m.mean(1)), rtol=0, atol=1e-3)


@pytest.mark.parametrize('kwargs, match', [
    (dict(out_indices=(2, 1)), 'out_indices'),
    (dict(out_indices=(0, 4)), 'out_indices'),
    (dict(out_indices=()), 'out_indices'),
    (dict(trainable_stages=6), 'trainable_stages'),
    (dict(trainable_stages=-1), 'trainable_stages'),
])
def test_backbone_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CrossFormerBackbone('crossformer_t', **kwargs, **TINY)


def test_rejects_bad_models_and_options():
    model = timm.create_model('crossformer_t', **TINY)
    with pytest.raises(ValueError, match='only be used with a variant name'):
        CrossFormerBackbone(model, drop_path_rate=0.)
    with pytest.raises(ValueError, match='CrossFormer'):
        CrossFormerBackbone(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match='trainable_stages'):
        crossformer_fpn_backbone('crossformer_t', trainable_stages=6, backbone_kwargs=TINY)
    with pytest.raises(ValueError, match='extra_blocks'):
        crossformer_fpn_backbone('crossformer_t', extra_blocks='p6', backbone_kwargs=TINY)


@pytest.fixture(scope='module')
def fpn():
    torch.manual_seed(0)
    return crossformer_fpn_backbone('crossformer_t').eval()


def _check_levels(fpn, names, strides):
    with torch.no_grad():
        maps = fpn(torch.randn(1, 3, 100, 164))
    assert fpn.out_channels == 256
    assert list(maps) == names
    assert [tuple(m.shape) for m in maps.values()] == [(1, 256, *ceil_size(100, 164, s)) for s in strides]


def test_fpn_levels_for_rcnn(fpn):
    _check_levels(fpn, ['0', '1', '2', '3', 'pool'], [4, 8, 16, 32, 64])


def test_fpn_levels_for_retinanet():
    torch.manual_seed(0)
    fpn = crossformer_fpn_backbone('crossformer_t', returned_stages=(1, 2, 3), extra_blocks='p6p7').eval()
    _check_levels(fpn, ['0', '1', '2', 'p6', 'p7'], [8, 16, 32, 64, 128])


def test_same_result_alone_in_a_batch_and_after_other_sizes(fpn):
    a, b = torch.randn(1, 3, 96, 128), torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        alone = fpn(a)
        batched = fpn(torch.cat([a, b]))
        fpn(torch.randn(3, 3, 40, 72))  # a size below a group in every stage
        again = fpn(a)
    for k in alone:
        torch.testing.assert_close(batched[k][:1], alone[k], rtol=0, atol=1e-5)
        torch.testing.assert_close(again[k], alone[k], rtol=0, atol=0)


def _check_detections(det, img, num_classes, expect_masks):
    assert set(det) == {'boxes', 'labels', 'scores'} | ({'masks'} if expect_masks else set())
    n = len(det['boxes'])
    assert 0 < n <= 20
    assert det['boxes'].shape == (n, 4) and det['labels'].shape == (n,) and det['scores'].shape == (n,)
    h, w = img.shape[-2:]
    boxes = det['boxes']
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= h).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert ((det['labels'] >= 0) & (det['labels'] < num_classes)).all()
    assert ((det['scores'] >= 0) & (det['scores'] <= 1)).all()
    assert (det['scores'][:-1] >= det['scores'][1:]).all()
    if expect_masks:
        assert det['masks'].shape == (n, 1, h, w)


def _frozen_and_trainable(model, frozen_stages: int):
    """Backbone parts frozen by ``frozen_stages`` (stem + that many stages) and the others."""
    body = model.backbone.body.model
    parts = [body.patch_embed, *body.layers]
    return parts[:frozen_stages + 1], parts[frozen_stages + 1:]


def test_fasterrcnn_trains_freezes_and_detects():
    torch.manual_seed(0)
    model = fasterrcnn_crossformer('crossformer_t', num_classes=4, trainable_stages=3, box_score_thresh=0.0,
                                   **RCNN_SMALL)
    frozen, trainable = _frozen_and_trainable(model, frozen_stages=1)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in frozen + trainable]
    model.train()
    assert all(not m.training for part in frozen for m in part.modules())
    assert all(m.training for part in trainable for m in part.modules())

    images, targets = images_and_targets()
    losses = model(images, targets)
    assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    # the RPN's objectness logits start near 0 (std 0.01 init): binary cross-entropy ~ ln 2
    assert abs(losses['loss_objectness'].item() - math.log(2)) < 0.02
    sum(losses.values()).backward()

    for part in frozen:
        assert all(not p.requires_grad and p.grad is None for p in part.parameters())
    for part in trainable:
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                    weight_decay=0.1).step()
    after = [m.state_dict() for m in frozen + trainable]
    for i, (b, a) in enumerate(zip(before, after)):
        unchanged = all(torch.equal(b[k], a[k]) for k in b)
        assert unchanged == (i < len(frozen))

    model.eval()
    images = [torch.rand(3, 96, 128), torch.rand(3, 100, 164)]
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for det, img in zip(detections, images):
        _check_detections(det, img, num_classes=4, expect_masks=False)


def test_retinanet_trains_and_detects():
    torch.manual_seed(0)
    model = retinanet_crossformer('crossformer_t', num_classes=4, **RETINA_SMALL)
    assert model.anchor_generator.num_anchors_per_location() == [9] * 5
    images, targets = images_and_targets()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {'classification', 'bbox_regression'}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    body = model.backbone.body.model
    assert all(p.grad is not None for p in body.parameters())  # all 5 parts trainable without weights
    assert body.patch_embed.projs[0].weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        detections = model(images)
    for det, img in zip(detections, images):
        _check_detections(det, img, num_classes=4, expect_masks=False)


def test_maskrcnn_trains_and_predicts_masks():
    torch.manual_seed(0)
    model = maskrcnn_crossformer('crossformer_t', num_classes=4, box_score_thresh=0.0, **RCNN_SMALL)
    images, targets = images_and_targets(masks=True)
    model.train()
    losses = model(images, targets)
    assert 'loss_mask' in losses and all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.body.model.layers[0].blocks[0].attn.qkv.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        detections = model(images[:1])
    _check_detections(detections[0], images[0], num_classes=4, expect_masks=True)


@pytest.fixture
def classifier_file(tmp_path):
    torch.manual_seed(1)
    model = timm.create_model('crossformer_t', num_classes=10, **TINY)
    path = tmp_path / 'classifier.safetensors'
    save_file(model.state_dict(), str(path))
    return model, path


def test_pretrained_file_loads_the_stem_and_stages(classifier_file):
    classifier, path = classifier_file
    expected = {k: v for k, v in classifier.state_dict().items() if k.startswith(('patch_embed.', 'layers.'))}
    body = CrossFormerBackbone('crossformer_t', pretrained_file=path, **TINY)
    got = body.model.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_pretrained_detector_file_and_default_trainable_stages(classifier_file, tmp_path):
    classifier, _ = classifier_file
    # a detector checkpoint: backbone keys under 'backbone.', plus keys of other parts
    state = {f'backbone.{k}': v for k, v in classifier.state_dict().items()}
    state['neck.lateral.weight'] = torch.zeros(3)
    path = tmp_path / 'detector.pth'
    torch.save({'state_dict': state}, path)
    model = fasterrcnn_crossformer('crossformer_t', num_classes=3, pretrained_backbone_file=path,
                                   backbone_kwargs=TINY, **RCNN_SMALL)
    body = model.backbone.body.model
    assert torch.equal(body.layers[2].blocks[0].attn.qkv.weight, classifier.layers[2].blocks[0].attn.qkv.weight)
    # with weights, trainable_stages defaults to 3 as in torchvision: stem and stage 0 frozen
    assert [any(p.requires_grad for p in m.parameters()) for m in [body.patch_embed, *body.layers]] == \
        [False, False, True, True, True]


def test_pretrained_file_missing_keys_is_an_error(classifier_file, tmp_path):
    classifier, _ = classifier_file
    state = {k: v for k, v in classifier.state_dict().items() if not k.startswith('layers.3.')}
    path = tmp_path / 'partial.safetensors'
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match='missing keys: layers.3'):
        CrossFormerBackbone('crossformer_t', pretrained_file=path, **TINY)
