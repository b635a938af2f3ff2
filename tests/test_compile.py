"""torch.compile: one graph per image size (no graph breaks), the same numbers as eager.

Compiled with ``dynamic=False``: each new image size compiles once more (dynamo's recompile on
shape change). With symbolic sizes, dynamo's shape reasoning over the nested ceil divisions of
four stages takes minutes, so the README recommends ``dynamic=False``. The ``eager`` backend
keeps the test fast; it checks dynamo's capture, which is what graph breaks are about.
"""
import torch

from crossformer import CrossFormer

SMALL_PP = dict(embed_dim=16, depths=(1, 1, 4, 1), num_heads=(1, 2, 2, 4), group_size=(4, 4, 7, 7), num_classes=5,
                use_acl=True, drop_path_rate=0.)
SMALL_V1 = dict(SMALL_PP, depths=(1, 1, 1, 1), group_size=7, use_acl=False)


def test_compiled_forward_matches_eager_and_recompiles_per_size():
    torch._dynamo.reset()
    model = CrossFormer(**SMALL_PP).eval()
    compiled = torch.compile(model, fullgraph=True, backend='eager', dynamic=False)
    with torch.no_grad():
        for size in [(64, 64), (72, 100)]:  # even, then padded
            x = torch.randn(2, 3, *size)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


def test_compiled_training_step_matches_eager():
    torch._dynamo.reset()
    model = CrossFormer(**SMALL_V1).train()
    x = torch.randn(2, 3, 56, 72)
    model(x).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.compile(model, fullgraph=True, backend='aot_eager', dynamic=False)(x).square().sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], atol=1e-4, rtol=1e-4, msg=name)
