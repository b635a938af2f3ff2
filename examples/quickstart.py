"""Build CrossFormer-S through timm, classify an image and print its feature pyramid.

    python examples/quickstart.py                       # random weights, a generated image
    python examples/quickstart.py --image cat.jpg --checkpoint crossformer-s.pth
"""
import argparse

import timm
import torch
from PIL import Image, ImageDraw
from timm.data import ImageNetInfo, create_transform, resolve_data_config

import crossformer  # noqa: F401  (registers the models with timm)


def sample_image(size: int = 256) -> Image.Image:
    """A drawn scene, so the example needs no download."""
    image = Image.new('RGB', (size, size), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, size * 2 // 3, size, size), fill=(90, 160, 70))
    draw.ellipse((size // 8, size // 8, size // 3, size // 3), fill=(250, 220, 60))
    draw.polygon([(size // 2, size // 3), (size * 7 // 8, size * 2 // 3), (size // 4, size * 2 // 3)], fill=(150, 80, 40))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='crossformer_s')
    parser.add_argument('--image', help='an image file; default: a generated picture')
    parser.add_argument('--checkpoint', help='weights published with the paper (.pth) or converted (.safetensors)')
    args = parser.parse_args()

    overlay = dict(file=args.checkpoint) if args.checkpoint else None
    model = timm.create_model(args.model, pretrained=bool(args.checkpoint), pretrained_cfg_overlay=overlay).eval()
    print(f'{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters'
          + ('' if args.checkpoint else ' (random weights: pass --checkpoint for real predictions)'))

    transform = create_transform(**resolve_data_config({}, model=model))
    image = Image.open(args.image).convert('RGB') if args.image else sample_image()
    x = transform(image).unsqueeze(0)
    with torch.inference_mode():
        probs = model(x).softmax(-1)[0]
        maps = model.forward_intermediates(x, intermediates_only=True)
    info = ImageNetInfo()
    print('top-5:')
    for p, i in zip(*probs.topk(5)):
        print(f'  {p:6.2%}  {info.index_to_description(int(i))}')
    print('feature maps (NCHW):')
    for i, m in enumerate(maps):
        print(f'  stage {i + 1}: {tuple(m.shape)}  stride {x.shape[-1] // m.shape[-1]}')


if __name__ == '__main__':
    main()
